#!/usr/bin/env bash
# Fill the two ignored folders a device call carries for benchmarks/gpu_check.sh:
#   .whl/     the wheels of the serve phase's Python packages that the device image lacks
#             (Python 3.12, manylinux x86-64; versions pinned to the ones the CPU tests ran on),
#   .shapes/  a copy of ../shared/model_shapes.json (../shared beside a checkout does not travel).
# Run once from the repository root on a machine with PyPI access:  bash scripts/device_carry.sh
# then name both in the device call's carry (docs/benchmarks.md, "On a lent GPU").
set -euo pipefail
PY=${PYTHON:-python3}
# hrpo.serve (fastapi, uvicorn and their needs), the load generator (httpx2) and
# `transformers serve` (fastapi, uvicorn, pydantic and openai). The image has click, typer and
# certifi; the rest is pinned here even where the image has an older copy, so that one
# consistent set sits first on PYTHONPATH.
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.3
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 anyio==4.16.0 uvicorn==0.55.0 h11==0.16.0
  httpx2==2.16.2 httpcore2==2.16.2 idna==3.20 truststore==0.10.5
  openai==3.63.0 jiter==0.19.0 sniffio==1.3.1
)
SHAPES=${HRPO_MODEL_SHAPES:-../shared/model_shapes.json}

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for dir in .whl .shapes; do
  git check-ignore -q "$dir/x" || echo "/$dir/" >>"$exclude"
done

mkdir -p .whl .shapes
cp "$SHAPES" .shapes/model_shapes.json
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${WHEELS[@]}"
# One version of each package: a second (left from an older pin) stops the device's install.
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
if [[ -n $dupes ]]; then
  echo "device_carry: .whl holds two versions of: $dupes (delete the older ones)" >&2
  exit 1
fi
du -sh .whl .shapes
