"""Time to first result: the Deblur widget appears without torch and preloads the model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from napari_mpt_deblur._widget_common import model_choices
from napari_mpt_deblur.models import RECOMMENDED_MODEL
from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.registry import build_model, list_models, save_model

PLUGIN = "napari-mpt-deblur"


def test_model_choices_are_the_registry_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MPT_DEBLUR_MODELS_DIR", str(tmp_path / "models"))
    torch.manual_seed(0)
    save_model(build_model(preset_config("mpt", "tiny", 1)), tmp_path / "models" / "my-tiny")
    expected: list[str] = []
    for name, _path, _origin in list_models():
        if name not in expected:
            expected.append(name)
    assert model_choices() == expected
    assert "my-tiny" in expected and expected[0] == RECOMMENDED_MODEL


def test_widget_choices_need_no_torch():
    """What the Deblur widget lists before its preload has imported torch."""
    code = ("import json, sys; from napari_mpt_deblur._widget_deblur import device_choices; "
            "from napari_mpt_deblur._widget_common import model_choices; "
            "print(json.dumps([device_choices(probe=False), model_choices(), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    devices, models, torch_imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert devices == ["auto", "cpu"]
    assert models[0] == RECOMMENDED_MODEL
    assert torch_imported is False


@pytest.mark.napari
def test_widget_preloads_the_selected_model_off_the_gui_thread(make_napari_viewer_proxy, qtbot):
    from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings, model_load_count

    viewer = make_napari_viewer_proxy()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deblur")
    thread = widget.preload_thread
    assert thread.name == "mpt-deblur-preload" and not thread.daemon  # exit waits for it (no abort mid-forward)
    qtbot.waitUntil(lambda: not thread.is_alive(), timeout=120_000)
    assert widget._torch_ready.is_set()
    qtbot.waitUntil(lambda: "cpu" in widget.device.choices, timeout=5_000)
    # The click's engine finds the weights already loaded: no second read from disk.
    loads = model_load_count()
    Deblurrer(widget.model.value, InferenceSettings())
    assert model_load_count() == loads
