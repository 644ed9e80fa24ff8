"""Devices and precision for inference and training: device choice and listing, the precision
rule, out-of-memory detection, and process-level CPU settings."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import warnings

import torch

_ALLOCATOR_TUNED = False
#: The CUDA device ``"auto"`` picks in this process (set per dask worker by ``distributed.pin_gpus``).
_DEFAULT_CUDA_INDEX: int | None = None


def set_default_cuda_device(index: int | None) -> None:
    """Make ``select_device("auto")`` return ``cuda:index`` (None: plain ``cuda``, the current GPU)."""
    global _DEFAULT_CUDA_INDEX
    _DEFAULT_CUDA_INDEX = index


def select_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then CPU; other names are checked for availability.

    Raises ``ValueError`` with the reason when the requested device cannot be used.
    """
    if isinstance(name, torch.device):
        return name
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            if _DEFAULT_CUDA_INDEX is not None and _DEFAULT_CUDA_INDEX < torch.cuda.device_count():
                return torch.device("cuda", _DEFAULT_CUDA_INDEX)
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available to PyTorch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ValueError("device 'mps' requested but Apple MPS is not available")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def tune_cpu_allocator() -> bool:
    """Keep large CPU tensors in the malloc heap instead of fresh mmap pages (glibc only).

    glibc serves every allocation above 32 MB with a new ``mmap`` and returns it on free, so
    each large activation of a transformer forward pass page-faults all its pages again. On
    the 2-core reference machine that made a 512 x 512 MPT forward pass 2.3x slower than
    4x the 256 x 256 one (13 s instead of 5.6 s). Raising the mmap and trim thresholds lets
    freed blocks be reused. Freed memory is then kept by the process (peak RSS is unchanged).
    Set ``MPT_DEBLUR_NO_MALLOPT=1`` to leave the allocator alone. Returns True if applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("MPT_DEBLUR_NO_MALLOPT") or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    big = ctypes.c_int(2**31 - 1)
    ok = bool(libc.mallopt(m_mmap_threshold, big)) and bool(libc.mallopt(m_trim_threshold, big))
    _ALLOCATOR_TUNED = ok
    return ok


# --------------------------------------------------------------------------------------------
# Precision: one rule for inference and training

#: What a user may ask for; "auto" is resolved per device by :func:`resolve_precision`.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_precision(requested: str, device: torch.device, *, training: bool = False) -> str:
    """The concrete precision ("fp32", "fp16" or "bf16") for a run on ``device``.

    One rule for inference and training; they differ only where noted:

    * ``auto``: bf16 on CUDA GPUs that support it. On older CUDA GPUs training uses fp16 (its
      loss scaler guards against underflow) and inference fp32 (fp16 activations of the
      transformer may overflow, and nothing would catch it). fp32 on CPU and MPS.
    * ``bf16`` on CPU: inference honours it where the CPU computes bf16 natively
      (:func:`cpu_has_native_bf16`: AMX or AVX-512 BF16; on this project's reference CPU the H2T
      U-Net runs 3.4x faster at the same PSNR, docs/performance.md) and otherwise warns and runs fp32 (emulated
      bf16 is slower than fp32). ``fp16`` on CPU: inference warns and runs fp32. Training honours
      both on any CPU (e.g. to test a bf16 run on a laptop).
    * ``auto`` stays fp32 on every CPU: a bf16 result differs from fp32 by up to ~1% of the
      output range at single pixels, so the faster, less exact mode is the user's explicit choice.
    * ``bf16`` on MPS: not supported by MPS autocast; warns and uses fp16.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else ("fp16" if training else "fp32")
        return "fp32"
    if requested in ("fp16", "bf16") and device.type == "cpu" and not training:
        if requested == "bf16" and cpu_has_native_bf16():
            return "bf16"
        where = "on a GPU or a CPU with AMX / AVX-512 BF16" if requested == "bf16" else "on a GPU"
        warnings.warn(f"precision {requested} is only used {where}; running in fp32 on {device}", RuntimeWarning,
                      stacklevel=3)
        return "fp32"
    if requested == "bf16" and device.type == "mps":
        warnings.warn("bf16 autocast is not supported on MPS; using fp16", RuntimeWarning, stacklevel=3)
        return "fp16"
    return requested


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AMX tiles or AVX-512 BF16), where CPU bf16
    autocast is faster than fp32; elsewhere oneDNN emulates it and it is slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def autocast_dtype_for(precision: str) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of a resolved precision; None for fp32 (no autocast)."""
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU allocator failures (``torch.OutOfMemoryError`` or their messages)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def device_choices() -> list[str]:
    """Device names a user may pick (widgets, CLI help): ``auto``, ``cpu``, and the CUDA GPUs and
    MPS this process sees; each is accepted by :func:`select_device`."""
    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        choices.append("mps")
    return choices
