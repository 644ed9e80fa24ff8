#!/usr/bin/env bash
# Build psfmodels (C++ / pybind11) from its source distribution into a --target folder.
# PyPI has no cp312 wheel of psfmodels 0.3.3, so the GPU run compiles its one extension file
# there (g++, pybind11 and the Python headers are on the device image; ~20 s).
#   usage: bash scripts/gpu/build_psfmodels.sh SDIST.tar.gz TARGET_DIR [PYTHON]
set -euo pipefail
sdist=$1; target=$2; py=${3:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar xzf "$sdist" -C "$work"
src=$(echo "$work"/psfmodels-*)
mkdir -p "$target"
ext=$("$py" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
inc=$("$py" -c "import pybind11, sysconfig; print(pybind11.get_include(), sysconfig.get_paths()['include'])")
flags=()
for d in $inc; do flags+=(-I "$d"); done
g++ -O3 -shared -std=c++17 -fPIC -fvisibility=hidden "${flags[@]}" "$src/src/_psfmodels/pythonBindings.cpp" \
    -o "$target/_psfmodels$ext"
cp -r "$src/src/psfmodels" "$target/"
PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "import psfmodels, numpy as np; \
p = psfmodels.make_psf(np.array([0.0]), nx=15, dxy=0.1, NA=0.45, ns=1.0, ni=1.0, ni0=1.0); \
assert np.isfinite(p).all() and p.max() > 0; print('psfmodels built:', psfmodels.__file__)"
