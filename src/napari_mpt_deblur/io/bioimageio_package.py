"""Reading bioimage.io model packages written by :mod:`napari_mpt_deblur.io.bioimageio`.

A package made by ``mpt-deblur export --format bioimageio`` carries our own model files as
attachments (``<name>.safetensors`` and ``<name>.json``): :func:`import_bioimageio` checks their
SHA-256 against ``rdf.yaml`` and unpacks them into a cache folder, so nothing from a package is
ever unpickled or executed. A bioimage.io package made by other tools (no such attachments) is
refused with a message that says so.

Needs only PyYAML (no ``bioimageio`` extra, no torch): :func:`napari_mpt_deblur.models.registry.resolve_model_path`
uses it to accept a package wherever a model file is expected. The exporter is in
:mod:`napari_mpt_deblur.io.bioimageio`, which re-exports these names.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..models.record import ModelFileError, read_record


class BioimageioError(ValueError):
    """A bioimage.io package cannot be written or read (the message says which file and why)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



# --------------------------------------------------------------------------------------------
# Import


def is_bioimageio_package(path: str | os.PathLike) -> bool:
    """True for a ``.zip`` holding ``rdf.yaml``/``bioimageio.yaml``, such a folder, or such a YAML file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".zip":
        try:
            with zipfile.ZipFile(p) as zf:
                return any(n in ("rdf.yaml", "bioimageio.yaml") or n.endswith(".bioimageio.yaml")
                           for n in zf.namelist())
        except zipfile.BadZipFile:
            return False
    if p.is_dir():
        return (p / "rdf.yaml").is_file() or (p / "bioimageio.yaml").is_file()
    return p.is_file() and (p.name in ("rdf.yaml", "bioimageio.yaml") or p.name.endswith(".bioimageio.yaml"))


def imports_dir() -> Path:
    """Where imported packages are unpacked (``MPT_DEBLUR_CACHE_DIR`` overrides the user cache folder)."""
    from .cache import cache_dir

    return cache_dir("bioimageio")


class _Package:
    """Read access to the files of a package given as a zip, a folder or its YAML file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip = None
        if path.is_file() and path.suffix == ".zip":
            self._zip = zipfile.ZipFile(path)
            names = self._zip.namelist()
            self.rdf_name = next((n for n in ("rdf.yaml", "bioimageio.yaml") if n in names), None) or next(
                n for n in names if n.endswith(".bioimageio.yaml"))
            self.root = None
        else:
            if path.is_dir():
                path = next(p for p in (path / "rdf.yaml", path / "bioimageio.yaml") if p.is_file())
            self.rdf_name = path.name
            self.root = path.parent

    def read(self, name: str) -> bytes:
        if Path(name).is_absolute() or ".." in Path(name).parts or "://" in name:
            raise BioimageioError(f"{self.path}: refers to {name!r} outside the package; only packaged files are read")
        try:
            if self._zip is not None:
                return self._zip.read(name)
            return (self.root / name).read_bytes()
        except (KeyError, FileNotFoundError) as exc:
            raise BioimageioError(f"{self.path}: {name} is missing from the package") from exc

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _source_name(entry: Any) -> tuple[str, str | None]:
    if isinstance(entry, dict):
        return str(entry.get("source", "")), entry.get("sha256")
    return str(entry), None


def import_bioimageio(path: str | os.PathLike) -> Path:
    """The record path (``.json``) of our model inside a bioimage.io package, unpacked into the cache.

    Only packages written by :func:`export_bioimageio` are accepted: their attachments hold our
    safetensors + JSON model files, which are checked against the SHA-256 in ``rdf.yaml`` (and the
    weights against the record's own checksum when the model is loaded). Nothing is unpickled.
    """
    import yaml


    path = Path(path)
    if not is_bioimageio_package(path):
        raise BioimageioError(f"{path}: not a bioimage.io package (no rdf.yaml / bioimageio.yaml)")
    pkg = _Package(path)
    try:
        try:
            rdf = yaml.safe_load(pkg.read(pkg.rdf_name))
        except yaml.YAMLError as exc:
            raise BioimageioError(f"{path}: {pkg.rdf_name} is not valid YAML ({exc})") from exc
        if not isinstance(rdf, dict) or rdf.get("type") != "model":
            raise BioimageioError(f"{path}: not a bioimage.io model description")
        ours = (rdf.get("config") or {}).get("napari_mpt_deblur")
        if not isinstance(ours, dict) or "record" not in ours or "weights" not in ours:
            arch = ((rdf.get("weights") or {}).get("pytorch_state_dict") or {}).get("architecture") or {}
            hint = f" (its architecture: {arch.get('callable', '?')})" if arch else ""
            raise BioimageioError(
                f"{path}: a bioimage.io model '{rdf.get('name', '?')}' that was not exported by napari-mpt-deblur"
                f"{hint}; only packages written by `mpt-deblur export --format bioimageio` (MPT or H2T U-Net, with "
                "their safetensors attachments) can be loaded, because other weights would have to be unpickled")
        attachments = {}
        for entry in rdf.get("attachments") or []:
            name, sha = _source_name(entry)
            attachments[name] = sha
        files = {}
        for key in ("record", "weights"):
            name = str(ours[key])
            if name not in attachments:
                raise BioimageioError(f"{path}: {name} is not listed among the package's attachments")
            data = pkg.read(name)
            if attachments[name] and _sha256(data) != attachments[name]:
                raise BioimageioError(f"{path}: {name} does not match its SHA-256 in {pkg.rdf_name}; "
                                      "the package is corrupt or was modified")
            files[key] = (name, data)
    finally:
        pkg.close()
    record_name, record_bytes = files["record"]
    weights_name, weights_bytes = files["weights"]
    if Path(record_name).with_suffix("").name != Path(weights_name).with_suffix("").name:
        raise BioimageioError(f"{path}: attachments {record_name} and {weights_name} do not belong together")
    digest = _sha256(record_bytes + weights_bytes)[:16]
    target = imports_dir() / digest
    record_path = target / Path(record_name).name
    if not record_path.is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=_ensure(imports_dir())))
        try:
            (tmp / Path(record_name).name).write_bytes(record_bytes)
            (tmp / Path(weights_name).name).write_bytes(weights_bytes)
            try:
                os.replace(tmp, target)
            except OSError:  # another process unpacked the same package first
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    try:
        read_record(record_path)
    except ModelFileError as exc:
        raise BioimageioError(f"{path}: its model record is invalid: {exc}") from exc
    return record_path


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def package_summary(path: str | os.PathLike) -> dict[str, Any]:
    """``rdf.yaml`` of a package as a dict (for messages and tests)."""
    import yaml

    pkg = _Package(Path(path))
    try:
        return yaml.safe_load(pkg.read(pkg.rdf_name))
    finally:
        pkg.close()


__all__ = ["BioimageioError", "import_bioimageio", "imports_dir", "is_bioimageio_package", "package_summary"]
