#!/usr/bin/env bash
# The one-shot GPU run: everything a short GPU session should produce, in one command.
#
#   bash scripts/gpu/run_all.sh              # on the GPU machine (OUT set; wheels in .whl, data in .gpu_shared)
#   bash scripts/gpu/run_all.sh --dry-run    # the same steps on this CPU, tiny sizes, ~1-minute training
#
# Steps (each under its own time limit, all under GPU_RUN_BUDGET_S, default 520 s on the GPU):
#   install   carried wheels into a scratch --target; psfmodels compiled from its source
#   env       versions, GPU name and memory
#   pytest    pytest -m gpu tests/test_gpu.py (CUDA = CPU forward, tiled = whole, OOM back-off, bf16 training)
#   models    benchmarks/bench_models.py (forward time per MPT preset)
#   inference benchmarks/bench_inference.py (2048x2048x16 stack and 64 planes of 520x696 before/after
#             batching, Mpx/s per preset against the device's physical limit)
#   training  benchmarks/bench_training.py (training steps/s per preset)
#   train     examples/gpu/mpt_small_fluo_gpu.yaml warm-started from mpt-small-fluo, --time-budget
#             for what is left, best checkpoint exported in float16
#   compare   PSNR/SSIM of the shipped and the new model on the U2OS test split (no StarDist there)
#   summary   summary.json + summary.md
# Only these files are written under $OUT (the device returns at most 8, each < 16 MiB):
#   log.txt, summary.json, summary.md, benchmarks.json, val.csv,
#   mpt-small-fluo-gpu.json, mpt-small-fluo-gpu.safetensors
# Scratch work goes to a temporary folder; the working tree is not written to.
set -uo pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
START=$(date +%s)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/mpt_gpu_run.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
if (( DRY )); then
    OUT=${OUT:-$SCRATCH/out}
    BUDGET=${GPU_RUN_BUDGET_S:-285}
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    DEVICE=cpu
else
    : "${OUT:?set OUT to the folder for the returned files (the device tool sets it)}"
    BUDGET=${GPU_RUN_BUDGET_S:-520}
    PY=${PYTHON:-python3}
    DEVICE=cuda
fi
mkdir -p "$OUT"
LOG=$OUT/log.txt
: > "$LOG"
STEPS=$SCRATCH/steps.jsonl
SHARED=$ROOT/.gpu_shared
[[ -d $SHARED/data ]] || SHARED=${MPT_DEBLUR_SHARED:-$ROOT/../shared}
export MPT_DEBLUR_SHARED=$SHARED PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
cd "$ROOT"

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME MAX_SECONDS RESERVE_SECONDS CMD...: run CMD with a limit of min(MAX, time left - RESERVE);
# its stdout goes to $STEP_OUT when set (a JSON result), else to the log; stderr to the log.
step() {
    local name=$1 max=$2 reserve=$(( $3 * BUDGET / 520 ))  # reserves are sized for the GPU budget
    shift 3
    local limit=$(( $(left) - reserve ))
    (( limit > max )) && limit=$max
    if (( limit < 5 )); then
        log "$name: skipped, out of time"
        echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"note\": \"skipped: out of time\"}" >> "$STEPS"
        return 1
    fi
    log "$name: start (limit ${limit}s): $*"
    local t0=$(date +%s)
    if [[ -n ${STEP_OUT:-} ]]; then
        timeout --kill-after=10 "$limit" "$@" > "$STEP_OUT" 2>> "$LOG"
    else
        timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    fi
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    log "$name: exit $rc after ${dt}s"
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"limit\": $limit}" >> "$STEPS"
    return $rc
}

log "run_all: dry_run=$DRY device=$DEVICE budget=${BUDGET}s root=$ROOT data=$SHARED"

# ---- install -------------------------------------------------------------------------------
if (( ! DRY )) && compgen -G ".whl/*.whl" > /dev/null; then
    SITE=$SCRATCH/site
    install_all() {
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || return 1
        for sd in .whl/sdist/*.tar.gz; do
            [[ -e $sd ]] || continue
            PYTHONPATH=$SITE:$PYTHONPATH bash scripts/gpu/build_psfmodels.sh "$sd" "$SITE" "$PY" || return 1
        done
    }
    step install 120 300 install_all
    export PYTHONPATH=$SITE:$PYTHONPATH
else
    log "install: skipped (dry run or no .whl/: using $PY's packages)"
fi

# ---- env -----------------------------------------------------------------------------------
step env 60 300 "$PY" - "$SCRATCH/env.json" <<'PYEOF'
import json, platform, sys
import torch
import napari_mpt_deblur, numpy, pydantic, dask, zarr
info = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
        "cuda_available": torch.cuda.is_available(), "machine": platform.node()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
try:
    import psfmodels
    info["psfmodels"] = "ok"
except Exception as exc:  # training needs it for the scalar PSF
    info["psfmodels"] = f"missing: {exc}"
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"))
PYEOF
command -v nvidia-smi > /dev/null && nvidia-smi >> "$LOG" 2>&1

# ---- GPU tests -----------------------------------------------------------------------------
step pytest 120 280 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider \
    --basetemp "$SCRATCH/pytest" --junitxml "$SCRATCH/pytest.xml"

# ---- benchmarks ----------------------------------------------------------------------------
if (( DRY )); then
    STEP_OUT=$SCRATCH/bench_models.json step models 60 200 "$PY" benchmarks/bench_models.py --arch mpt \
        --preset tiny --channels 1 --sizes 64 --repeats 1 --threads 1 --json --device cpu
    step inference 120 150 "$PY" benchmarks/bench_inference.py --device cpu --threads 1 --presets tiny \
        --parts small,limit --small-planes 2 --small-size 64x96 --limit-tile 128 --json "$SCRATCH/bench_inference.json"
    STEP_OUT=$SCRATCH/bench_training.json step training 60 130 "$PY" benchmarks/bench_training.py --device cpu \
        --archs mpt --presets tiny --modes efcr --patch 64 --batch 2 --warmup 0 --steps 1 --data-samples 0 \
        --threads 1 --json
else
    STEP_OUT=$SCRATCH/bench_models.json step models 60 330 "$PY" benchmarks/bench_models.py --arch mpt \
        --preset tiny small paper --channels 1 --sizes 1024 --repeats 5 --json --device cuda
    step inference 110 270 "$PY" benchmarks/bench_inference.py --device cuda --presets small,tiny,paper \
        --parts small,stack,limit --stack 16x2048 --small-planes 64 --timeout 60 \
        --image "$SHARED/data/bbbc006_defocused_h01.tif" --json "$SCRATCH/bench_inference.json"
    STEP_OUT=$SCRATCH/bench_training.json step training 60 240 "$PY" benchmarks/bench_training.py --device cuda \
        --archs mpt --presets tiny,small,paper --modes efcr --patch 256 --batch 16 --warmup 2 --steps 5 \
        --data-samples 0 --json
fi

# ---- time-budgeted training, warm-started from the shipped model -----------------------------
"$PY" - examples/gpu/mpt_small_fluo_gpu.yaml "$SCRATCH/train.yaml" "$SHARED" "$DRY" <<'PYEOF' >> "$LOG" 2>&1
"""The GPU config with absolute data paths (into $SHARED); tiny sizes for the dry run."""
import sys
from pathlib import Path
import yaml
src, dst, shared, dry = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), Path(sys.argv[3]).resolve(), sys.argv[4] == "1"
cfg = yaml.safe_load(src.read_text())
def fix(node):
    if isinstance(node, dict):
        return {k: (str(shared / Path(v).as_posix().split("shared/", 1)[1]) if isinstance(v, str) and "shared/data" in v
                    else fix(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [fix(v) for v in node]
    return node
cfg = fix(cfg)
if dry:
    cfg.update(batch_size=1, checkpoint_every=5, patch={"size": 128}, cpu_threads=1)
    cfg["validation"].update(every=5, crop=128)
    cfg["validation"]["data"].update(max_images=1, defocus_um=[4.0])
dst.write_text(yaml.safe_dump(cfg, sort_keys=False))
print("train config:", dst)
PYEOF
if (( DRY )); then MINUTES=1; RESERVE=50; else RESERVE=75; MINUTES=$("$PY" -c "print(max(0.0, round(($(left) - $RESERVE - 30) / 60, 2)))"); fi
if "$PY" -c "import sys; sys.exit(0 if float('$MINUTES') >= 0.5 else 1)"; then
    step train $(( ${MINUTES%.*} * 60 + 120 )) "$RESERVE" "$PY" -m napari_mpt_deblur.cli train --config "$SCRATCH/train.yaml" \
        --out "$SCRATCH/run" --device "$DEVICE" --time-budget "$MINUTES" --init-from mpt-small-fluo
    step export 60 20 "$PY" -m napari_mpt_deblur.cli export "$SCRATCH/run" "$OUT/mpt-small-fluo-gpu" --dtype float16 \
        --name mpt-small-fluo-gpu
    [[ -f $SCRATCH/run/val.csv ]] && cp "$SCRATCH/run/val.csv" "$OUT/val.csv"
else
    log "train: skipped, ${MINUTES} minutes left"
fi

# ---- the new model against the shipped one on the test split ---------------------------------
if [[ -f $OUT/mpt-small-fluo-gpu.json ]]; then
    if (( DRY )); then  # one 128 x 160 crop of a test image: the same command, seconds on a CPU
        mkdir -p "$SCRATCH/dry_sharp"
        "$PY" -c "import sys, glob, tifffile; \
f = sorted(glob.glob(sys.argv[1] + '/*.tif'))[0]; tifffile.imwrite(sys.argv[2], tifffile.imread(f)[:128, :160])" \
            "$SHARED/data/u2os_nuclei/images" "$SCRATCH/dry_sharp/crop.tif" >> "$LOG" 2>&1
        sharp=(--sharp "$SCRATCH/dry_sharp" --defocus 4)
    else
        sharp=(--sharp "$SHARED/data/u2os_nuclei/images" --labels "$SHARED/data/u2os_nuclei/labels" --names-from test)
    fi
    step compare 90 10 "$PY" -m napari_mpt_deblur.cli benchmark "${sharp[@]}" --no-stardist --device "$DEVICE" \
        --methods "input,mpt:mpt-small-fluo@1,mpt:$OUT/mpt-small-fluo-gpu.json@1" --out "$SCRATCH/compare"
fi

# ---- summary -------------------------------------------------------------------------------
"$PY" scripts/gpu/summarize.py "$SCRATCH" "$OUT" --dry-run "$DRY" >> "$LOG" 2>&1 || log "summary: failed"
# Keep the log under the 16 MiB a returned file may have.
if (( $(stat -c %s "$LOG") > 8000000 )); then tail -c 8000000 "$LOG" > "$SCRATCH/log.tail" && mv "$SCRATCH/log.tail" "$LOG"; fi
log "run_all: done in $(( $(date +%s) - START ))s; files: $(ls "$OUT" | tr '\n' ' ')"
"$PY" -c "import json,sys; s=json.load(open('$OUT/summary.json')); sys.exit(0 if s['ok'] else 1)"
