"""MQAR: the data is what the task says, the trainer learns, and the command writes its table."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dplr.cli import main
from dplr.tasks.mqar import (
    IGNORE,
    PRESETS,
    Data,
    Preset,
    make_examples,
    table,
    train_one,
    training_batches,
    training_set,
)


def test_examples_pair_every_query_with_its_value():
    data = Data(vocab_size=64, seq_len=48, num_kv_pairs=6)
    inputs, targets = make_examples(data, 300, seed=0)
    assert inputs.shape == targets.shape == (300, 48) and inputs.dtype == torch.long
    P, half = 6, 32
    for x, y in zip(inputs.tolist(), targets.tolist(), strict=True):
        keys, values = x[0 : 2 * P : 2], x[1 : 2 * P : 2]
        assert len(set(keys)) == P and all(1 <= k < half for k in keys)
        assert len(set(values)) == P and all(half <= v < 64 for v in values)
        pairs = dict(zip(keys, values, strict=True))
        answers = [(t, v) for t, v in enumerate(y) if v != IGNORE]
        assert len(answers) == P and all(t >= 2 * P and t % 2 == 0 for t, _ in answers)
        assert sorted(x[t] for t, _ in answers) == sorted(keys)  # every key queried once
        assert all(pairs[x[t]] == v for t, v in answers)
        assert sum(x[t] in pairs for t in range(2 * P, 48)) == P  # no stray copies of the keys
    again, _ = make_examples(data, 300, seed=0)
    assert torch.equal(again, inputs)
    assert not torch.equal(make_examples(data, 300, seed=1)[0], inputs)


def test_power_law_favours_early_queries():
    _, targets = make_examples(Data(vocab_size=512, seq_len=256, num_kv_pairs=8), 400, seed=0)
    where = (targets != IGNORE).nonzero()[:, 1].float()
    assert where.median() < 16 + (256 - 16) / 2  # most queries in the first half of the query region


def test_data_errors():
    with pytest.raises(ValueError, match="seq_len"):
        Data(vocab_size=64, seq_len=20, num_kv_pairs=8)
    with pytest.raises(ValueError, match="vocab_size"):
        Data(vocab_size=16, seq_len=64, num_kv_pairs=8)


def test_training_learns_recall():
    """A delta-rule model on a small MQAR reaches recall well above chance (1 / number of
    values) within a few hundred steps: the trainer, the loss mask and the evaluation work."""
    preset = Preset(
        data=Data(vocab_size=32, seq_len=16, num_kv_pairs=2),
        mixers=("delta_net",),
        widths=(32,),
        train_examples=3200,
        test_examples=200,
        epochs=1,
        batch_size=16,
        lr=3e-3,
        head_dim=32,
    )
    train = training_set(preset, seed=0)
    test = make_examples(preset.data, preset.test_examples, seed=1)
    row = train_one(preset, "delta_net", 32, train, test, device=torch.device("cpu"), seed=0, progress=False)
    assert row["steps"] == 200 and row["parameters"] > 0
    assert row["accuracy"] > 0.5, row  # chance is 1/16


def test_training_mix_batches_each_task_at_its_own_length():
    """With ``train_mix`` every batch comes from one task, at that task's length, and an epoch
    visits every example of every task once."""
    short, long = Data(vocab_size=64, seq_len=16, num_kv_pairs=2), Data(vocab_size=64, seq_len=32, num_kv_pairs=4)
    preset = dataclasses.replace(PRESETS["cpu"], data=long, train_examples=40, train_mix=((short, 24),), batch_size=8)
    train = training_set(preset, seed=0)
    assert [tuple(x.shape) for x, _ in train] == [(40, 32), (24, 16)]
    seen = {0: [], 1: []}
    for segment, idx in training_batches(train, batch_size=8, epochs=1, gen=torch.Generator().manual_seed(0)):
        assert len(idx) <= 8
        seen[segment] += idx.tolist()
    assert sorted(seen[0]) == list(range(40)) and sorted(seen[1]) == list(range(24))
    row = train_one(preset, "gla", 16, train, make_examples(long, 16, seed=1), device=torch.device("cpu"), seed=0,
                    progress=False)  # fmt: skip
    assert row["steps"] == 5 + 3 and row["planned_steps"] == 8


def test_command_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "mqar.json"
    argv = ["mqar", "--mixer", "gla", "--mixer", "attention", "--width", "16", "--train-examples", "64"]
    threads = str(torch.get_num_threads())  # leave the process as it was
    assert main([*argv, "--epochs", "1", "--threads", threads, "--no-progress", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["preset"]["data"] == {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4, "power_a": 0.01}
    assert [(r["mixer"], r["width"]) for r in report["results"]] == [("gla", 16), ("attention", 16)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report["results"])
    assert report["environment"]["torch"] == torch.__version__
    printed = capsys.readouterr().out
    assert table(report) in printed and "| gla |" in printed
    assert "cpu" in PRESETS and "gpu" in PRESETS


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from dplr.tasks.mqar import plot

    rows = [dict(mixer=m, width=w, accuracy=a) for m, w, a in [("kda", 32, 0.5), ("kda", 64, 0.9), ("gla", 32, 0.1)]]
    report = dict(
        preset=dict(data=dict(vocab_size=64, seq_len=32, num_kv_pairs=4)),
        environment=dict(card=None, threads=2),
        results=rows,
    )
    path = plot(report, tmp_path / "mqar.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
