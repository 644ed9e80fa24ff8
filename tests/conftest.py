"""Test-session settings shared by every test module."""

from __future__ import annotations

import os

# Keep TensorFlow quiet; it is imported only by the StarDist tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    # Same allocator setting as the CLI and the napari widgets (large forward passes otherwise
    # page-fault every activation again; see inference.devices.tune_cpu_allocator).
    from napari_mpt_deblur.inference.devices import tune_cpu_allocator

    tune_cpu_allocator()
