#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one prepared run on a one-GPU machine (issue 21): installs what the machine
# lacks from carried wheels, installs stepdistill from this checkout, then runs `stepdistill bench gpu` within its
# budget (7 min of parts, 8 min at most in all). Results: OUT_DIR/{attention,train,max_batch,infer}.json,
# OUT_DIR/summary.md (the table for docs/benchmarks.md) and OUT_DIR/bench_gpu.log: six files.
#
#   bash tests/gpu/run_device_bench.sh --prepare          # once, on a machine with PyPI access: fills .whl/
#   bash tests/gpu/run_device_bench.sh OUT_DIR [ARGS...]  # on the GPU machine, from the repository root
#
# ARGS go to `stepdistill bench gpu` (e.g. --parts train max_batch, --budget-s 300, --tiny for a CPU rehearsal).
# The GPU machine has python3 with torch (CUDA), triton, transformers, accelerate, safetensors, huggingface_hub,
# numpy, scipy, pillow, requests, tqdm, pyyaml, zipp; it lacks diffusers, peft (or has another version),
# clean-fid and importlib_metadata, and it cannot reach any package index: those travel as wheels in .whl/
# (7 MB; .whl/ is git-ignored through .git/info/exclude, so name it in the device run's carry list).
set -euo pipefail

WHEELS=(diffusers==0.42.1 peft==0.21.2 clean-fid==0.1.35 importlib_metadata==8.7.0)
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

if [ "${1:-}" = "--prepare" ]; then
    cd "$ROOT"
    grep -qx '/.whl/' "$(git rev-parse --git-path info/exclude)" || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
    for pkg in "${WHEELS[@]}"; do
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "$pkg"
    done
    ls -l .whl
    exit 0
fi

OUT_DIR=$(realpath -m "${1:-bench-gpu-out}")
shift || true
mkdir -p "$OUT_DIR"

# What the machine lacks, then stepdistill itself (its harness installs as stepdistill.eval, so it must be installed,
# not run from the source tree; pip leaves build/ and stepdistill.egg-info/ in the checkout, both git-ignored).
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$ROOT"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# Outside the checkout: its stepdistill/ folder must not shadow the installed package.
cd "$(mktemp -d)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PYTHON" - <<'EOF'
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("diffusers", "peft", "transformers", "accelerate", "triton", "xformers", "stepdistill"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
EOF
"$PYTHON" -m stepdistill.cli bench gpu --dry-run "$@"
timeout --signal=INT --kill-after=20 480 "$PYTHON" -m stepdistill.cli bench gpu --out "$OUT_DIR" "$@"
