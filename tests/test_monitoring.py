"""While a run goes: held-out evaluation every N steps, metrics to JSONL and TensorBoard, each
step's time split by phase, and a curves PNG with a legend and plain-number axes."""

import json

import pytest
from conftest import small_config

from hrpo.train import train
from hrpo.training.plots import moving_average, plot_curves

PHASES = ("time_rollout_s", "time_reward_s", "time_reference_s", "time_update_s")


def test_eval_every_tensorboard_and_phase_times(model_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is part of .[test]; CI installs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = small_config(model_dir, run, max_steps=4, eval_every=2, eval_every_limit=3, report_to="tensorboard")
    train(cfg, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert ["eval_accuracy" in r for r in records] == [False, True, False, True]  # after optimizer steps 2 and 4
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in records if "eval_accuracy" in r)
    for r in records:
        assert all(r[k] >= 0.0 for k in PHASES)
        assert r["elapsed_s"] >= sum(r[k] for k in PHASES) * 0.99
        assert r["time_policy_s"] + r["time_optimizer_s"] == pytest.approx(r["time_update_s"], rel=1e-6)
        assert all(r[f"mem_{p}_gb"] > 0 for p in ("rollout", "reference", "policy"))  # the process's peak RSS on CPU
        assert r["update_tokens"] > 8 * 8  # 8 prompts of several tokens plus their completions
    summary = json.loads((run / "summary.json").read_text())
    rollout_s = sum(r["time_rollout_s"] for r in records)
    new_tokens = sum(r["completion_tokens"] * 8 for r in records)
    assert summary["rollout_tokens_per_s"] == pytest.approx(new_tokens / rollout_s)
    update_s = sum(r["time_reference_s"] + r["time_update_s"] for r in records)
    assert summary["update_tokens_per_s"] == pytest.approx(sum(r["update_tokens"] for r in records) / update_s)
    assert summary["completions_per_hour"] == pytest.approx(4 * 8 / summary["train_seconds"] * 3600)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward")] == [0, 1, 2, 3]
    assert [e.value for e in events.Scalars("reward")] == pytest.approx([r["reward"] for r in records])
    assert [e.step for e in events.Scalars("eval_accuracy")] == [1, 3]


def test_tensorboard_without_the_package_is_one_line(model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(
        ValueError, match=r"^--report-to tensorboard needs the tensorboard package: pip install 'hrpo\[tensorboard\]'$"
    ):
        train(small_config(model_dir, tmp_path / "run", report_to="tensorboard"), progress=False)
    assert not (tmp_path / "run").exists()


def test_moving_average_by_hand():
    assert moving_average([1.0, 3.0, None, 5.0, float("nan"), 9.0], 2) == [1.0, 2.0, 3.0, 5.0, 5.0, 9.0]


def test_curves_have_a_legend_and_no_offset_notation(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    records = [
        {
            "step": s,
            "reward": s / 40,
            "kl": 1e-4 * s,
            "gate_a": 0.99700 + 1e-6 * s,
            "completion_tokens": 40 - s % 3,
            **({"eval_accuracy": 0.1 * s / 10} if s % 10 == 9 else {}),
        }
        for s in range(40)
    ]
    plot_curves(records, tmp_path / "curves.png", "test")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    fig = figures[0]
    fig.canvas.draw()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "mean reward",
        "KL to reference",
        "gate a over thinking tokens",
        "completion tokens",
        "held-out accuracy (greedy)",
    ]
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels in (["raw", "moving average (5 steps)"], ["value"])
        assert ax.get_xlabel() == "device step"
        assert ax.yaxis.get_offset_text().get_text() == ""  # 0.99701, not 1e-6 + 0.997
    gate_ticks = [t.get_text() for t in fig.axes[2].get_yticklabels() if t.get_text()]
    assert all(0.9969 <= float(t) <= 0.9971 for t in gate_ticks), gate_ticks  # plain values, no offset
    assert all(
        float(t.get_text().replace("\u2212", "-")).is_integer() for t in fig.axes[0].get_xticklabels() if t.get_text()
    )
