#!/usr/bin/env bash
# On a lent GPU machine: build, check correctness on the GPU, benchmark, serve.
# Run from the repository root:  bash benchmarks/gpu_check.sh [check|bench|serve|all]   (logs under ${OUT:-/tmp/out})
#   check (~7 min): machine facts, the CUDA extension build, kernel and engine tests on CUDA,
#                   a distributed smoke test (torchrun, one process, NCCL), the training-step benchmark
#   bench (~7 min): op benchmarks, then rollouts, then the summary table and chart
#   serve (~5 min estimated, no GPU run yet; stops by 9.5): the extension build (~1 min on a fresh machine), a random bf16
#                   Qwen2.5-1.5B-shaped model folder in /tmp (~0.5 min), then benchmarks/test_serve_bench.py
#                   on it: hrpo.serve hybrid and plain and `transformers serve --continuous-batching`
#                   at 1, 8 and 32 clients (each level capped at HRPO_SERVE_BENCH_SECONDS, here 20 s);
#                   table, JSON, PNG and server log in $OUT/serve/
# A device call is capped at 10 minutes, so run each phase as its own call (check and bench
# on the same warm machine share the extension's JIT build). The device image has torch,
# triton, transformers, peft and pytest-benchmark but no registry: the tree runs from PYTHONPATH.
# What a call must carry (both are ignored folders that scripts/device_carry.sh fills, once,
# on a machine with PyPI; ../shared beside a checkout does not travel):
#   .shapes   the model shapes (model_shapes.json) every phase's Qwen2.5 models are built from;
#   .whl      the serve phase's wheels (fastapi, uvicorn, pydantic, openai, httpx2, which the image
#             lacks, and their needs), installed here into /tmp/site.
# The device call, as docs/benchmarks.md ("On a lent GPU") gives it:
#   run(command="bash benchmarks/gpu_check.sh serve", carry=[".shapes", ".whl"], timeout_s=600)
set -uo pipefail
PHASE=${1:-all}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [[ -z ${HRPO_MODEL_SHAPES:-} && -f .shapes/model_shapes.json ]]; then
  export HRPO_MODEL_SHAPES=$PWD/.shapes/model_shapes.json  # the carried copy (benchmarks/model_shapes.py)
fi
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"
# 1. The CUDA extension (ninja JIT build through hrpo_kernels._ext; prints why if it fails).
timeout 240 python3 -c "from hrpo_kernels._ext import load_extension as l; print('extension:', l())" 2>&1 | tee "$OUT/build.log"
if [[ $PHASE == check || $PHASE == all ]]; then
  # 2. Correctness of every kernel and of the engine's graph path on the GPU (the CPU suite
  #    ran the kernels only under the interpreter and the engine without graphs).
  timeout 240 python3 -m pytest -q tests/test_kernel_gated_blend.py tests/test_kernel_token_logprobs.py \
    tests/test_kernel_sample_and_mix.py tests/test_kernel_decode_attention.py tests/test_ext_cpu.py \
    tests/test_engine_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -15
  # 3. Distributed smoke test: two optimizer steps of the embedded task under torchrun (NCCL).
  timeout 120 torchrun --nproc-per-node 1 -m hrpo.train --max-steps 2 --train-limit 64 --eval-limit 16 \
    --output-dir "$OUT/dist_smoke" --overwrite 2>&1 | tee "$OUT/dist_smoke.log" | tail -3
  # 4. The training update (reference pass + policy forward and backward) against the eager
  #    baseline at Qwen2.5-1.5B / 3B shapes, the GSM8K and MATH recipes' batches; then the
  #    whole step (rollout of all 512 tokens + update, both run for real: eager_baseline, whose
  #    eager rollout loop takes most of this phase's extra minute, against hrpo).
  timeout 270 python3 -m pytest -q benchmarks/test_train_step_bench.py -k gpu --benchmark-only \
    --benchmark-json "$OUT/bench_train_step.json" --benchmark-columns=median 2>&1 | tee "$OUT/bench_train_step.log" | tail -20
fi
if [[ $PHASE == bench || $PHASE == all ]]; then
  # 5. Benchmarks: ops against their eager references, then rollouts (the slowest last).
  timeout 120 python3 -m pytest -q benchmarks/ -k "not rollout" --benchmark-only --benchmark-json "$OUT/bench_ops.json" \
    --benchmark-columns=median,rounds 2>&1 | tee "$OUT/bench_ops.log" | tail -40
  for m in qwen2.5-1.5b qwen2.5-3b; do  # one JSON per model: a timeout loses one model, not both
    HRPO_BENCH_MODELS=$m timeout 150 python3 -m pytest -q benchmarks/test_rollout_bench.py -k gpu --benchmark-only \
      --benchmark-json "$OUT/bench_rollout_$m.json" --benchmark-columns=median 2>&1 | tee "$OUT/bench_rollout_$m.log" | tail -30
  done
  python3 benchmarks/summarize.py "$OUT"/bench_*.json --png "$OUT/rollout.png" | tee "$OUT/summary.md"
fi
if [[ $PHASE == serve || $PHASE == all ]]; then
  # 6. Serving (issue 18's GPU table). The carried wheels first on the path where the HTTP stack
  #    is missing (the device image). HRPO_SERVE_SHAPE_OVERRIDE (JSON config fields) shrinks the
  #    model to try this phase on a CPU; HRPO_SERVE_BENCH_CLIENTS (e.g. 1,2) sets the levels.
  if [[ -d .whl ]] && ! python3 -c "import fastapi, uvicorn, openai, httpx2" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "gpu_check: installing .whl/*.whl into /tmp/site failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
  model=/tmp/qwen2.5-1.5b-random  # ~3 GB of bf16 weights: kept out of $OUT, which sends files back
  timeout 150 python3 -m benchmarks.model_shapes "$model" --shape Qwen2.5-1.5B-Instruct \
    --override "${HRPO_SERVE_SHAPE_OVERRIDE:-{\}}" 2>&1 | tee "$OUT/serve.log" || exit 1
  # Stopped 30 s before the call's 600 s cap (at least 2 min given): the table is rewritten after
  # each server, so what was measured comes back.
  left=$((570 - SECONDS)); ((left < 120)) && left=120
  HRPO_SERVE_BENCH_MODEL=$model HRPO_SERVE_BENCH_OUT=$OUT/serve HRPO_SERVE_BENCH_SECONDS=${HRPO_SERVE_BENCH_SECONDS:-20} \
    timeout $left python3 -m pytest -q -s benchmarks/test_serve_bench.py 2>&1 | tee -a "$OUT/serve.log"
fi
