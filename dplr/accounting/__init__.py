"""Compute accounting: FLOPs, exponentials and bytes per stage of the chunk algorithm, for every
structure, with roofline floors on a device (DESIGN §1, face 2; the derivation is in
``docs/accounting.md``).

* :mod:`.model` — the algorithm's cost per stage (dense tiles, fused-kernel view), forward and
  backward, the token-by-token recurrence and softmax attention for comparison;
* :mod:`.torch_plan` — what the PyTorch chunk path actually does, checked against
  ``FlopCounterMode`` by the tests;
* :mod:`.roofline` — device presets, ``measure_device()``, floors and the binding resource;
* :mod:`.report` — the report dict (saved as JSON), its tables, the DPLR/KDA ratios, the chart
  and measured times beside the floors;
* :mod:`.bench` — ``python -m dplr bench``: each chunk op timed here, beside its floors.
"""

from . import bench
from .cli import add_subcommand
from .model import Account, Precision, Shape, StageCost, account, attention_cost, recurrent_cost
from .report import build, chart, text, with_measured
from .roofline import DEVICES, Device, floor, fused_floor, measure_device, staged_floor
from .torch_plan import PlanStage, torch_plan

__all__ = [
    "DEVICES",
    "Account",
    "Device",
    "PlanStage",
    "Precision",
    "Shape",
    "StageCost",
    "account",
    "add_subcommand",
    "attention_cost",
    "bench",
    "build",
    "chart",
    "floor",
    "fused_floor",
    "measure_device",
    "recurrent_cost",
    "staged_floor",
    "text",
    "torch_plan",
    "with_measured",
]
