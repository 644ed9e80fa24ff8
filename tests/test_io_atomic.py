"""Atomic writes: all or nothing, normal permissions, no temporary files left behind."""

from __future__ import annotations

import os
import stat

import pytest

from napari_mpt_deblur.io.atomic import atomic_path, write_text_atomic


def test_written_file_has_normal_permissions(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "hello")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert target.read_text() == "hello"


def test_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.tif"
    target.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".tif" and tmp.name.startswith(".out.tif.")
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]
