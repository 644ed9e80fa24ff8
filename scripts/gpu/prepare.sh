#!/usr/bin/env bash
# Prepare the one-shot GPU run HERE (network: the package registry), before asking for a device.
#
#   bash scripts/gpu/prepare.sh          # -> .whl/ and .gpu_shared/ (both git-ignored), checked
#
# The GPU machine (docs/gpu.md) has Python 3.12, PyTorch and a long list of packages
# (scripts/gpu/device_packages.txt) but none of ours and no network. This script
#  1. downloads cp312 manylinux wheels of every runtime dependency the device lacks, at the
#     versions installed in .venv (scripts/gpu/wheel_list.py), into .whl/; psfmodels has no
#     cp312 wheel, so its source goes into .whl/sdist/ and run_all.sh compiles it there;
#  2. copies the real images the run trains and validates on into .gpu_shared/data/ (the
#     ../shared beside the repository does not travel), re-encoding LZW TIFFs as deflate TIFFs
#     (same pixels; LZW needs imagecodecs, whose 26 MB wheel does not fit in what a call carries);
#  3. checks that the wheels install together into a scratch --target for CPython 3.12 and that
#     the working tree that travels (tracked + untracked files, .whl, .gpu_shared) is under 64 MiB.
# Then: device run with carry [".whl", ".gpu_shared"] and the command in docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
SHARED=${MPT_DEBLUR_SHARED:-$ROOT/../shared}
LIMIT_MIB=${GPU_CARRY_LIMIT_MIB:-64}
PLATFORMS=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64
           --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux2010_x86_64
           --platform manylinux1_x86_64)

echo "== 1. wheels the device lacks (versions from $PY)"
rm -rf .whl && mkdir -p .whl/sdist
mapfile -t reqs < <("$PY" scripts/gpu/wheel_list.py)
for req in "${reqs[@]}"; do
    if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${PLATFORMS[@]}" -d .whl "$req" 2>/dev/null; then
        echo "   wheel  $req"
    else
        "$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl/sdist "$req" 2>/dev/null
        echo "   source $req (no cp312 wheel: built on the device by scripts/gpu/build_psfmodels.sh)"
    fi
done

echo "== 2. data -> .gpu_shared/data"
rm -rf .gpu_shared && mkdir -p .gpu_shared/data
"$PY" - "$SHARED/data" .gpu_shared/data <<'PYEOF'
import shutil, sys
from pathlib import Path
import tifffile
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for sub in ("u2os_nuclei/images", "u2os_nuclei/labels", "bbbc006_w1/in_focus", "bbbc006_w1/defocused_z00"):
    (dst / sub).mkdir(parents=True, exist_ok=True)
    for f in sorted((src / sub).glob("*.tif")):
        with tifffile.TiffFile(f) as tif:
            lzw = tif.pages[0].compression == 5
        if lzw:  # same pixels, deflate (tifffile reads it with zlib alone)
            tifffile.imwrite(dst / sub / f.name, tifffile.imread(f), compression="zlib")
        else:
            shutil.copy2(f, dst / sub / f.name)
# The bundled demo field (LZW) as a deflate TIFF for the inference benchmark (--image).
import napari_mpt_deblur.data.samples as s
tifffile.imwrite(dst / "bbbc006_defocused_h01.tif", s.defocused_bbbc006(), compression="zlib")
print("   ", sum(1 for _ in dst.rglob("*.tif")), "TIFF files")
PYEOF

echo "== 3. checks"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" --target "$scratch/site" .whl/*.whl
echo "   $(ls .whl/*.whl | wc -l) wheels install together into a CPython 3.12 --target"
# Every requirement of what we carry is either carried or on the device (same walk as wheel_list.py).
"$PY" - "$scratch/site" <<'PYEOF'
import sys
from importlib import metadata
from pathlib import Path
sys.path.insert(0, "scripts/gpu")
from wheel_list import DEVICE_ENV, device_packages, norm
from packaging.requirements import Requirement
site = Path(sys.argv[1])
carried = {norm(d.metadata["Name"]) for d in metadata.distributions(path=[str(site)])} | {"psfmodels"}
have = device_packages() | carried
missing = set()
for d in metadata.distributions(path=[str(site)]):
    for text in d.requires or []:
        r = Requirement(text)
        if (r.marker is None or r.marker.evaluate(DEVICE_ENV)) and norm(r.name) not in have:
            missing.add(f"{norm(r.name)} (for {d.metadata['Name']})")
if missing:
    sys.exit("   requirements neither carried nor on the device: " + ", ".join(sorted(missing)))
print(f"   {len(carried)} carried packages: every requirement is carried or on the device")
PYEOF
total=$( { git ls-files -co --exclude-standard -z; find .whl .gpu_shared -type f -print0; } | du -cb --files0-from=- | tail -1 | cut -f1)
mib=$(( (total + 1048575) / 1048576 ))
echo "   travels: ${mib} MiB (limit ${LIMIT_MIB} MiB): .whl $(du -sh .whl | cut -f1), .gpu_shared $(du -sh .gpu_shared | cut -f1)"
if (( mib > LIMIT_MIB )); then echo "prepare: over the ${LIMIT_MIB} MiB a device call carries" >&2; exit 1; fi
echo "prepare: ready. Device run: carry [\".whl\", \".gpu_shared\"], command in docs/gpu.md"
