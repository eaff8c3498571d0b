#!/usr/bin/env bash
# GPU smoke benchmark, under 5 minutes on one GPU machine:
#   1. builds a synth shard set (CUB layout, short side 256, like shards/cub256),
#   2. bench/train_step.py: resnet50 at 224 px, bf16, channels_last, batch 128 -> GPU images/s,
#   3. bench/loader.py on that set with every core as a loader worker -> loader images/s,
#   4. says whether the loader keeps ahead of the GPU (and how many cores the GPU would need).
#
#   bash bench/gpu_smoke.sh            # from anywhere; uses .venv/bin/python when present
#
# Environment overrides (defaults in brackets): PYTHON [.venv/bin/python or python], WORKERS [nproc],
# ARCH [resnet50], IMAGE_SIZE [224], PRECISION [bf16], BATCH [128], STEPS [30], LOADER_SECONDS [20],
# WORK [a temporary directory, removed at the end], ALLOW_CPU [0: refuse to run without a CUDA GPU].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
WORKERS=${WORKERS:-$(nproc)}
ARCH=${ARCH:-resnet50} IMAGE_SIZE=${IMAGE_SIZE:-224} PRECISION=${PRECISION:-bf16}
BATCH=${BATCH:-128} STEPS=${STEPS:-30} LOADER_SECONDS=${LOADER_SECONDS:-20}
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${ALLOW_CPU:-0}" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "error: no CUDA GPU visible to torch (ALLOW_CPU=1 runs the same steps on CPU)" >&2
    exit 1
fi
if [ -n "${WORK:-}" ]; then mkdir -p "$WORK"; else WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
start=$SECONDS

echo "== 1/3 synth shard set in $WORK ($WORKERS cores)"
"$PY" -m pipeline synth --out "$WORK/src" --classes 25 --per-class 60 --seed 0 >/dev/null
"$PY" -m pipeline build --source "$WORK/src/CUB_200_2011" --out "$WORK/shards" --resize-short 256 \
    --shard-samples 16 --workers "$WORKERS" --quiet

echo "== 2/3 train step: $ARCH at $IMAGE_SIZE px, $PRECISION, channels_last, batch $BATCH, $STEPS steps"
step_out=$("$PY" bench/train_step.py --arch "$ARCH" --image-size "$IMAGE_SIZE" --precision "$PRECISION" \
    --batch-size "$BATCH" --steps "$STEPS")
echo "$step_out"
gpu=$(sed -n 's/^train_step img\/s: *//p' <<<"$step_out" | tail -1)

echo "== 3/3 loader: $WORKERS workers, $IMAGE_SIZE px, ${LOADER_SECONDS} s"
load_out=$("$PY" bench/loader.py --shards "$WORK/shards" --workers "$WORKERS" --image-size "$IMAGE_SIZE" \
    --seconds "$LOADER_SECONDS")
echo "$load_out"
loader=$(sed -n 's/^loader img\/s: *//p' <<<"$load_out" | tail -1)

if [ -z "$gpu" ] || [ -z "$loader" ]; then
    echo "error: a benchmark did not print its 'img/s:' line (train_step: '${gpu}', loader: '${loader}')" >&2
    exit 1
fi
"$PY" - "$gpu" "$loader" "$WORKERS" "$((SECONDS - start))" <<'PY'
import math
import sys

gpu, loader, workers, elapsed = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print(f"train_step img/s: {gpu:.1f}")
print(f"loader img/s: {loader:.1f}  ({workers} workers, {loader / workers:.0f} img/s per core)")
if loader >= gpu:
    print(f"loader keeps ahead of the GPU: yes ({loader / gpu:.2f}x the GPU's rate)")
else:
    need = math.ceil(gpu / (loader / workers))
    print(f"loader keeps ahead of the GPU: NO ({loader / gpu:.2f}x); about {need} loader cores would keep up")
print(f"gpu_smoke: {elapsed} s")
PY
