"""Multi-query associative recall (MQAR), the Zoology set-up, and a trainer that compares mixers.

An example is ``P`` key-value pairs ``k1 v1 k2 v2 ...`` (keys from the lower half of the
vocabulary, values from the upper half, distinct within an example), then a query region in
which each key appears once more, at an even offset drawn from a power law that favours early
slots; the model must predict the key's value at that position. Every other query-region token
is a random token other than the example's keys (distractors; Zoology draws from the whole
vocabulary, which at a small vocabulary puts stray copies of the keys in the query region).
The loss and the accuracy count the ``P`` answer positions only.

``python -m dplr mqar`` trains a 2-layer :class:`~dplr.models.lm.LM` per mixer and width and
writes the accuracy table as JSON and a plot (accuracy vs width per mixer) as PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__, provenance
from ..models.lm import LM, MIXERS, LMConfig

IGNORE = -100  # the target of every position that is not an answer


@dataclass(frozen=True)
class Data:
    """The task's shape: ``vocab_size`` tokens, sequences of ``seq_len``, ``num_kv_pairs`` pairs;
    ``power_a`` shapes the query placement (Zoology's ``power_a``)."""

    vocab_size: int
    seq_len: int
    num_kv_pairs: int
    power_a: float = 0.01

    def __post_init__(self) -> None:
        if self.seq_len < 4 * self.num_kv_pairs:
            raise ValueError(f"seq_len={self.seq_len} must be >= 4 * num_kv_pairs={4 * self.num_kv_pairs}")
        if self.vocab_size // 2 <= self.num_kv_pairs:
            raise ValueError(f"vocab_size={self.vocab_size} must exceed 2 * num_kv_pairs={2 * self.num_kv_pairs}")


def make_examples(data: Data, num_examples: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_examples`` MQAR sequences: ``inputs [n, seq_len]`` and ``targets [n, seq_len]``
    (the value at each query position, :data:`IGNORE` elsewhere), int64, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    P, T, half = data.num_kv_pairs, data.seq_len, data.vocab_size // 2
    slots = (T - 2 * P) // 2  # query slots: even offsets in the query region
    weights = data.power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (data.power_a - 1)
    inputs, targets = [], []
    for start in range(0, num_examples, 1024):  # in blocks: the key draw is [n, vocab/2]
        n = min(1024, num_examples - start)
        # P distinct keys from [1, half) and values from [half, vocab): the top P of uniform noise.
        keys = 1 + torch.rand(n, half - 1, generator=gen).topk(P, dim=1).indices
        values = half + torch.rand(n, data.vocab_size - half, generator=gen).topk(P, dim=1).indices
        # Distractors: any token but this example's keys, so that a query's key occurs exactly twice
        # (with a small vocabulary, random keys in the query region would pose as pairs). Drawn
        # again where they hit a key; each round leaves a fraction P / vocab_size of the last.
        is_key = torch.zeros(n, data.vocab_size, dtype=torch.bool).scatter_(1, keys, True)
        x = torch.randint(0, data.vocab_size, (n, T), generator=gen)
        hit = is_key.gather(1, x)
        while hit.any():
            x[hit] = torch.randint(0, data.vocab_size, (int(hit.sum()),), generator=gen)
            hit = is_key.gather(1, x)
        x[:, 0 : 2 * P : 2], x[:, 1 : 2 * P : 2] = keys, values
        where = 2 * P + 2 * torch.multinomial(weights.expand(n, slots), P, replacement=False, generator=gen)
        x.scatter_(1, where, keys)
        y = torch.full((n, T), IGNORE, dtype=torch.long).scatter_(1, where, values)
        inputs.append(x)
        targets.append(y)
    if not inputs:
        return torch.zeros(0, T, dtype=torch.long), torch.zeros(0, T, dtype=torch.long)
    return torch.cat(inputs), torch.cat(targets)


@dataclass(frozen=True)
class Preset:
    """A sweep: the data, the mixers and widths, and the training budget."""

    data: Data
    mixers: tuple[str, ...]
    widths: tuple[int, ...]
    train_examples: int
    test_examples: int
    epochs: int
    batch_size: int
    lr: float
    num_layers: int = 2
    head_dim: int = 64
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    max_seconds: float | None = None  # per run: shorten the schedule to what fits (see train_one)
    # Easier tasks mixed into the training set, (task, examples) each, as Zoology's sweeps train:
    # shorter sequences with fewer pairs give the model the lookup to learn before the long ones
    # (a model trained on the long task alone sits at chance for thousands of steps). Batches are
    # drawn from one task at a time, at its own length; the test set is ``data`` alone.
    train_mix: tuple[tuple[Data, int], ...] = ()


PRESETS = {
    # Sized for a 2-core CPU: all six mixers at two widths, two at a time, in about five minutes.
    "cpu": Preset(
        data=Data(vocab_size=64, seq_len=32, num_kv_pairs=4),
        mixers=MIXERS,
        widths=(32, 64),
        train_examples=11520,
        test_examples=1000,
        epochs=1,
        batch_size=16,
        lr=1e-3,
        head_dim=32,
    ),
    # Zoology's sweep: vocab 8192, T = 512, 64 pairs, 2 layers, widths 64-512, 100K examples,
    # with easier lengths mixed into training. Trained on the T = 512 task alone (fp32, an earlier
    # session), KDA and GLA at d = 128 and 256 stayed at chance. With the mixture, bf16 and four
    # models sharing an H200 for 2.5 min each (1300-7000 of the 12512 planned steps), the
    # accuracies vary from run to run: benchmarks/results/mqar_gpu_H200*.json. Zoology trains
    # far longer, with a learning-rate sweep.
    "gpu": Preset(
        data=Data(vocab_size=8192, seq_len=512, num_kv_pairs=64),
        mixers=MIXERS,
        widths=(64, 128, 256, 512),
        train_examples=100_000,
        test_examples=3000,
        epochs=4,
        batch_size=64,
        lr=1e-3,
        max_seconds=150.0,
        train_mix=tuple(
            (Data(vocab_size=8192, seq_len=T, num_kv_pairs=P), 20_000)
            for T, P in ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))
        ),
    ),
}


def model_config(preset: Preset, mixer: str, width: int) -> LMConfig:
    """The 2-layer LM of a run: heads of ``head_dim`` (one head below it), short convolutions on."""
    head_dim = min(preset.head_dim, width)
    return LMConfig(
        vocab_size=preset.data.vocab_size,
        hidden_size=width,
        num_layers=preset.num_layers,
        num_heads=max(1, width // head_dim),
        head_dim=head_dim,
        mixer=mixer,
    )


WARM_STEPS, PROBE_STEPS = 5, 25  # a time budget times steps WARM_STEPS..PROBE_STEPS, then fixes the run's length


Segment = tuple[torch.Tensor, torch.Tensor]  # one task's (inputs, targets), all of one length


def training_set(preset: Preset, *, seed: int) -> list[Segment]:
    """The training segments: ``preset.data`` with ``train_examples``, then each task of ``train_mix``."""
    tasks = [(preset.data, preset.train_examples), *preset.train_mix]
    return [make_examples(data, n, seed=seed + 1000 * i) for i, (data, n) in enumerate(tasks)]


def training_batches(train: list[Segment], *, batch_size: int, epochs: int, gen: torch.Generator):
    """Every epoch: each segment shuffled and cut into batches, the batches of all segments in a
    shuffled order (one segment: its own order). Yields ``(segment index, example indices)``."""
    for _ in range(epochs):
        batches = [
            (s, order[i : i + batch_size])
            for s, (inputs, _) in enumerate(train)
            for order in [torch.randperm(len(inputs), generator=gen)]
            for i in range(0, len(inputs), batch_size)
        ]
        mixed = torch.randperm(len(batches), generator=gen).tolist() if len(train) > 1 else range(len(batches))
        for j in mixed:
            yield batches[j]


def train_one(
    preset: Preset,
    mixer: str,
    width: int,
    train: list[Segment],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    device: torch.device,
    seed: int,
    lr: float | None = None,
    progress: bool = True,
) -> dict:
    """Train one model and measure its recall accuracy on ``test``. Returns a result row.

    ``epochs`` passes over the segments of ``train`` in batches of ``batch_size``, AdamW with a linear warm-up and a
    cosine decay to zero. With ``preset.max_seconds`` the run is shortened, once the first
    :data:`PROBE_STEPS` steps are timed, to what fits the budget; the schedule follows (still
    in warm-up then), so a budgeted run is a complete, shorter run rather than a cut one."""
    torch.manual_seed(seed)
    lr = preset.lr if lr is None else lr
    model = LM(model_config(preset, mixer, width)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=preset.weight_decay, betas=(0.9, 0.98))
    planned = sum(math.ceil(len(inputs) / preset.batch_size) for inputs, _ in train) * preset.epochs
    plan = dict(total=planned, warmup=max(1, int(preset.warmup_fraction * planned)))

    def schedule(s: int) -> float:
        warmup, total = plan["warmup"], plan["total"]
        return min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup)))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    batches = training_batches(train, batch_size=preset.batch_size, epochs=preset.epochs, gen=gen)
    bar = _progress(planned, f"{mixer:>9s} d={width:<4d}", progress)
    start, marks, tokens = time.perf_counter(), [], 0
    model.train()
    for step, (segment, idx) in enumerate(batches):
        if step == plan["total"]:
            break
        inputs, targets = train[segment]
        x, y = inputs[idx].to(device), targets[idx].to(device)
        tokens += x.numel()
        with _precision(device):
            loss = F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if preset.max_seconds is not None and step + 1 in (WARM_STEPS, PROBE_STEPS):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks.append(time.perf_counter())
        if preset.max_seconds is not None and step + 1 == PROBE_STEPS:
            # Timed after the first steps, which pay for kernel compilation and autotuning.
            per_step = (marks[1] - marks[0]) / (PROBE_STEPS - WARM_STEPS)
            fits = PROBE_STEPS + max(1, int((preset.max_seconds - (marks[1] - start)) / per_step))
            if fits < planned:
                plan.update(total=fits, warmup=max(1, min(plan["warmup"], int(preset.warmup_fraction * fits))))
                bar.reset(total=fits)
                bar.update(step + 1)
    steps = min(plan["total"], planned)
    train_seconds = time.perf_counter() - start
    accuracy, test_loss = evaluate(model, test, batch_size=4 * preset.batch_size, device=device)
    bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
    bar.close()
    return dict(
        mixer=mixer,
        width=width,
        lr=lr,
        accuracy=accuracy,
        test_loss=test_loss,
        final_train_loss=float(loss.item()),
        steps=steps,
        planned_steps=planned,
        parameters=sum(p.numel() for p in model.parameters()),
        train_seconds=round(train_seconds, 2),
        train_tokens_per_second=round(tokens / train_seconds, 1),
    )


@torch.no_grad()
def evaluate(
    model: LM, test: tuple[torch.Tensor, torch.Tensor], *, batch_size: int, device: torch.device
) -> tuple[float, float]:
    """Recall accuracy (argmax equals the value, over all answer positions) and mean loss."""
    model.eval()
    correct = count = 0
    loss_sum = 0.0
    for i in range(0, len(test[0]), batch_size):
        x, y = test[0][i : i + batch_size].to(device), test[1][i : i + batch_size].to(device)
        with torch.no_grad(), _precision(device):
            logits = model(x).logits.float()
        answer = y != IGNORE
        correct += int((logits.argmax(-1)[answer] == y[answer]).sum())
        count += int(answer.sum())
        loss_sum += float(F.cross_entropy(logits[answer], y[answer], reduction="sum"))
    model.train()
    return correct / max(count, 1), loss_sum / max(count, 1)


def _precision(device: torch.device):
    """On a GPU the forward runs under bf16 autocast (weights, optimiser and recurrent states stay
    fp32), as models are trained in practice; fp32 activations would also put the mixers on the
    Triton backward's fp32 build, which is several times slower. On the CPU: fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar (the ``mqar`` extra), or a stand-in that prints one line at the end."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Quiet(desc, enabled)
    return tqdm(total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True)


class _Quiet:
    """What the trainer needs of a tqdm bar, when tqdm is not installed."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.postfix = desc, enabled, {}

    def update(self, n: int) -> None:
        """Progress is shown only at the end without tqdm."""

    def reset(self, total: int) -> None:
        """The length is not shown without tqdm."""

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.enabled:
            print(self.desc, " ".join(f"{k}={v}" for k, v in self.postfix.items()), flush=True)


def run(
    preset: Preset,
    *,
    device: torch.device,
    seed: int = 0,
    lr: float | None = None,
    progress: bool = True,
    jobs: int = 1,
) -> dict:
    """Every mixer at every width of ``preset``: the report (settings, environment, rows).
    ``jobs > 1`` trains that many models at once, one process (and one CPU thread) each; on a
    GPU the processes share the card."""
    train = training_set(preset, seed=seed)
    test = make_examples(preset.data, preset.test_examples, seed=seed + 1)
    runs = [(mixer, width) for mixer in preset.mixers for width in preset.widths]
    start = time.perf_counter()
    if jobs <= 1:
        rows = [
            train_one(preset, mixer, width, train, test, device=device, seed=seed, lr=lr, progress=progress)
            for mixer, width in runs
        ]
    else:
        rows = _run_parallel(preset, runs, train, test, device=device, seed=seed, lr=lr, progress=progress, jobs=jobs)
    return dict(
        task="mqar",
        preset=dataclasses.asdict(preset),
        environment=environment(device),
        precision="bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32",
        seed=seed,
        total_seconds=round(time.perf_counter() - start, 1),
        results=rows,
    )


def _run_parallel(
    preset: Preset,
    runs: list,
    train,
    test,
    *,
    device: torch.device,
    seed: int,
    lr: float | None,
    progress: bool,
    jobs: int,
):
    """The runs in ``jobs`` worker processes; one bar counts finished runs. On a GPU this pays
    because these small models keep one process's CPU busy launching kernels while the card
    idles: several processes fill it (each one's time budget then covers fewer steps)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bar = _progress(len(runs), f"MQAR, {jobs} jobs", progress)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked thread pools
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = [
            pool.submit(train_one, preset, m, w, train, test, device=device, seed=seed, lr=lr, progress=False)
            for m, w in runs
        ]
        rows = []
        for future in futures:
            rows.append(future.result())
            bar.update(1)
            bar.set_postfix(last=f"{rows[-1]['mixer']} d={rows[-1]['width']} acc={rows[-1]['accuracy']:.3f}")
    bar.close()
    return rows


def environment(device: torch.device) -> dict:
    """The machine, the versions and the commit, for the JSON."""
    return dict(provenance.environment(device), device=str(device), threads=torch.get_num_threads(), dplr=__version__)


def table(report: dict) -> str:
    """The accuracy table: one row per mixer, one column per width."""
    widths = sorted({r["width"] for r in report["results"]})
    mixers = list(dict.fromkeys(r["mixer"] for r in report["results"]))
    acc = {(r["mixer"], r["width"]): r["accuracy"] for r in report["results"]}
    lines = ["| mixer | " + " | ".join(f"d={w}" for w in widths) + " |", "|---" * (len(widths) + 1) + "|"]
    for m in mixers:
        cells = (f"{acc[m, w]:.3f}" if (m, w) in acc else "" for w in widths)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Accuracy vs model width, one line per mixer (needs matplotlib, the ``mqar`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for mixer in dict.fromkeys(r["mixer"] for r in report["results"]):
        rows = sorted((r for r in report["results"] if r["mixer"] == mixer), key=lambda r: r["width"])
        ax.plot([r["width"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=mixer)
    data, env = report["preset"]["data"], report["environment"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["width"] for r in report["results"]}), labels=None)
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("model width")
    ax.set_ylabel("recall accuracy")
    where = env["card"] or f"CPU ({env['threads']} threads)"
    ax.set_title(
        f"MQAR: vocab {data['vocab_size']}, T={data['seq_len']}, {data['num_kv_pairs']} pairs; {where}", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# python -m dplr mqar


def add_subcommand(sub) -> None:
    """Register ``mqar`` on the parser's subcommands."""
    p = sub.add_parser("mqar", help="train every mixer on multi-query associative recall; JSON table and plot")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="default %(default)s")
    p.add_argument("--mixer", action="append", choices=list(MIXERS), help="repeatable; default the preset's")
    p.add_argument("--width", action="append", type=int, help="repeatable; default the preset's")
    p.add_argument("--lr", type=float, help="learning rate (default the preset's)")
    p.add_argument("--epochs", type=int, help="passes over the training set (default the preset's)")
    p.add_argument("--train-examples", type=int, help="default the preset's")
    p.add_argument("--batch-size", type=int, help="default the preset's")
    p.add_argument("--max-minutes", type=float, help="time budget per run (default the preset's: gpu 2.5, cpu none)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default %(default)s)")
    p.add_argument(
        "--jobs",
        type=int,
        help="models trained at once, one process each (default 2 on a CPU, 1 on a GPU, which they share)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default benchmarks/results/mqar_<preset>.json); the PNG goes beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_mqar)


def cmd_mqar(ns: argparse.Namespace) -> int:
    preset = PRESETS[ns.preset]
    changes = dict(
        mixers=tuple(ns.mixer) if ns.mixer else None,
        widths=tuple(ns.width) if ns.width else None,
        epochs=ns.epochs,
        train_examples=ns.train_examples,
        batch_size=ns.batch_size,
    )
    for name, value in changes.items():
        if isinstance(value, int) and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    preset = dataclasses.replace(preset, **{k: v for k, v in changes.items() if v is not None})
    if ns.max_minutes is not None:
        preset = dataclasses.replace(preset, max_seconds=60.0 * ns.max_minutes)
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # One thread by default: these small shapes gain little from intra-op threads, and a shared
    # CPU turns extra threads into spin-waiting (a 2-thread run was 10-40x slower under load).
    torch.set_num_threads(ns.threads)
    jobs = ns.jobs if ns.jobs is not None else 2 if device.type == "cpu" else 1
    if jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {jobs}")
    report = run(preset, device=device, seed=ns.seed, lr=ns.lr, progress=not ns.no_progress, jobs=jobs)

    out = Path(ns.out or f"benchmarks/results/mqar_{ns.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{table(report)}\n\n{len(report['results'])} runs in {report['total_seconds']:.0f}s; wrote {out}")
    try:
        print(f"wrote {plot(json.loads(out.read_text()), out.with_suffix('.png'))}")
    except ImportError:
        print("matplotlib is not installed (pip install 'dplr[mqar]'): no plot")
    return 0
