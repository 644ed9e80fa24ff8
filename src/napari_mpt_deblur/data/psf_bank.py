"""A bank of precomputed defocus PSFs covering a training distribution, so a sample costs no PSF.

Why a bank works: for an aberration-free widefield objective (NA, immersion index n) the defocus
PSF *in pixel units* depends on only two numbers, ``u = wavelength / pixel`` (the diffraction
spot's size in pixels) and ``r = |dz| tan(theta) / pixel`` (the geometric blur radius in pixels);
the scalar and vectorial models are also symmetric in the sign of ``dz`` (checked in the tests).
So one kernel per objective and per node of a 2D grid over ``(u, r)`` stands in for every draw
of :class:`~napari_mpt_deblur.data.synthesis.DefocusRange` (continuous wavelength, pixel size and
defocus): a draw is snapped to its nearest node.

Grid resolution (measured on real U2OS nuclei, ``tests/test_psf_bank.py``): ``u`` is log-spaced
with neighbouring nodes at most 15 % apart, ``r`` steps by ``0.04 r + 0.05`` px (0.07 px at
0.5 px, 0.53 px at 12 px). Blurring a real image with two neighbouring kernels differs by more than
45 dB PSNR anywhere in the grid, and a snapped draw is at most half a step from its node.

Kernels are computed when first drawn (or all at once by :meth:`PSFBank.prebuild`, about 30 s for
the default training range: psfmodels computes all defocus values of one ``u`` in one call) and
cached on disk as safetensors in the user cache folder, keyed by the distribution's settings, the
kernel side and the psfmodels version (``MPT_DEBLUR_CACHE_DIR`` overrides the folder). Loading
takes milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .psf import PSFParams, auto_size, defocus_psf

#: Bump when the grid or the kernel recipe changes: old cache files are then ignored.
BANK_FORMAT = 1
#: Largest ratio between neighbouring ``u = wavelength / pixel`` nodes.
U_RATIO = 1.15
#: Radius step ``dr = R_REL * r + R_ABS`` px between neighbouring ``r`` nodes.
R_REL, R_ABS = 0.04, 0.05
#: The reference wavelength that node kernels are computed at (only ratios matter).
_REF_WAVELENGTH_UM = 0.5


def cache_dir() -> Path:
    """Folder of cached PSF banks (``MPT_DEBLUR_CACHE_DIR`` overrides the user cache folder)."""
    from ..io.cache import cache_dir as package_cache_dir

    return package_cache_dir("psf_banks")


def radius_nodes(r_min: float, r_max: float) -> np.ndarray:
    """Blur-radius nodes (px) from ``r_min`` to ``r_max`` inclusive, step ``R_REL r + R_ABS``."""
    nodes = [max(0.0, r_min)]
    while nodes[-1] < r_max - 1e-9:
        nodes.append(min(nodes[-1] + R_REL * nodes[-1] + R_ABS, r_max))
    return np.asarray(nodes, dtype=np.float64)


def ratio_nodes(u_min: float, u_max: float) -> np.ndarray:
    """Log-spaced ``wavelength / pixel`` nodes, neighbours at most :data:`U_RATIO` apart."""
    if u_max <= u_min * (1 + 1e-9):
        return np.asarray([u_min])
    n = math.ceil(math.log(u_max / u_min) / math.log(U_RATIO)) + 1
    return np.exp(np.linspace(math.log(u_min), math.log(u_max), n))


@dataclass(frozen=True)
class ObjectiveGrid:
    """The nodes of one objective: ``u`` (wavelength / pixel) x ``r`` (blur radius, px)."""

    na: float
    immersion_index: float
    u: np.ndarray
    r: np.ndarray
    offset: int  # index of this objective's first kernel in the bank

    @property
    def tan_theta(self) -> float:
        return self.na / math.sqrt(self.immersion_index**2 - self.na**2)

    def __len__(self) -> int:
        return len(self.u) * len(self.r)

    def node(self, u: float, r: float) -> int:
        """Bank index of the node nearest to ``(u, r)`` (nearest in log ``u`` and in ``r``)."""
        iu = _nearest(np.log(self.u), math.log(u))
        ir = _nearest(self.r, abs(r))
        return self.offset + iu * len(self.r) + ir


def _nearest(nodes: np.ndarray, value: float) -> int:
    i = int(np.searchsorted(nodes, value))
    if i == 0:
        return 0
    if i >= len(nodes):
        return len(nodes) - 1
    return i if nodes[i] - value < value - nodes[i - 1] else i - 1


def _grids(defocus) -> list[ObjectiveGrid]:
    """One grid per objective of a :class:`DefocusRange`, covering everything it can draw."""
    grids, offset = [], 0
    wavelengths = defocus.channel_wavelengths_um or defocus.wavelength_um
    wl_lo, wl_hi = min(wavelengths), max(wavelengths)
    for obj in defocus.objectives:
        pix_lo, pix_hi = obj.pixel_um
        tan = obj.na / math.sqrt(obj.immersion_index**2 - obj.na**2)
        if defocus.defocus_um is None:
            r_lo, r_hi = defocus.blur_radius_px
        else:
            lo, hi = defocus.defocus_um
            dz_lo = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
            dz_hi = max(abs(lo), abs(hi))
            r_lo, r_hi = dz_lo * tan / pix_hi, dz_hi * tan / pix_lo
        grid = ObjectiveGrid(na=obj.na, immersion_index=obj.immersion_index, u=ratio_nodes(wl_lo / pix_hi, wl_hi / pix_lo),
                             r=radius_nodes(r_lo, r_hi), offset=offset)
        grids.append(grid)
        offset += len(grid)
    return grids


def _psfmodels_version() -> str:
    try:
        from importlib.metadata import version

        return version("psfmodels")
    except Exception:  # noqa: BLE001 - no psfmodels: only the "pupil" model can be used
        return "none"


def bank_key(defocus) -> str:
    """Cache key: every setting that changes a kernel, plus the recipe and psfmodels versions."""
    settings = defocus.model_dump(mode="json", exclude={"peak_photons", "read_sigma_photons", "both_signs"})
    if settings.get("channel_wavelengths_um") is None:  # grey: the key (and cached banks) of before colour existed
        settings.pop("channel_wavelengths_um", None)
    blob = json.dumps({"format": BANK_FORMAT, "u_ratio": U_RATIO, "r_step": [R_REL, R_ABS],
                       "settings": settings, "psfmodels": _psfmodels_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _node_params(grid: ObjectiveGrid, u: float, r: float, model: str, max_kernel: int) -> PSFParams:
    pixel = _REF_WAVELENGTH_UM / u
    params = PSFParams(na=grid.na, immersion_index=grid.immersion_index, wavelength_um=_REF_WAVELENGTH_UM,
                       pixel_um=pixel, defocus_um=r * pixel / grid.tan_theta, model=model)
    return params.model_copy(update={"size": min(auto_size(params), max_kernel)})


def _kernels_for(params: list[PSFParams], model: str) -> list[np.ndarray]:
    """Kernels of several defocus values at one (NA, u): one psfmodels call per kernel size."""
    if model == "pupil":
        return [defocus_psf(p) for p in params]
    import psfmodels

    out: list[np.ndarray | None] = [None] * len(params)
    by_size: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        by_size.setdefault(int(p.size), []).append(i)
    for size, idx in by_size.items():
        p0 = params[idx[0]]
        n = p0.immersion_index
        # z must be a LIST of defocus values in um (a bare number is read as a count of planes).
        stack = psfmodels.make_psf([float(params[i].defocus_um) for i in idx], size, dxy=p0.pixel_um, NA=p0.na,
                                   wvl=p0.wavelength_um, ns=n, ni=n, ni0=n,
                                   model="vectorial" if model == "vectorial" else "scalar")
        for j, i in enumerate(idx):
            k = np.asarray(stack[j], dtype=np.float64)
            out[i] = (k / k.sum()).astype(np.float32)
    return out  # type: ignore[return-value]


class PSFBank:
    """Kernels for one :class:`DefocusRange`: ``kernels`` (N, K, K) float32, filled lazily.

    ``node(objective_index, wavelength_um, pixel_um, defocus_um)`` returns the index of the kernel
    that stands in for that draw; :meth:`ensure` computes the nodes a batch needs that are not
    there yet (grouped, one psfmodels call per objective and ``u``), :meth:`prebuild` all of them.
    A run on a GPU prebuilds (the device should not wait); a CPU run fills nodes as it draws
    them, about 14 ms each the first time. Get a bank with :meth:`for_range` (cached in memory
    and, with what is filled so far, on disk by :meth:`save`).
    """

    def __init__(self, key: str, grids: list[ObjectiveGrid], kernels: np.ndarray, filled: np.ndarray,
                 model: str) -> None:
        self.key = key
        self.grids = grids
        self.kernels = kernels
        self.filled = filled
        self.model = model
        self._dirty = False
        self._device_kernels: dict[str, tuple[object, np.ndarray]] = {}
        self._fill_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.kernels)

    @property
    def kernel_size(self) -> int:
        return int(self.kernels.shape[-1])

    def node(self, objective: int, wavelength_um: float, pixel_um: float, defocus_um: float) -> int:
        grid = self.grids[objective]
        return grid.node(wavelength_um / pixel_um, abs(defocus_um) * grid.tan_theta / pixel_um)

    def node_for_radius(self, objective: int, wavelength_um: float, pixel_um: float, radius_px: float) -> int:
        return self.grids[objective].node(wavelength_um / pixel_um, radius_px)

    def ensure(self, nodes) -> None:
        """Compute the kernels of ``nodes`` (indices) that are not filled yet."""
        wanted = np.unique(np.asarray(nodes, dtype=np.int64).ravel())
        missing = wanted[~self.filled[wanted]]
        if missing.size == 0:
            return
        with self._fill_lock:
            missing = missing[~self.filled[missing]]
            for grid in self.grids:
                mine = missing[(missing >= grid.offset) & (missing < grid.offset + len(grid))] - grid.offset
                for iu in np.unique(mine // len(grid.r)):
                    irs = mine[mine // len(grid.r) == iu] % len(grid.r)
                    _fill(self.kernels, grid, int(iu), irs, self.model)
                    self.filled[grid.offset + iu * len(grid.r) + irs] = True
            self._dirty = True

    def prebuild(self) -> None:
        self.ensure(np.arange(len(self)))

    def on_device(self, device, nodes=None):
        """The kernels as a torch tensor on ``device``; ``nodes`` are filled (and copied) first."""
        import torch

        if nodes is not None:
            self.ensure(nodes)
        key = str(device)
        tensor, copied = self._device_kernels.get(key, (None, None))
        if tensor is None:
            tensor, copied = torch.from_numpy(self.kernels).to(device), self.filled.copy()
        stale = np.nonzero(self.filled & ~copied)[0]
        if stale.size:
            idx = torch.from_numpy(stale)
            tensor[idx.to(tensor.device)] = torch.from_numpy(self.kernels[stale]).to(device)
            copied = self.filled.copy()
        self._device_kernels[key] = (tensor, copied)
        return tensor

    def save(self) -> None:
        """Write the filled kernels to the disk cache if new ones were computed."""
        if self._dirty:
            _write_cached(cache_dir() / f"{self.key}.safetensors", self.kernels, self.filled, self.key)
            self._dirty = False

    def __getstate__(self) -> dict:
        raise TypeError("a PSFBank stays in the process that trains; send its key, not the bank")

    # ---------------------------------------------------------------- building and caching

    _memory: dict[str, PSFBank] = {}
    _lock = threading.Lock()

    @classmethod
    def for_range(cls, defocus) -> PSFBank:
        """The bank of ``defocus`` (a :class:`DefocusRange`): from memory, else from the disk cache
        (what earlier runs filled), else empty; nodes are then filled as they are needed."""
        key = bank_key(defocus)
        with cls._lock:
            bank = cls._memory.get(key)
            if bank is None:
                grids = _grids(defocus)
                count, side = sum(len(g) for g in grids), defocus.max_kernel
                cached = _read_cached(cache_dir() / f"{key}.safetensors", count, side)
                if cached is None:
                    cached = np.zeros((count, side, side), np.float32), np.zeros(count, bool)
                bank = cls(key, grids, cached[0], cached[1], defocus.model)
                cls._memory[key] = bank
            return bank

    @classmethod
    def by_key(cls, key: str) -> PSFBank:
        try:
            return cls._memory[key]
        except KeyError:
            raise KeyError(f"PSF bank {key} was not created in this process (PSFBank.for_range)") from None


def _fill(kernels: np.ndarray, grid: ObjectiveGrid, iu: int, irs: np.ndarray, model: str) -> None:
    side = kernels.shape[-1]
    u = float(grid.u[iu])
    params = [_node_params(grid, u, float(grid.r[ir]), model, side) for ir in irs]
    for ir, k in zip(irs, _kernels_for(params, model)):
        pad = (side - k.shape[0]) // 2
        kernels[grid.offset + iu * len(grid.r) + ir] = 0.0
        kernels[grid.offset + iu * len(grid.r) + ir, pad : pad + k.shape[0], pad : pad + k.shape[1]] = k


def _read_cached(path: Path, count: int, side: int) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        from safetensors.numpy import load_file

        data = load_file(str(path))
        kernels, filled = data["kernels"], data["filled"].astype(bool)
    except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
        return None
    if kernels.shape != (count, side, side) or filled.shape != (count,):
        return None
    return kernels.copy(), filled.copy()


def _write_cached(path: Path, kernels: np.ndarray, filled: np.ndarray, key: str) -> None:
    from safetensors.numpy import save

    from ..io.atomic import write_bytes_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save({"kernels": kernels, "filled": filled.astype(np.uint8)},
                    metadata={"key": key, "format": str(BANK_FORMAT)})
        write_bytes_atomic(path, data)
    except OSError:
        pass  # a read-only cache folder only costs a rebuild next time
