"""Training curves as a PNG: each metric raw and as a moving average, plain-number axes."""

from __future__ import annotations

import io
from pathlib import Path

from hrpo.training.runs import replace_file

PANELS = (
    ("reward", "mean reward"),
    ("kl", "KL to reference"),
    ("gate_a", "gate a over thinking tokens"),
    ("completion_tokens", "completion tokens"),
    ("eval_accuracy", "held-out accuracy (greedy)"),
)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values, skipping missing ones (None / NaN)."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1) : i + 1] if v is not None and v == v]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def pyplot():
    """matplotlib.pyplot drawing to files only (the Agg backend: no display needed), imported
    when the first picture is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_ticks(axis) -> None:
    """Ticks at whole numbers only (steps and positions: no 2.5)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def png(fig, dpi: int) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> None:
    panels = [(k, label) for k, label in PANELS if any(r.get(k) is not None for r in records)]
    fig, axes = pyplot().subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        steps, values = [p[0] for p in points], [float(p[1]) for p in points]
        sparse = key == "eval_accuracy"  # a few evaluations: markers, no smoothing
        ax.plot(
            steps,
            values,
            lw=0.8,
            alpha=0.5 if not sparse else 1.0,
            marker="o" if sparse else None,
            ms=3,
            label="value" if sparse else "raw",
        )
        if not sparse and len(values) >= 10:
            window = max(len(values) // 20, 5)
            ax.plot(steps, moving_average(values, window), lw=1.8, label=f"moving average ({window} steps)")
        ax.set_title(label)
        ax.set_xlabel("device step")
        integer_ticks(ax.xaxis)
        ax.set_ylabel(label)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)  # 0.997, not 1e-3 + 0.996
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    replace_file(path, png(fig, 110))  # redrawn at each checkpoint: never a half-written PNG
