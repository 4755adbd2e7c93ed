"""The charts: `hrpo.eval --compare` (where it writes, n in its table and tick labels, zero bars
and the paper's mark inside each group) and the inspector's gate chart (integer position ticks)."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_rgba

from hrpo.eval import main as eval_main
from hrpo.inspect.report import aggregates, chart
from hrpo.inspect.trace import Position, Trace


@pytest.fixture
def closed_figures(monkeypatch):
    """The figures the code under test closes (each chart closes its figure once saved)."""
    figures, real_close = [], plt.close

    def spy(fig=None):
        figures.append(fig)
        real_close(fig)

    monkeypatch.setattr(plt, "close", spy)
    return figures


def _run(folder, benchmarks):
    folder.mkdir(parents=True)
    rows = {b: {"metric": metric, "value": v, "n": n} for b, (metric, v, n) in benchmarks.items()}
    (folder / "results.json").write_text(json.dumps({"benchmarks": rows}))
    return str(folder)


def test_compare_writes_into_the_first_run_and_shows_n(tmp_path, monkeypatch, capsys, closed_figures):
    base = _run(tmp_path / "base", {"gsm8k": ("accuracy", 0.0, 20), "nq": ("exact_match", 0.05, 20)})
    hrpo = _run(tmp_path / "hrpo", {"gsm8k": ("accuracy", 0.42, 500)})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert eval_main(["--compare", base, hrpo]) == 0
    printed = capsys.readouterr().out
    assert list(cwd.iterdir()) == []
    assert (tmp_path / "base" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "| gsm8k | accuracy | 0.0 (n=20) | 42.0 (n=500) | 83.5 |" in printed
    assert "| nq | exact_match | 5.0 (n=20) |  | 37.8 |" in printed

    (fig,) = closed_figures
    ax = fig.axes[0]
    assert ax.get_title()
    ticks = list(ax.get_xticks())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["gsm8k\nn=20 / 500", "nq\nn=20"]
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == ["0.0", "42.0", "5.0", "n/a"]  # every value, and hrpo's missing nq
    # base's gsm8k bar has no height: a mark in its colour on the axis shows it
    (zero_bar,) = [p for p in ax.patches if p.get_height() == 0]
    left, right = zero_bar.get_x(), zero_bar.get_x() + zero_bar.get_width()
    assert any(
        list(line.get_ydata()) == [0, 0]
        and list(line.get_xdata()) == pytest.approx([left, right])
        and to_rgba(line.get_color()) == zero_bar.get_facecolor()
        and line.get_linewidth() >= 2
        and line.get_visible()
        for line in ax.lines
    )
    # the paper's marks (83.5, 37.8) sit inside their groups, after the runs' bars
    marks = ax.collections[0].get_offsets()
    assert [round(float(y), 1) for y in marks[:, 1]] == [83.5, 37.8]
    for tick, x in zip(ticks, marks[:, 0]):
        group = [p for p in ax.patches if abs(p.get_x() + p.get_width() / 2 - tick) < 0.5]
        assert max(p.get_x() + p.get_width() for p in group) <= x < tick + 0.5


def _trace(gates):
    return Trace("q", [Position(f"t{i}", g is not None, g, [("a", 0.9)]) for i, g in enumerate(gates)])


@pytest.mark.parametrize("length", [5, 23])
def test_gate_chart_has_integer_position_ticks_and_a_y_label(length, closed_figures):
    traces = [_trace([0.5 + 0.02 * i for i in range(length)]), _trace([0.9] * (length - 1) + [None])]
    assert chart(traces, aggregates(traces))[:4] == b"\x89PNG"
    (fig,) = closed_figures
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks
    assert ax.get_ylabel()
