#!/usr/bin/env bash
# The GPU benchmark table: `python bench.py train` for krolik and aist (ctx 1024, bf16 where the
# row says so), every row (HF Trainer default/best, bulba eager/flash/compile/both), on one CUDA GPU,
# well under 10 minutes in all. Made for a bare GPU box: Python 3.12, torch, Lightning,
# transformers; no mlflow (--no-mlflow), no network, no Rust toolchain.
#
# What must travel with the working tree (ignored paths; e.g. the device tool's `carry`):
#   bulba/_rust.abi3.so   the Rust engine, built here (abi3: one build serves 3.11 and 3.12)
#   data/bench/           a prepared dataset:  python prepare.py ../shared/corpus/*.txt --out data/bench --no-mlflow
#   .wheels/              optional: pure-Python wheels for what the box lacks, e.g. the HF Trainer's
#                         `accelerate`:  pip download accelerate --no-deps -d .wheels
# (`datasets` is optional: without it the HF rows read the same blocks through np.memmap; the
#  table says so in its loader column.)
#
# Usage:  scripts/gpu_bench.sh                 (both presets)
#         PRESETS=krolik STEPS=30 scripts/gpu_bench.sh
# Results: $RESULTS/gpu-<preset>.md and .json (RESULTS defaults to $OUT when set, else bench_results),
#          plus gpu-env.txt (nvidia-smi, versions) and gpu-<preset>.log (the row-by-row progress).
set -euo pipefail
cd "$(dirname "$0")/.."

PRESETS=${PRESETS:-"krolik aist"}
DATA=${DATA:-data/bench}
STEPS=${STEPS:-20}             # timed steps per row
WARMUP=${WARMUP:-5}            # untimed; compilation happens here
ROW_TIMEOUT=${ROW_TIMEOUT:-180}
BUDGET=${BUDGET:-240}          # seconds per preset for all its rows (bench.py --time-budget)
CAP_BUDGET=${CAP_BUDGET:-75}   # the extra row: aist under `both` capped at 12 GiB (RTX 3060); 2 x 240 + 75 < 10 min
CAP_GB=${CAP_GB:-12}
RESULTS=${RESULTS:-${OUT:-bench_results}}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}          # cpu: a smoke test of this script on a machine without a GPU
EXTRA_ARGS=${EXTRA_ARGS:-}      # more bench.py train options, e.g. "--set model.n_layer=2"
mkdir -p "$RESULTS"

die() { echo "gpu_bench: $*" >&2; exit 2; }
[ -f bulba/_rust.abi3.so ] || ls bulba/_rust*.so >/dev/null 2>&1 \
  || die "the Rust engine (bulba/_rust*.so) is missing: build it here (pip install -e . or maturin develop) and carry it"
[ -f "$DATA/meta.json" ] || die "no prepared data in $DATA (python prepare.py ../shared/corpus/*.txt --out $DATA --no-mlflow)"
[ "$DEVICE" != cuda ] || $PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || die "torch sees no CUDA GPU"
if ! $PY -c "import accelerate" 2>/dev/null; then
  [ -d .wheels ] || die "accelerate (needed by the HF Trainer) is not installed and there is no .wheels/ to install it from"
  $PY -m pip install --quiet --no-index --no-deps --find-links .wheels accelerate
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  $PY - <<'EOF'
import importlib
import torch
print("python", __import__("sys").version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for m in ("lightning", "transformers", "accelerate", "datasets", "flash_attn", "triton"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, "absent:", type(e).__name__)
EOF
} 2>&1 | tee "$RESULTS/gpu-env.txt"

status=0
for p in $PRESETS; do
  echo "=== $p ==="
  # bench.py keeps to BUDGET itself (rows cut or skipped, stated in the table, which is always
  # written); the outer timeout is only a safety net.
  timeout --kill-after=10 $((BUDGET + 45)) \
    $PY bench.py train --device "$DEVICE" --preset "$p" --data "$DATA" --steps "$STEPS" --warmup "$WARMUP" \
      --row-timeout "$ROW_TIMEOUT" --time-budget "$BUDGET" --no-mlflow --md "$RESULTS/gpu-$p.md" --json "$RESULTS/gpu-$p.json" $EXTRA_ARGS \
      2> >(tee "$RESULTS/gpu-$p.log" >&2) || { echo "gpu_bench: $p exited $?" >&2; status=1; }
done

# Does aist under `both` fit the seed's 12 GB card? The same row with the process capped at
# CAP_GB GiB of device memory (torch.cuda.set_per_process_memory_fraction): past the cap it fails
# with OutOfMemoryError, as it would on that card.
if [[ " $PRESETS " == *" aist "* ]] && [ "$DEVICE" = cuda ]; then
  echo "=== aist, bulba-both, capped at ${CAP_GB} GiB ==="
  timeout --kill-after=10 $((CAP_BUDGET + 45)) \
    $PY bench.py train --device cuda --preset aist --data "$DATA" --rows bulba-both --steps "$STEPS" --warmup "$WARMUP" \
      --row-timeout "$ROW_TIMEOUT" --time-budget "$CAP_BUDGET" --memory-cap-gb "$CAP_GB" --no-mlflow \
      --md "$RESULTS/gpu-aist-${CAP_GB}gb.md" --json "$RESULTS/gpu-aist-${CAP_GB}gb.json" $EXTRA_ARGS \
      2> >(tee "$RESULTS/gpu-aist-${CAP_GB}gb.log" >&2) || { echo "gpu_bench: capped aist exited $?" >&2; status=1; }
fi
exit $status
