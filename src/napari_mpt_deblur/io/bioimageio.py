"""bioimage.io model packages: export our models to the model zoo format and read them back.

A package written by :func:`export_bioimageio` is a model description of format 0.5.x
(``rdf.yaml`` plus files, as a folder or a ``.zip``) that bioimage.io consumers (deepImageJ, ilastik,
QuPath, BiaPy, bioimageio.core) load without this package:

* ``pytorch_state_dict`` weights (``weights.pt``, the state dict only) with the architecture as one
  self-contained Python file (``architecture.py``, generated from :mod:`napari_mpt_deblur.models`) and
  its SHA-256; ``torchscript`` weights too when a trace reproduces the network at two tile sizes;
* input ``raw`` (batch, channel, y, x), float32, sizes ``min = step = size_multiple`` of the network,
  preprocessed by ``scale_range`` with our percentiles (0.1 / 99.9 per image, and per channel for a
  grey model or over all channels together for a colour one, see
  :mod:`napari_mpt_deblur.data.normalisation`); output ``deblurred`` of the same size, with a halo;
* test input/output tensors from a crop of the bundled real defocused BBBC006 image, a before|after
  cover image, a README with citations, licence and the training record.

The spec has no postprocessing that inverts a data-dependent ``scale_range``, so a bioimage.io
consumer receives the output **in normalised units**: 0 and 1 are the input's 0.1 and 99.9
percentiles. ``mpt-deblur predict`` maps back to the input's units (it reads the package as one of
our models: :func:`import_bioimageio`, in :mod:`napari_mpt_deblur.io.bioimageio_package`).

For the way back, the package carries our own model files as attachments (``<name>.safetensors`` and
``<name>.json``): :func:`import_bioimageio` checks their SHA-256 against ``rdf.yaml`` and unpacks them
into a cache folder, so nothing from a package is ever unpickled or executed. A bioimage.io package
made by other tools (no such attachments) is refused with a message that says so.

Needs the ``bioimageio`` extra (``bioimageio.spec`` / ``bioimageio.core``) to export and test; import
needs only PyYAML. No napari or Qt here.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

# The generated architecture file lives in .bioimageio_arch; re-exported here.
from .bioimageio_arch import ARCH_CALLABLE, ARCH_FILE, _load_architecture, architecture_source  # noqa: F401
# The reading half (no torch, no bioimageio extra) lives in .bioimageio_package; re-exported here.
from .bioimageio_package import (  # noqa: F401
    BioimageioError,
    _sha256,
    import_bioimageio,
    imports_dir,
    is_bioimageio_package,
    package_summary,
)
from .bioimageio_tensors import (
    _cover_png,
    _forward,
    _scale_range,
    _test_crop,
    _test_image,
    _training_data_note,
    modality_tags,
    test_data_text,
)

#: The package's tensor ids.
INPUT_ID = "raw"
OUTPUT_ID = "deblurred"
#: File names inside a package (and ARCH_FILE, from .bioimageio_arch).
STATE_DICT_FILE = "weights.pt"
TORCHSCRIPT_FILE = "weights_torchscript.pt"
#: Side of the test tensors (a crop of the bundled defocused BBBC006 image), rounded up to the size multiple.
TEST_SIDE = 256
#: Output halo in pixels: half of the engine's default CPU tile overlap (32 px), i.e. what tiled
#: inference discards at each tile border.
HALO = 16

LICENSE = "BSD-3-Clause"

CITATIONS = (
    ("Zhang Y., Zheng P., Yan W., Fang C., Cheng S. S. A Unified Framework for Microscopy Defocus Deblur with "
     "Multi-Pyramid Transformer and Contrastive Learning. CVPR 2024 (MPT, EFCR/EFCRex).",
     "https://arxiv.org/abs/2403.02611"),
    ("Wang and Han. Defocus Deblur Microscopy via Head-to-Tail Cross-Scale Fusion. ICIP 2022 (H2T U-Net).",
     "https://arxiv.org/abs/2201.02876"),
    ("BBBC006v1 (training data and test image): Ljosa V., Sokolnicki K. L., Carpenter A. E. Annotated "
     "high-throughput microscopy image sets for validation. Nature Methods 9:637 (2012).",
     "https://bbbc.broadinstitute.org/BBBC006"),
    ("BBBC038 (training data): Caicedo J. C. et al. Nucleus segmentation across imaging experiments: the 2018 "
     "Data Science Bowl. Nature Methods 16:1247 (2019).",
     "https://bbbc.broadinstitute.org/BBBC038"),
)


def _require_spec():
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the testing extra installs it
        raise BioimageioError(
            "bioimage.io export needs the optional 'bioimageio' extra: pip install 'napari-mpt-deblur[bioimageio]'"
        ) from exc


# --------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    """What :func:`export_bioimageio` wrote and checked."""

    path: Path
    weight_formats: list[str]
    #: Largest |difference| between the generated architecture file and our model on the test input.
    architecture_max_diff: float
    #: Largest |difference| of the torchscript trace at the traced and at a second size (None: not traced).
    torchscript_max_diff: float | None
    notes: list[str] = field(default_factory=list)


def _training_summary(record) -> str:
    """A readable description of the training data and run, from the model record's provenance."""
    training = record.training or {}
    lines = []
    config = training.get("config") or {}
    for item in config.get("data") or []:
        kind = item.get("kind", "?")
        source = item.get("sharp") or item.get("blurred") or item.get("path") or item.get("root") or ""
        names = item.get("names")
        extra = f", images: {names}" if isinstance(names, str) else ""
        lines.append(f"- {kind} data from `{Path(str(source)).name or source}`{extra}")
    if not lines:
        lines.append("- (the model record lists no training data)")
    run = []
    if "steps" in training:
        run.append(f"{training['steps']} steps")
    if training.get("device"):
        run.append(f"on {training['device']}")
    if training.get("wall_seconds"):
        run.append(f"{training['wall_seconds'] / 3600:.1f} h wall time")
    val = training.get("validation") or {}
    if "psnr" in val:
        run.append(f"validation PSNR {val['psnr']:.2f} dB (input {val.get('input_psnr', float('nan')):.2f} dB), "
                   f"SSIM {val.get('ssim', float('nan')):.3f}")
    if run:
        lines.append("- run: " + ", ".join(run))
    if not record.trained:
        lines.append("- **UNTRAINED weights** (random initialisation): for testing only")
    return "\n".join(lines)


def _averaging_note(record) -> str:
    """The README's word on a model whose record asks for orientation or pixel-shift averaging: a
    bioimage.io consumer runs the network once, so it gets the single pass and its grid pattern."""
    notes = []
    if record.orientations and record.orientations > 1:
        notes.append(f"- napari-mpt-deblur restores every tile of this model in {record.orientations} orientations "
                     "(its flips) and averages them, because one pass leaves a faint pattern locked to the pixel "
                     "grid (period 2 px). A bioimage.io consumer runs the network once: to match, run it on the "
                     "flipped inputs, flip the outputs back and average.\n")
    if record.shifts and record.shifts > 1:
        notes.append("- napari-mpt-deblur restores every tile of this model twice, as given and moved by one pixel "
                     "along both axes (first row and column dropped, the last ones repeated), moves the second "
                     "result back and averages the two, because one pass leaves a faint period-2 pattern that "
                     "changes sign with a one-pixel shift. A bioimage.io consumer runs the network once: to "
                     "match, do the same.\n")
    return "".join(notes)


def _readme(record, halo: int, multiple: int, formats: list[str], side: int) -> str:
    arch = record.architecture
    net = "Multi-Pyramid Transformer (MPT)" if arch.arch == "mpt" else "head-to-tail multi-scale U-Net (H2T U-Net)"
    norm = record.normalisation
    per_channel = " and channel" if arch.in_channels == 1 else ", all channels together"
    cites = "\n".join(f"- {text} <{url}>" for text, url in CITATIONS)
    return f"""# {record.name}: defocus deblurring ({net})

{record.description or 'Defocus deblurring for fluorescence microscopy.'}

Exported from napari-mpt-deblur {record.package_version} by
`mpt-deblur export {record.name} --format bioimageio`. Architecture: `{arch.arch}`, preset `{arch.preset}`,
{arch.in_channels} input / {arch.out_channels} output channel(s). Weight formats: {', '.join(formats)}.

## Input and output

- Input `{INPUT_ID}`: (batch, channel, y, x), float32, in the camera's units. H and W: any multiple of
  {multiple} (the network also pads other sizes internally). Preprocessing: `scale_range` with the
  {norm.low} / {norm.high} percentiles of each image{per_channel},
  the normalisation the model was trained with.
- Output `{OUTPUT_ID}`: same shape, **in normalised units**: 0 and 1 are the input's {norm.low} and {norm.high}
  percentiles. bioimage.io has no postprocessing that inverts a per-image `scale_range`; to get the
  input's units back multiply by (p{norm.high} - p{norm.low}) of the input and add p{norm.low}
  (`mpt-deblur predict --model this_package.zip` does this for you).
- Tiled prediction: halo {halo} px per side (overlap {2 * halo} px between tiles).
{_averaging_note(record)}
## Training data

{_training_summary(record)}

Images were blurred with a widefield defocus PSF (Poisson-Gaussian noise) for paired training; see the
napari-mpt-deblur documentation (docs/training.md, docs/models.md) for the full configuration, which is also
attached to this package as `{record.name}.json`.

## Validation

The package's test tensors are {test_data_text(arch.in_channels, side)}; the cover shows that crop before and after.
Validation PSNR/SSIM
on held-out synthetic pairs are in the training record above; the napari-mpt-deblur benchmark
(docs/benchmarks.md) reports PSNR, SSIM and StarDist AP before and after deblurring.

## Limitations

Like every learned restorer the model can invent plausible texture where the blur destroyed
information; check conclusions that depend on fine detail against the raw image. {_training_data_note(arch.in_channels)}

## Citations

{cites}

## Licence

{LICENSE} (code and weights).
"""


def _torchscript(model, x: np.ndarray, eager_x: np.ndarray, second: np.ndarray) -> tuple[bytes | None, float | None, str]:
    """Trace at ``x``'s shape; keep the trace only if it matches eager (``eager_x`` = model(x)) at that
    shape and at ``second``'s, another size and batch (a trace can freeze shapes into constants)."""
    import warnings

    import torch

    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python ints: the check below decides
            traced = torch.jit.trace(model, torch.from_numpy(x), check_trace=False)
        diffs = []
        for arr, want in ((x, eager_x), (second, None)):
            with torch.no_grad():
                got = traced(torch.from_numpy(arr)).numpy()
            want = _forward(model, arr) if want is None else want
            diffs.append(float(np.abs(got - want).max()) if got.shape == want.shape else float("inf"))
    except Exception as exc:  # tracing is optional: say why it was left out
        return None, None, f"torchscript not exported: tracing failed ({type(exc).__name__}: {exc})"
    worst = max(diffs)
    if not worst <= 1e-4:
        return None, worst, (f"torchscript not exported: the trace differs from the network by {worst:.3g} "
                             f"(traced at 1 x {x.shape[-1]} px, checked at that and at {second.shape[0]} x "
                             f"{second.shape[-1]} px)")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.jit for torch.export; torchscript is still what deepImageJ loads.
        warnings.filterwarnings("ignore", message="`torch.jit.save` is deprecated", category=DeprecationWarning)
        torch.jit.save(traced, buf)
    return buf.getvalue(), worst, (f"torchscript: the trace matches the network within {worst:.2g} at 1 x "
                                   f"{x.shape[-1]} px and {second.shape[0]} x {second.shape[-1]} px")


def export_bioimageio(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    torchscript: bool = True,
    overwrite: bool = False,
    test_side: int = TEST_SIDE,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write ``model`` (a name or a model file) as a bioimage.io package to ``out``.

    ``out`` ending in ``.zip`` gives a zip archive, anything else a folder (``rdf.yaml`` inside).
    An existing ``out`` is refused unless ``overwrite``. The written description is validated by
    ``bioimageio.spec`` (offline: no URL checks); run :func:`run_bioimageio_test` for the full test.
    """
    _require_spec()
    import torch
    from bioimageio.spec import ValidationContext, save_bioimageio_package, save_bioimageio_package_as_folder
    from bioimageio.spec.model import v0_5

    from ..models.registry import load_model, model_paths

    log = log or (lambda _m: None)
    out = Path(out)
    if out.exists() and not overwrite:
        raise BioimageioError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.is_dir() and not ((out / "rdf.yaml").is_file() or (out / "bioimageio.yaml").is_file()):
        raise BioimageioError(f"{out} is a folder but not a bioimage.io package; refusing to replace it")
    if out.exists() and not out.is_dir() and out.suffix != ".zip":
        raise BioimageioError(f"{out} is a file; give a folder, or a file name ending in .zip")
    loaded = load_model(model, device="cpu")
    record, net = loaded.record, loaded.model.float().eval()
    arch = record.architecture
    multiple = arch.size_multiple
    side = max(multiple, -(-test_side // multiple) * multiple)
    halo = min(HALO, side // 4)
    norm = record.normalisation
    eps = 1e-6

    channels = arch.in_channels
    side = min(side, min(_test_image(channels).shape[-2:]) // multiple * multiple)
    x = _test_crop(side, channels)[None]  # (1, C, H, W) raw units
    raw = x[0].mean(axis=0)  # grey view for the cover picture
    normed = _scale_range(x, norm.low, norm.high, eps)
    expected = _forward(net, normed)
    notes: list[str] = []

    # The architecture file must rebuild exactly this network: check before writing anything.
    source = architecture_source()
    rebuilt = _load_architecture(source)(arch.model_dump(mode="json"))
    rebuilt.load_state_dict(net.state_dict())
    rebuilt.eval()
    arch_diff = float(np.abs(_forward(rebuilt, normed) - expected).max())
    if arch_diff > 1e-5:
        raise BioimageioError(f"the generated {ARCH_FILE} does not reproduce the model (max diff {arch_diff:.3g})")

    staging = Path(tempfile.mkdtemp(prefix="mpt-deblur-bioimageio-"))
    try:
        (staging / ARCH_FILE).write_text(source, encoding="utf-8")
        buf = io.BytesIO()
        # The state dict in the model file's storage dtype (what the safetensors hold): a plain dict
        # of tensors, which bioimage.io consumers load with torch.load(weights_only=True).
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[record.weights_dtype]
        torch.save({k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                    for k, v in net.state_dict().items()}, buf)
        (staging / STATE_DICT_FILE).write_bytes(buf.getvalue())
        np.save(staging / "test_input.npy", x)
        np.save(staging / "test_output.npy", expected)
        # Sample tensors (FAIR): the same crop as viewable TIFFs (2D, or (C, H, W) for several channels).
        import tifffile

        tifffile.imwrite(staging / "sample_input.tif", x[0, 0] if channels == 1 else x[0], photometric="minisblack")
        tifffile.imwrite(staging / "sample_output.tif", expected[0, 0] if channels == 1 else expected[0],
                         photometric="minisblack")
        expected_grey = expected[0].mean(axis=0)
        (staging / "cover.png").write_bytes(_cover_png(raw, expected_grey * float(
            np.percentile(raw, norm.high) - np.percentile(raw, norm.low)) + float(np.percentile(raw, norm.low))))
        formats = ["pytorch_state_dict"]
        ts_bytes = ts_diff = None
        if torchscript:
            # A second valid size, one step larger (or smaller when the image is too small), as a
            # batch of 2 (the crop and its mirror): a trace can freeze the batch size too.
            largest = min(512, min(_test_image(channels).shape[-2:]))
            other = side + multiple if side + multiple <= largest else max(side - multiple, multiple)
            crop = _test_crop(other, channels)
            second = np.stack([crop, crop[..., ::-1]])
            ts_bytes, ts_diff, note = _torchscript(net, normed, expected,
                                                   _scale_range(second, norm.low, norm.high, eps))
            notes.append(note)
            log(note)
            if ts_bytes is not None:
                (staging / TORCHSCRIPT_FILE).write_bytes(ts_bytes)
                formats.append("torchscript")
        weights_path, record_path = model_paths(loaded.path)
        shutil.copyfile(weights_path, staging / weights_path.name)
        shutil.copyfile(record_path, staging / record_path.name)
        (staging / "README.md").write_text(_readme(record, halo, multiple, formats, side), encoding="utf-8")

        def file(name: str) -> v0_5.FileDescr:
            return v0_5.FileDescr(source=staging / name, sha256=_sha256((staging / name).read_bytes()))

        channel_names = [f"channel{i}" for i in range(arch.in_channels)]
        size = v0_5.ParameterizedSize(min=multiple, step=multiple)
        inputs = [v0_5.InputTensorDescr(
            id=v0_5.TensorId(INPUT_ID),
            description=f"defocused image in the camera's units; {norm.low}/{norm.high} percentile normalisation",
            axes=[v0_5.BatchAxis(),
                  v0_5.ChannelAxis(channel_names=[v0_5.Identifier(c) for c in channel_names]),
                  v0_5.SpaceInputAxis(id=v0_5.AxisId("y"), size=size),
                  v0_5.SpaceInputAxis(id=v0_5.AxisId("x"), size=size)],
            test_tensor=file("test_input.npy"),
            sample_tensor=file("sample_input.tif"),
            data=v0_5.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=[v0_5.ScaleRangeDescr(kwargs=v0_5.ScaleRangeKwargs(
                axes=[v0_5.AxisId(a) for a in (("y", "x") if channels == 1 else ("channel", "y", "x"))],
                min_percentile=norm.low, max_percentile=norm.high, eps=eps))],
        )]

        def ref(axis: str) -> v0_5.SizeReference:
            return v0_5.SizeReference(tensor_id=v0_5.TensorId(INPUT_ID), axis_id=v0_5.AxisId(axis))

        outputs = [v0_5.OutputTensorDescr(
            id=v0_5.TensorId(OUTPUT_ID),
            description=(f"deblurred image in normalised units (0 and 1 = the input's {norm.low} and {norm.high} "
                         "percentiles)"),
            axes=[v0_5.BatchAxis(),
                  v0_5.ChannelAxis(channel_names=[v0_5.Identifier(c) for c in channel_names]),
                  v0_5.SpaceOutputAxisWithHalo(id=v0_5.AxisId("y"), size=ref("y"), halo=halo),
                  v0_5.SpaceOutputAxisWithHalo(id=v0_5.AxisId("x"), size=ref("x"), halo=halo)],
            test_tensor=file("test_output.npy"),
            sample_tensor=file("sample_output.tif"),
            data=v0_5.IntervalOrRatioDataDescr(type="float32"),
        )]
        torch_version = v0_5.Version(torch.__version__.split("+")[0])
        weights = v0_5.WeightsDescr(
            pytorch_state_dict=v0_5.PytorchStateDictWeightsDescr(
                source=staging / STATE_DICT_FILE, sha256=_sha256((staging / STATE_DICT_FILE).read_bytes()),
                architecture=v0_5.ArchitectureFromFileDescr(
                    source=staging / ARCH_FILE, sha256=_sha256(source.encode("utf-8")), callable=ARCH_CALLABLE,
                    kwargs={"config": arch.model_dump(mode="json")}),
                pytorch_version=torch_version,
            ),
            torchscript=(v0_5.TorchscriptWeightsDescr(
                source=staging / TORCHSCRIPT_FILE, sha256=_sha256(ts_bytes), pytorch_version=torch_version,
                parent="pytorch_state_dict") if ts_bytes is not None else None),
        )
        net_name = "Multi-Pyramid Transformer" if arch.arch == "mpt" else "head-to-tail U-Net"
        descr = v0_5.ModelDescr(
            name=_bioimageio_name(record.name, net_name),
            description=(record.description or f"Defocus deblurring with a {net_name}")[:1024],
            authors=[v0_5.Author(name="napari-mpt-deblur developers")],
            cite=[v0_5.CiteEntry(text=text, url=v0_5.HttpUrl(url)) for text, url in CITATIONS],
            license=v0_5.LicenseId(LICENSE),
            documentation=file("README.md"),
            covers=[file("cover.png")],
            tags=["deblurring", "defocus", "image-restoration", *modality_tags(arch.in_channels),
                  "2d", "pytorch", "napari-mpt-deblur", arch.arch],
            version=v0_5.Version(record.package_version),
            inputs=inputs,
            outputs=outputs,
            weights=weights,
            attachments=[file(weights_path.name), file(record_path.name)],
            config=v0_5.Config(bioimageio=v0_5.BioimageioConfig(reproducibility_tolerance=[
                v0_5.ReproducibilityTolerance(relative_tolerance=1e-3, absolute_tolerance=1e-3)]),
                **{"napari_mpt_deblur": {
                    "model_name": record.name, "record": record_path.name, "weights": weights_path.name,
                    "architecture": arch.model_dump(mode="json"), "normalisation": norm.model_dump(mode="json"),
                    "output_units": "normalised", "trained": record.trained}}),
        )
        # Written beside OUT under a temporary name and moved into place last, so an interrupted
        # export never leaves a half-written package under the final name.
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".partial-{os.getpid()}-{out.name}")  # keeps the .zip suffix
        with ValidationContext(perform_io_checks=False):
            if out.suffix == ".zip":
                save_bioimageio_package(descr, output_path=partial)
                os.replace(partial, out)
            else:
                save_bioimageio_package_as_folder(descr, output_path=partial)
                if out.exists():
                    shutil.rmtree(out)
                os.replace(partial, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {out} ({', '.join(formats)})")
    return ExportResult(path=out, weight_formats=formats, architecture_max_diff=arch_diff,
                        torchscript_max_diff=ts_diff, notes=notes)


def _bioimageio_name(name: str, net: str) -> str:
    # bioimage.io names: letters, digits, spaces and a few symbols (no dots at the end), 5..128 chars.
    text = re.sub(r"[^A-Za-z0-9 _\-()+]", " ", f"{name} defocus deblurring ({net})")
    return re.sub(r"\s+", " ", text).strip()[:128]


def run_bioimageio_test(path: str | os.PathLike, *, weight_format: str | None = None) -> Any:
    """Run ``bioimageio.core.test_description`` on a package, on the CPU, offline; return its summary.

    Offline: the test tensors, weights and architecture are read from the package; the summary's
    ``status`` is ``"passed"`` or ``"valid-format"`` when everything passed (warnings do not fail).
    """
    _require_spec()
    from bioimageio.core import test_description
    from bioimageio.spec import ValidationContext

    with ValidationContext(perform_io_checks=False):
        return test_description(Path(path), weight_format=weight_format, devices=["cpu"])


__all__ = [
    "BioimageioError", "ExportResult", "architecture_source", "export_bioimageio", "import_bioimageio",
    "imports_dir", "is_bioimageio_package", "package_summary", "run_bioimageio_test",
]
