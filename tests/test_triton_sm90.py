"""Every Triton kernel compiles for an H100 (sm_90) at the paper's model shapes, in bf16 and
fp32, through the launchers' GPU configurations (autotune candidates included), and fits an
sm_90 block's shared memory; a configuration that would not fit is refused by the op. The
interpreter, which runs the rest of the suite, executes fp32 dots only and never checks
tiles against a GPU's limits, so this is the check of those paths on a machine with no GPU.
It runs tests/sm90_compile.py in a subprocess with an empty Triton cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {
    "_gated_blend_fwd_kernel",
    "_gated_blend_bwd_kernel",
    "_full_partial_kernel",
    "_full_reduce_kernel",
    "_topk_tail_kernel",
    "_tlp_fwd_kernel",
    "_tlp_grad_logits_kernel",
    "_partial_kernel",
    "_reduce_kernel",
}
REFUSED = {  # full-vocabulary sampling past the widths whose tiles fit (sample_and_mix.MAX_D_FULL_VOCAB)
    "sample_and_mix bfloat16 d3072 top_k0",
    "sample_and_mix float32 d1536 top_k0",
    "sample_and_mix float32 d2048 top_k0",
    "sample_and_mix float32 d3072 top_k0",
}


def test_triton_kernels_compile_for_sm90(tmp_path):
    try:
        from triton.backends import backends
    except ImportError as exc:
        pytest.skip(f"triton has no backends module here: {exc}")
    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sm90_compile.py")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    compiled = [r for r in rows if "kernel" in r]
    assert {r["kernel"] for r in compiled} == KERNELS
    too_big = [r for r in compiled if not r["ok"]]
    assert not too_big, f"kernels that would not launch on an H100 (shared memory): {too_big}"
    assert {r["case"] for r in rows if r.get("refused")} == REFUSED
