"""The network architecture of a bioimage.io package as one self-contained Python file.

bioimage.io's ``pytorch_state_dict`` weights name an architecture file and a callable in it;
:func:`architecture_source` builds that file from the package's own model modules (configs,
layers, H2T U-Net, MPT) so the architecture in a package is exactly the code that trained it. Used
by the exporter, :mod:`napari_mpt_deblur.io.bioimageio` (which re-exports these names).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from .bioimageio_package import BioimageioError

#: File name of the architecture inside a package, and the factory it defines.
ARCH_FILE = "architecture.py"
ARCH_CALLABLE = "build_deblur_network"

_MODEL_SOURCES = ("config.py", "layers.py", "h2t_unet.py", "mpt.py")
_RELATIVE_IMPORT = re.compile(r"^from \.[\w.]* import (\([^)]*\)|[^\n]*)\n", re.MULTILINE)
_FUTURE = re.compile(r"^from __future__ import annotations\n", re.MULTILINE)

_FACTORY = '''

# ------------------------------------------------------------------------------------------------
# Entry point for bioimage.io (architecture.callable)


def build_deblur_network(config: dict):
    """The network described by ``config`` (a napari-mpt-deblur architecture config as a dict).

    Input and output: float32 tensors (B, C, H, W) in normalised units (0 and 1 at the input's
    0.1 / 99.9 percentiles); H and W are padded internally to the size multiple and cropped back.
    """
    arch = config.get("arch")
    if arch == "mpt":
        return MultiPyramidTransformer(MPTConfig.model_validate(config))
    if arch == "h2t_unet":
        return HeadToTailUNet(H2TUNetConfig.model_validate(config))
    raise ValueError(f"unknown architecture {arch!r}; expected 'mpt' or 'h2t_unet'")
'''


def architecture_source() -> str:
    """One importable Python file with both networks and :data:`ARCH_CALLABLE` (needs torch, pydantic).

    Built from the package's own model modules (configs, layers, H2T U-Net, MPT) with their
    relative imports removed, so the architecture in a package is exactly the code that trained it.
    """
    from .. import _version, models

    folder = Path(models.__file__).parent
    parts = [
        f'"""napari-mpt-deblur {_version.__version__} network architectures (MPT and H2T U-Net), one file for '
        'bioimage.io.\n\nGenerated from napari_mpt_deblur/models/{' + ",".join(_MODEL_SOURCES) + '}; BSD-3-Clause."""\n\n'
        "from __future__ import annotations\n"
    ]
    for name in _MODEL_SOURCES:
        text = (folder / name).read_text(encoding="utf-8")
        text = _FUTURE.sub("", _RELATIVE_IMPORT.sub("", text))
        # The file must stand alone (torch + pydantic only): no relative or package imports left.
        if re.search(r"^\s*(from \.|import \.|from napari_mpt_deblur|import napari_mpt_deblur)", text, re.MULTILINE):
            raise BioimageioError(f"models/{name} imports from the package, which this exporter cannot inline; "
                                  "update io/bioimageio_arch.py:_MODEL_SOURCES")
        parts.append(f"\n\n# {'=' * 96}\n# models/{name}\n\n{text}")
    parts.append(_FACTORY)
    return "".join(parts)


def _load_architecture(source: str) -> Callable[[dict], Any]:
    """Execute the generated architecture file (our own code, just generated) and return its factory."""
    import sys
    import types

    module = types.ModuleType("napari_mpt_deblur_bioimageio_architecture")
    # pydantic resolves postponed annotations through sys.modules[__module__].
    sys.modules[module.__name__] = module
    try:
        exec(compile(source, ARCH_FILE, "exec"), module.__dict__)
    finally:
        sys.modules.pop(module.__name__, None)
    return module.__dict__[ARCH_CALLABLE]


__all__ = ["ARCH_CALLABLE", "ARCH_FILE", "architecture_source"]
