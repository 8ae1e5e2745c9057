"""The MQAR gpu preset's models on the GPU: the Triton path (fp32, and under bf16 autocast)
against the PyTorch path in fp32 for one batch of 16, loss and every parameter's gradient; then
the bf16 training step time at the preset's batch of 64.

    python benchmarks/mqar_grad_check.py [kda,gla]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dplr.models.lm import LM
from dplr.tasks import mqar


def loss_and_grads(model: LM, x, y, *, backend: str, amp: bool) -> tuple[float, dict]:
    os.environ["DPLR_BACKEND"] = backend
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten(), ignore_index=mqar.IGNORE)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def step_ms(model: LM, x, y) -> float:
    """The mean time of 10 bf16 training steps (after 3), as the MQAR trainer runs them."""
    os.environ["DPLR_BACKEND"] = "auto"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x).logits.flatten(0, 1).float()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(logits, y.flatten(), ignore_index=mqar.IGNORE).backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / 10 * 1e3


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    device, preset = torch.device("cuda"), mqar.PRESETS["gpu"]
    x, y = (t.to(device) for t in mqar.make_examples(preset.data, 16, seed=0))
    xb, yb = (t.to(device) for t in mqar.make_examples(preset.data, 64, seed=1))
    for mixer in (sys.argv[1] if len(sys.argv) > 1 else "kda,gla").split(","):
        for width in (128, 256):
            torch.manual_seed(0)
            model = LM(mqar.model_config(preset, mixer, width)).to(device)
            ref_loss, ref = loss_and_grads(model, x, y, backend="torch", amp=False)
            for amp in (False, True):
                loss, grads = loss_and_grads(model, x, y, backend="triton", amp=amp)
                errors = {
                    n: ((grads[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in ref.items() if n in grads
                }
                worst = max(errors, key=errors.get)
                print(
                    f"{mixer} d={width} triton amp={amp}: loss {loss:.5f} (torch fp32 {ref_loss:.5f}), "
                    f"worst grad {errors[worst]:.2e} at {worst}, missing {sorted(set(ref) - set(grads))}",
                    flush=True,
                )
            print(f"{mixer} d={width}: {step_ms(model, xb, yb):.2f} ms/step (bf16 autocast, B=64, T=512)", flush=True)


if __name__ == "__main__":
    main()
