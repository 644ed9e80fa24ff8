"""Test-session settings shared by every test module."""

from __future__ import annotations

import os

# Keep TensorFlow quiet; it is imported only by the StarDist tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


_CACHE = None


def pytest_configure(config):
    # PSF banks are cached per user; tests keep theirs in a folder of their own.
    global _CACHE
    import tempfile

    if "MPT_DEBLUR_CACHE_DIR" not in os.environ:
        _CACHE = tempfile.TemporaryDirectory(prefix="mpt-deblur-test-cache-")
        os.environ["MPT_DEBLUR_CACHE_DIR"] = _CACHE.name
    # Same allocator setting as the CLI and the napari widgets (large forward passes otherwise
    # page-fault every activation again; see inference.devices.tune_cpu_allocator).
    from napari_mpt_deblur.inference.devices import tune_cpu_allocator

    tune_cpu_allocator()
    # One intra-op thread for the whole suite: the tests run many small forward passes, and on a
    # 2-core machine two threads per op wait on each other whenever anything else holds a core
    # (measured here: 5-9x slower under load, same results). Tests that need more set it locally.
    import torch

    torch.set_num_threads(1)


def pytest_unconfigure(config):
    # Stop the StarDist worker process here, while pytest still runs: at interpreter exit
    # concurrent.futures joins its manager threads first and would wait on a stuck worker forever.
    from napari_mpt_deblur.evaluation.stardist_process import shutdown

    shutdown()
    if _CACHE is not None:
        _CACHE.cleanup()


import pathlib

import pytest

#: The project's shared real data lives beside the repository (``<repo>/../shared``) in CI and here;
#: ``MPT_DEBLUR_SHARED`` overrides. Tests must find it through this, never by an absolute path.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = pathlib.Path(os.environ.get("MPT_DEBLUR_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """``<shared>/data``: U2OS nuclei and BBBC006 real images (see its README)."""
    data = SHARED_DIR / "data"
    if not data.is_dir():
        pytest.fail(f"shared data not found at {data}: clone the repo beside ../shared or set MPT_DEBLUR_SHARED")
    return data


@pytest.fixture
def wait_for_worker(qtbot):
    """``wait_for_worker(widget, timeout_ms)``: block until the widget's worker finished and its
    callbacks ran.

    Waiting on ``worker.finished`` with ``qtbot.waitSignal`` misses the signal when a worker ends
    before the wait starts (an input error is reported within milliseconds); every widget sets
    ``worker = None`` in its finished callback, on the GUI thread, so poll that instead.
    """

    def wait(widget, timeout_ms: int = 120_000) -> None:
        qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout_ms)

    return wait


@pytest.fixture
def fake_oom_model():
    """A class wrapping a model like a GPU that runs out of memory (there is no GPU here, so the
    error is injected on the CPU): ``FakeOOM(inner, max_pixels)`` refuses any batch with more than
    ``max_pixels`` (batch x height x width) and records the shapes it was given in ``shapes``."""
    import torch

    class FakeOOM(torch.nn.Module):
        def __init__(self, inner, max_pixels):
            super().__init__()
            self.inner = inner
            self.max_pixels = max_pixels
            self.shapes = []

        def forward(self, x):
            self.shapes.append(tuple(x.shape))
            if x.shape[0] * x.shape[2] * x.shape[3] > self.max_pixels:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake, injected by the test)")
            return self.inner(x)

    return FakeOOM


#: A tiny MPT (a few thousand parameters): fast enough for training-loop tests on a CPU.
MICRO_MPT = {"preset": "micro", "dim": 8, "heads": (1, 2), "scales": ((0.5, 1.0), (1.0, 1.0)), "window_size": 4}


@pytest.fixture(scope="session")
def micro_model_path(tmp_path_factory) -> pathlib.Path:
    """A saved, untrained :data:`MICRO_MPT` model (seed 0); tests copy it before changing it."""
    import torch

    from napari_mpt_deblur.models.config import MPTConfig
    from napari_mpt_deblur.models.registry import build_model, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "micro"
    save_model(build_model(MPTConfig(**MICRO_MPT)), path, name="micro", trained=False)
    return path


@pytest.fixture(autouse=True)
def _no_preload_outlives_its_test():
    """A Deblur widget's background preload (torch import, model load, one warm-up tile: seconds
    for the default MPT) ends inside the test that started it, before the test's viewer and Qt
    objects are torn down."""
    yield
    import threading

    for thread in threading.enumerate():
        if thread.name == "mpt-deblur-preload":
            thread.join(timeout=300)
