#!/usr/bin/env bash
# Issue 19's comparison (docs/latent-modes.md, "Comparison"): HRPO, GRPO and soft tokens trained
# on the embedded arith task with the default recipe, then the base model and every trained
# policy evaluated greedy and sampled under plain decoding and each latent mode.
#
#   scripts/latent_comparison.sh OUT_DIR [TRAIN_SEEDS...]     (default seeds: 0)
#
# JOBS processes at a time (default 2, a 2-core machine), OMP_NUM_THREADS=1 each. TRAIN_SEEDS are the
# training seeds: runs OUT_DIR/hrpo_s0, ..., policies hrpo-s0, ... in the table. EVAL_SEEDS
# (default "0 1 2") are compare_latent_modes.py's sampling seeds; LIMIT (default 50) the number
# of held-out questions. A finished training run or evaluation is kept, not redone.
# The result: OUT_DIR/table/latent_modes.{md,json,png} (one row per trained policy) and
# OUT_DIR/by-method/ (HRPO, GRPO and soft tokens, mean and spread over the training seeds).
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 OUT_DIR [TRAIN_SEEDS...]" >&2; exit 2; }
out=$1
shift
seeds=("${@:-0}")
eval_seeds=${EVAL_SEEDS:-0 1 2}
limit=${LIMIT:-50}
jobs=${JOBS:-2}
py=${PYTHON:-python}
export OMP_NUM_THREADS=1
mkdir -p "$out"

declare -A method_flags=([hrpo]="" [grpo]="--no-hybrid" [soft]="--method soft-tokens")

# Run the given commands $jobs at a time; stop at the first failure.
at_a_time() {
    local running=0 cmd
    for cmd in "$@"; do
        bash -c "$cmd" &
        running=$((running + 1))
        if ((running == jobs)); then
            wait -n
            running=$((running - 1))
        fi
    done
    while ((running > 0)); do
        wait -n
        running=$((running - 1))
    done
}

train=()
for seed in "${seeds[@]}"; do
    for method in hrpo grpo soft; do
        run=$out/${method}_s$seed
        [[ -f $run/checkpoint/checkpoint.json ]] && continue # finished earlier
        train+=("$py -m hrpo.train --seed $seed ${method_flags[$method]} --output-dir $run > $run.log 2>&1")
    done
done
at_a_time "${train[@]}"

compare="$py scripts/compare_latent_modes.py --task arith --limit $limit --seeds $eval_seeds --samples 8"
evals=()
[[ -f $out/eval-base/latent_modes.json ]] || evals+=("$compare --output-dir $out/eval-base > $out/eval-base.log 2>&1")
merge=("$out/eval-base/latent_modes.json")
for seed in "${seeds[@]}"; do
    for method in hrpo grpo soft; do
        name=$method-s$seed
        merge+=("$out/eval-$name/latent_modes.json")
        [[ -f $out/eval-$name/latent_modes.json ]] && continue # evaluated earlier
        # eval-base has the base model; each policy runs in its own process, merged below
        evals+=("$compare --policy $name=$out/${method}_s$seed/checkpoint --no-base --output-dir $out/eval-$name > $out/eval-$name.log 2>&1")
    done
done
at_a_time "${evals[@]}"
$py scripts/compare_latent_modes.py --merge "${merge[@]}" --output-dir "$out/table"
$py scripts/compare_latent_modes.py --merge "${merge[@]}" --by-method --output-dir "$out/by-method"
