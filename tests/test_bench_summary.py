"""benchmarks/summarize.py turns pytest-benchmark JSON into the tables and chart of RESULTS.md."""

import json

from benchmarks.summarize import main


def entry(name, seconds, **info):
    return {"name": name, "stats": {"median": seconds}, "extra_info": info}


def test_rollout_table_ratios_and_chart(tmp_path, capsys):
    rows = [
        entry(
            "eager_reference-cuda-m-b32",
            2.0,
            method="eager_reference",
            device="cuda",
            model="m",
            batch=32,
            tokens_per_s=1000.0,
            floor_tokens_per_s=40000.0,
        ),
        entry(
            "engine_plain-cuda-m-b32",
            1.0,
            method="engine_plain",
            device="cuda",
            model="m",
            batch=32,
            tokens_per_s=21000.0,
            floor_tokens_per_s=40000.0,
        ),
        entry(
            "engine_hybrid-cuda-m-b32",
            1.0,
            method="engine_hybrid",
            device="cuda",
            model="m",
            batch=32,
            tokens_per_s=20000.0,
            floor_tokens_per_s=40000.0,
        ),
        entry("gated_blend-fused-d8-b4", 1e-5, median_us=10.0, achieved_GBps=100.0),
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": rows}))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("| cuda | m | 32 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:6] == ["1,000", "21,000", "20,000"]
    assert cells[6:] == ["40,000", "0.50", "0.95", "20.00"]  # floor, hybrid/floor, hybrid/plain, hybrid/eager
    assert "| gated_blend-fused-d8-b4 | 10.0 us | 100 |" in out
    assert (tmp_path / "rollout.png").stat().st_size > 1000


def test_training_step_tables(tmp_path, capsys):
    rows = [
        entry(
            "update-eager-cuda-m-gsm8k",
            2.0,
            method="eager",
            device="cuda",
            model="m",
            recipe="gsm8k",
            tokens_per_s=3000.0,
            peak_above_weights_gb=40.0,
        ),
        entry(
            "update-hrpo-cuda-m-gsm8k",
            0.5,
            method="hrpo",
            device="cuda",
            model="m",
            recipe="gsm8k",
            tokens_per_s=9000.0,
            peak_above_weights_gb=4.0,
        ),
        entry("step-hrpo_grpo-cpu-tiny-arith", 0.5, method="hrpo_grpo", seconds_per_step=0.5),
        entry("step-hrpo_hybrid-cpu-tiny-arith", 0.6, method="hrpo_hybrid", seconds_per_step=0.6),
        entry("step-trl_grpo-cpu-tiny-arith", 1.5, method="trl_grpo", seconds_per_step=1.5),
        entry(
            "step-eager_baseline-cuda-q-gsm8k",
            40.0,
            method="eager_baseline",
            device="cuda",
            model="q",
            rollout_s=36.0,
            update_s=3.5,
            seconds_per_step=40.0,
        ),
        entry(
            "step-hrpo-cuda-q-gsm8k",
            5.0,
            method="hrpo",
            device="cuda",
            model="q",
            rollout_s=3.0,
            update_s=1.75,
            seconds_per_step=5.0,
        ),
        entry(
            "step-hrpo-cpu-tiny-random",
            0.25,
            method="hrpo",
            device="cpu",
            model="tiny",
            rollout_s=0.1,
            update_s=0.15,
            seconds_per_step=0.25,
        ),
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": rows}))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    # 9000 / 3000 = 3x faster; 40 / 4 = a tenth of the memory; TRL 1.5 s against 0.5 and 0.6 s.
    assert "| cuda | m | gsm8k | 3,000 | 9,000 | 3.00x | 40.00 | 4.00 | 1/10.0 |" in out
    assert "| cpu, embedded, arith | 0.600 | 0.500 | 1.500 | 3.00x | 2.50x |" in out
    assert "| cuda, q | 40.00 (36.00 + 3.50) | 5.00 (3.00 + 1.75) | 8.0x |" in out  # 40 / 5
    assert "| cpu, tiny |  | 0.25 (0.10 + 0.15) |  |" in out  # no baseline in this file: no ratio
    assert "step-" not in out  # whole-step entries are not listed as ops
