"""Tables (markdown, stdout) and a rollout chart (PNG) from pytest-benchmark JSON files.

    python benchmarks/summarize.py bench.json [more.json ...] [--png rollout.png]

Rollout entries (extra_info.tokens_per_s) become one row per (device, model, batch) with a
column per method, the floor and each method's fraction of it; training-update entries one
row per (device, model, recipe) with hrpo's speed-up and memory against the eager baseline;
whole-step entries one row with seconds per optimizer step and hrpo's speed-up over TRL, and
one row per (device, model) of rollout + update against the eager baseline;
other entries are listed with their median time and the extra_info fields that say how close
to the floor they are.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROLLOUT_METHODS = ("eager_reference", "hf_generate", "reference_loop", "engine_plain", "engine_hybrid")
UPDATE_METHODS = ("eager", "hrpo")
STEP_METHODS = ("hrpo_hybrid", "hrpo_grpo", "trl_grpo")
WHOLE_STEP_METHODS = ("eager_baseline", "hrpo")  # test_train_step_bench.whole_step
OP_FIELDS = ("achieved_GBps", "bw_fraction_of_copy", "floor_bytes_us", "peak_mem_MiB")


def load(paths: list[str]) -> tuple[dict, list[dict]]:
    """(machine info of the first file, every benchmark entry of all files)."""
    machine, entries = {}, []
    for p in paths:
        data = json.loads(Path(p).read_text())
        machine = machine or data.get("machine_info", {})
        entries += data.get("benchmarks", [])
    return machine, entries


def rollout_rows(entries: list[dict]) -> dict[tuple, dict]:
    rows: dict[tuple, dict] = defaultdict(dict)
    for e in entries:
        info = e.get("extra_info", {})
        if "tokens_per_s" in info and info.get("method") in ROLLOUT_METHODS:
            key = (info["device"], info["model"], int(info["batch"]))
            rows[key][info["method"]] = info["tokens_per_s"]
            if "floor_tokens_per_s" in info:
                rows[key]["floor"] = info["floor_tokens_per_s"]
    return dict(sorted(rows.items()))


def rollout_table(rows: dict[tuple, dict]) -> str:
    methods = [m for m in ROLLOUT_METHODS if any(m in r for r in rows.values())]
    head = ["device", "model", "batch", *methods, "floor", "hybrid / floor", "hybrid / plain", "hybrid / eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (device, model, batch), r in rows.items():

        def ratio(a, b, r=r):
            return f"{r[a] / r[b]:.2f}" if a in r and b in r else ""

        cells = [
            device,
            model,
            str(batch),
            *(f"{r[m]:,.0f}" if m in r else "" for m in methods),
            f"{r['floor']:,.0f}" if "floor" in r else "",
            ratio("engine_hybrid", "floor"),
            ratio("engine_hybrid", "engine_plain"),
            ratio("engine_hybrid", "eager_reference"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_step_table(entries: list[dict]) -> str:
    """The update (eager vs hrpo: tokens/s, speed-up, peak memory above the weights and its
    ratio) per (device, model, recipe), then the whole step (seconds per optimizer step)."""
    upd: dict[tuple, dict] = defaultdict(dict)
    steps: dict[str, float] = {}
    whole: dict[tuple, dict] = defaultdict(dict)
    for e in entries:
        info = e.get("extra_info", {})
        if info.get("method") in UPDATE_METHODS and "recipe" in info:
            upd[(info["device"], info["model"], info["recipe"])][info["method"]] = info
        elif info.get("method") in STEP_METHODS:
            steps[info["method"]] = info["seconds_per_step"]
        elif info.get("method") in WHOLE_STEP_METHODS and "rollout_s" in info:
            whole[(info["device"], info["model"])][info["method"]] = info
    lines = []
    if upd:
        lines += [
            "| device | model | recipe | eager tok/s | hrpo tok/s | speed-up | eager peak GB | hrpo peak GB "
            "| memory ratio |",
            "|" + "---|" * 9,
        ]
        for (device, model, recipe), r in sorted(upd.items()):
            e, h = r.get("eager", {}), r.get("hrpo", {})
            speed = f"{h['tokens_per_s'] / e['tokens_per_s']:.2f}x" if e and h else ""
            me, mh = e.get("peak_above_weights_gb"), h.get("peak_above_weights_gb")
            mem = f"1/{me / mh:.1f}" if me and mh else ""
            cells = [
                device,
                model,
                recipe,
                f"{e['tokens_per_s']:,.0f}" if e else "",
                f"{h['tokens_per_s']:,.0f}" if h else "",
                speed,
                f"{me:.2f}" if me else "",
                f"{mh:.2f}" if mh else "",
                mem,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if steps:
        head = [m for m in STEP_METHODS if m in steps]
        lines += [
            "",
            "| s / optimizer step | " + " | ".join(head) + " | TRL / hrpo_grpo | TRL / hrpo_hybrid |",
            "|" + "---|" * (len(head) + 3),
        ]
        ratio = {
            m: f"{steps['trl_grpo'] / steps[m]:.2f}x" if "trl_grpo" in steps and m in steps else ""
            for m in ("hrpo_grpo", "hrpo_hybrid")
        }
        lines.append(
            "| cpu, embedded, arith | "
            + " | ".join(f"{steps[m]:.3f}" for m in head)
            + f" | {ratio['hrpo_grpo']} | {ratio['hrpo_hybrid']} |"
        )
    if whole:
        lines += ["", "| s / step: rollout + update | eager_baseline | hrpo | speed-up |", "|---|---|---|---|"]
        for (device, model), r in sorted(whole.items()):

            def cell(m, r=r):
                if m not in r:
                    return ""
                return f"{r[m]['seconds_per_step']:.2f} ({r[m]['rollout_s']:.2f} + {r[m]['update_s']:.2f})"

            speed = (
                f"{r['eager_baseline']['seconds_per_step'] / r['hrpo']['seconds_per_step']:.1f}x" if len(r) == 2 else ""
            )
            lines.append(f"| {device}, {model} | {cell('eager_baseline')} | {cell('hrpo')} | {speed} |")
    return "\n".join(lines)


def ops_table(entries: list[dict]) -> str:
    lines = ["| benchmark | median | " + " | ".join(OP_FIELDS) + " |", "|" + "---|" * (len(OP_FIELDS) + 2)]
    for e in entries:
        info = e.get("extra_info", {})
        if "tokens_per_s" in info or info.get("method") in STEP_METHODS + WHOLE_STEP_METHODS:
            continue
        median = info.get("median_us")
        median = f"{median:,.1f} us" if median is not None else f"{e['stats']['median'] * 1e3:,.3f} ms"
        cells = [f"{info[f]:,.3g}" if isinstance(info.get(f), (int, float)) else "" for f in OP_FIELDS]
        lines.append(f"| {e['name']} | {median} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[tuple, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(d, m) for d, m, _ in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (device, model) in zip(axes[0], groups):
        batches = sorted(b for d, m, b in rows if (d, m) == (device, model))
        series = [m for m in (*ROLLOUT_METHODS, "floor") if any(m in rows[(device, model, b)] for b in batches)]
        width = 0.8 / len(series)
        for i, m in enumerate(series):
            vals = [rows[(device, model, b)].get(m, 0) for b in batches]
            ax.bar(
                [x + i * width for x in range(len(batches))],
                vals,
                width,
                label=m,
                hatch="//" if m == "floor" else None,
                alpha=0.5 if m == "floor" else 1.0,
            )
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(batches))], [f"B={b}" for b in batches])
        values = [v for b in batches for v in rows[(device, model, b)].values() if v > 0]
        if max(values) > 20 * min(values):  # GPU: baselines and floor span decades
            ax.set_yscale("log")
        ax.set_ylabel("new tokens / s")
        ax.set_title(f"rollout throughput, {model} ({device})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--png", help="rollout chart (default: rollout.png beside the first file)")
    args = p.parse_args(argv)
    machine, entries = load(args.files)
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, python {machine.get('python_version', '?')}\n")
    rows = rollout_rows(entries)
    if rows:
        print(rollout_table(rows) + "\n")
        png = Path(args.png) if args.png else Path(args.files[0]).with_name("rollout.png")
        plot(rows, png)
        print(f"chart: {png}\n")
    training = train_step_table(entries)
    if training:
        print(training + "\n")
    if any(
        "tokens_per_s" not in e.get("extra_info", {})
        and e.get("extra_info", {}).get("method") not in STEP_METHODS + WHOLE_STEP_METHODS
        for e in entries
    ):
        print(ops_table(entries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
