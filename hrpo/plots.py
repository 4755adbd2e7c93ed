"""Training curves as a PNG."""
from __future__ import annotations

from pathlib import Path

PANELS = (("reward", "reward (mean)"), ("kl", "KL to reference"), ("gate_a", "gate a over thinking tokens"), ("completion_tokens", "completion tokens"))


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    steps = [r["step"] for r in records]
    for ax, (key, label) in zip(axes, PANELS):
        values = [r.get(key, float("nan")) for r in records]
        ax.plot(steps, values, lw=0.8, alpha=0.5)
        if len(values) >= 10:  # a running mean shows the trend through GRPO's noise
            w = max(len(values) // 20, 5)
            smooth = [sum(values[max(0, i - w + 1) : i + 1]) / len(values[max(0, i - w + 1) : i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, lw=1.8)
        ax.set_title(label)
        ax.set_xlabel("device step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
