"""The package's user cache folder (PSF banks, imported model packages)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(part: str) -> Path:
    """``<user cache folder>/napari-mpt-deblur/<part>``; ``MPT_DEBLUR_CACHE_DIR`` replaces the
    user cache folder (tests, shared machines)."""
    override = os.environ.get("MPT_DEBLUR_CACHE_DIR")
    if override:
        return Path(override) / part
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-mpt-deblur")) / part
