#!/usr/bin/env bash
# Set up .venv at the repository root for napari-mpt-deblur.
#   bash scripts/setup_env.sh            -> library, CLI and StarDist (enough for the demo)
#   bash scripts/setup_env.sh --testing  -> everything the test suite needs, incl. napari + Xvfb
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="stardist"
need_display=0
if [[ "${1:-}" == "--testing" ]]; then extras="testing"; need_display=1; fi

# System packages for headless napari (Xvfb, Mesa GL, xcb): only for the tests. Qt 6's xcb platform
# plugin (PyQt6) needs libxcb-cursor0, libegl1 and libglib2.0-0 beyond what Qt 5 needed.
if [[ $need_display == 1 ]] && ! command -v xvfb-run >/dev/null 2>&1; then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq xvfb xauth libgl1-mesa-dri libgl1 libegl1 libxkbcommon-x11-0 \
    libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
    libxcb-xinput0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libglib2.0-0 libdbus-1-3 libfontconfig1 >/dev/null
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
# torch first: the CPU build from local disk here (TORCH_SPEC overrides, e.g. a CUDA build elsewhere),
# so that the project's bare "torch" requirement does not pull a several-GB CUDA build.
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[${extras}]"
# The tests run napari on Qt 6 (PyQt6). A PyQt5 left over from an older setup would still be chosen
# first by qtpy, so remove it from this .venv.
if [[ $need_display == 1 ]] && .venv/bin/python -m pip show -q PyQt5 >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -y -q PyQt5 PyQt5-Qt5 PyQt5-sip
fi
echo "environment ready: .venv (extras: ${extras})"
