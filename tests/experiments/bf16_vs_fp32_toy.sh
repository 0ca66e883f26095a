#!/usr/bin/env bash
# Issue 33 item 2: the accuracy cost of training bf16 end to end, on the toy world.
#
# For the demo preset (configs/toy/dmd_1step.yaml at the demo's 300 student updates) and configs/toy/tscd_4step.yaml,
# three training seeds each, the same run with the base and its activations in bf16 (model.dtype=bf16,
# loop.mixed_precision=bf16_pure: no autocast, norms in bf16) against fp32 (model.dtype=fp32, no autocast); then toy
# FID and alignment of each final LoRA (stepdistill eval toy, n images, eval seed 0, the recipe's steps), and a table
# of the mean and spread over seeds per preset and precision.
#
#   bash tests/experiments/bf16_vs_fp32_toy.sh                  # everything: 2 presets x 2 precisions x 3 seeds
#   STEPS=150 bash tests/experiments/bf16_vs_fp32_toy.sh        # the first 150 updates of each run (say so)
#   PRESETS=demo PRECISIONS=bf16_pure SEEDS=0 STEPS=4 N=16 OUT=/tmp/bf16_smoke \
#     EXTRA="--set data.images=toy:256 --set data.batch_size=4 --set method.regression_pairs=16 \
#            --set method.regression_teacher_steps=4" bash tests/experiments/bf16_vs_fp32_toy.sh   # one leg, a smoke test
#
# Environment: OUT (runs/bf16_vs_fp32), STEPS (empty = the preset's length), SEEDS ("0 1 2"), PRESETS ("demo tscd4"),
# PRECISIONS ("fp32 bf16_pure"; bf16 = autocast over a bf16 base, a third leg if wanted), N (500 eval images),
# STEPDISTILL (the command, default .venv/bin/stepdistill), NICE (15), CHECKPOINT_EVERY (the preset's; a bf16 leg on these
# CPUs takes over an hour, and a smaller interval lets a killed leg resume where it stopped, bit-identically), EXTRA (more --set overrides, for smoke tests only). A run whose final LoRA exists is not trained
# again and an evaluation whose JSON exists is not redone, so rerunning the script continues where it stopped.
set -euo pipefail

OUT=${OUT:-runs/bf16_vs_fp32}
SEEDS=${SEEDS:-"0 1 2"}
PRESETS=${PRESETS:-"demo tscd4"}
PRECISIONS=${PRECISIONS:-"fp32 bf16_pure"}
N=${N:-500}
STEPS=${STEPS:-}
STEPDISTILL=${STEPDISTILL:-.venv/bin/stepdistill}
NICE=${NICE:-15}
EXTRA=${EXTRA:-}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

preset_file() {  # preset name -> YAML and the steps its student is evaluated at
  case "$1" in
    demo) echo "configs/toy/dmd_1step.yaml 1" ;;
    tscd4) echo "configs/toy/tscd_4step.yaml 4" ;;
    *) echo "unknown preset $1 (use demo or tscd4)" >&2; exit 2 ;;
  esac
}

precision_sets() {  # precision name -> config overrides
  case "$1" in
    fp32) echo "--set model.dtype=fp32 --set loop.mixed_precision='no'" ;;  # quoted: YAML reads a bare no as false
    bf16_pure) echo "--set model.dtype=bf16 --set loop.mixed_precision=bf16_pure" ;;
    bf16) echo "--set model.dtype=bf16 --set loop.mixed_precision=bf16" ;;
    *) echo "unknown precision $1 (use fp32, bf16_pure or bf16)" >&2; exit 2 ;;
  esac
}

mkdir -p "$OUT"
for preset in $PRESETS; do
  read -r config eval_steps <<<"$(preset_file "$preset")"
  # The demo trains its preset for 300 student updates (stepdistill/demo.py, FULL); tscd_4step its own 900.
  length=$([ "$preset" = demo ] && echo 300 || echo "")
  length=${STEPS:-$length}
  for precision in $PRECISIONS; do
    for seed in $SEEDS; do
      run="$OUT/$preset-$precision-seed$seed${STEPS:+-first$STEPS}"
      if [ ! -f "$run/final/stepdistill.json" ]; then
        # shellcheck disable=SC2046
        nice -n "$NICE" "$STEPDISTILL" train --config "$config" --output-dir "$run" --set seed="$seed" \
          --set loop.progress=false $(precision_sets "$precision") ${length:+--set loop.max_steps=$length} \
          ${CHECKPOINT_EVERY:+--set loop.checkpoint_every=$CHECKPOINT_EVERY} $EXTRA
      fi
      if [ ! -f "$run/eval.json" ]; then
        nice -n "$NICE" "$STEPDISTILL" eval toy --lora "$run/final" --steps "$eval_steps" --n "$N" --out "$run/eval.json"
      fi
    done
  done
done

# The table: mean and sample standard deviation over seeds of toy FID and alignment, per preset and precision.
OUT="$OUT" SEEDS="$SEEDS" PRESETS="$PRESETS" PRECISIONS="$PRECISIONS" STEPS="$STEPS" python3 - <<'EOF'
import json
import os
import statistics
from pathlib import Path

out, steps = Path(os.environ["OUT"]), os.environ["STEPS"]
print(f"| preset | precision | seeds | toy FID (each) | FID mean +- sd | alignment (each) | alignment mean +- sd |"
      f"{' first ' + steps + ' updates' if steps else ''}")
print("|---|---|---|---|---|---|---|")
for preset in os.environ["PRESETS"].split():
    for precision in os.environ["PRECISIONS"].split():
        rows = []
        for seed in os.environ["SEEDS"].split():
            f = out / f"{preset}-{precision}-seed{seed}{'-first' + steps if steps else ''}" / "eval.json"
            if f.is_file():
                rows.append(json.loads(f.read_text()))
        if not rows:
            continue
        fid = [r["toy_fid"] for r in rows]
        ali = [r["alignment"] for r in rows]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else float("nan"))
        print(f"| {preset} | {precision} | {len(rows)} | {' / '.join(f'{v:.1f}' for v in fid)} | "
              f"{statistics.mean(fid):.1f} +- {sd(fid):.1f} | {' / '.join(f'{v:.3f}' for v in ali)} | "
              f"{statistics.mean(ali):.3f} +- {sd(ali):.3f} |")
EOF
