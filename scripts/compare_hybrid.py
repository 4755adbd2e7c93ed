"""HRPO against the plain GRPO baseline on one task over several seeds.

    python scripts/compare_hybrid.py --seeds 0 1 2 --output-dir runs/compare

Runs `hrpo.train` once per (mode, seed) with the task's recipe, then writes
`comparison.json`, `comparison.md` (the table for the README) and `comparison.png`.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from hrpo.train import train
from hrpo.training.config import config_for
from hrpo.training.runs import RunDir, write_json

MODES = {"HRPO": True, "GRPO (--no-hybrid)": False}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, mode in enumerate(MODES):
        runs = [r for r in rows if r["mode"] == mode]
        for j, key in enumerate(("accuracy_before", "accuracy_after")):
            x = i * 3 + j
            values = [r[key] for r in runs]
            ax.bar(
                x,
                statistics.mean(values),
                color=("#bbbbbb", "#3b7dd8")[j],
                label=("before", "after")[j] if i == 0 else None,
            )
            ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    ax.set_xticks([0.5, 3.5], list(MODES))
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"{rows[0]['task']}: before and after training, {len(rows) // len(MODES)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arith")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--output-dir", type=Path, default=Path("runs/compare"))
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --output-dir")
    args = ap.parse_args()
    run = RunDir(args.output_dir, overwrite=args.overwrite).open()  # its manifest lists each run's folder
    rows = []
    for mode, hybrid in MODES.items():
        for seed in args.seeds:
            run_dir = run.path(f"{'hrpo' if hybrid else 'grpo'}-seed{seed}")
            summary = train(config_for(args.task, seed=seed, hybrid=hybrid, output_dir=str(run_dir)))
            run.started()
            rows.append({"mode": mode, **summary})
            write_json(run.path("summary.json"), rows)
    lines = [
        "| method | seed | greedy before | greedy after | sampled before | sampled after | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['seed']} | {r['accuracy_before']:.3f} | {r['accuracy_after']:.3f} | "
            f"{r['sampled_accuracy_before']:.3f} | {r['sampled_accuracy_after']:.3f} | {r['train_seconds'] / 60:.1f} |"
        )
    for mode in MODES:
        runs = [r for r in rows if r["mode"] == mode]
        gain = statistics.mean(r["accuracy_after"] - r["accuracy_before"] for r in runs)
        sgain = statistics.mean(r["sampled_accuracy_after"] - r["sampled_accuracy_before"] for r in runs)
        lines.append(f"| {mode}, mean gain | | | {gain:+.3f} | | {sgain:+.3f} | |")
    run.path("comparison.md").write_text("\n".join(lines) + "\n")
    write_json(run.path("comparison.json"), rows)
    plot(rows, run.path("comparison.png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
