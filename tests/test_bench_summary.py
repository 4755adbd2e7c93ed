"""benchmarks/summarize.py turns pytest-benchmark JSON into the tables and chart of RESULTS.md."""
import json

from benchmarks.summarize import main


def entry(name, seconds, **info):
    return {"name": name, "stats": {"median": seconds}, "extra_info": info}


def test_rollout_table_ratios_and_chart(tmp_path, capsys):
    rows = [
        entry("eager_reference-cuda-m-b32", 2.0, method="eager_reference", device="cuda", model="m", batch=32,
              tokens_per_s=1000.0, floor_tokens_per_s=40000.0),
        entry("engine_plain-cuda-m-b32", 1.0, method="engine_plain", device="cuda", model="m", batch=32,
              tokens_per_s=21000.0, floor_tokens_per_s=40000.0),
        entry("engine_hybrid-cuda-m-b32", 1.0, method="engine_hybrid", device="cuda", model="m", batch=32,
              tokens_per_s=20000.0, floor_tokens_per_s=40000.0),
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
