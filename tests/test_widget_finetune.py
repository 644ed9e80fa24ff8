"""Fine-tune widget in a real napari viewer: live losses, Stop keeps the weights, Save + reload."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.napari


@pytest.fixture
def viewer_and_widget(make_napari_viewer_proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("MPT_DEBLUR_MODELS_DIR", str(tmp_path / "user-models"))
    viewer = make_napari_viewer_proxy()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Fine-tune with EFCRex")
    return viewer, widget


def test_stop_ends_early_and_saved_model_loads_in_deblur_list(qtbot, wait_for_worker, viewer_and_widget):
    from napari_mpt_deblur.data.samples import defocused_bbbc006
    from napari_mpt_deblur.models.registry import load_model

    viewer, widget = viewer_and_widget
    _dock, deblur = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Deblur")
    blurry = defocused_bbbc006()[:192, :192]
    layer = viewer.add_image(blurry, name="blurry")
    widget.unlabeled.reset_choices()
    widget.unlabeled.value = ["blurry"]
    widget.start_model.value = "new MPT (tiny)"
    widget.steps.value = 40
    widget.batch.value = 1
    widget.patch.value = 64

    def stop_after_three(record):
        if record.step == 3:
            widget.stop()

    worker = widget.start()
    worker.yielded.connect(stop_after_three)
    wait_for_worker(widget, 300_000)
    assert widget.tuner.trainer.stopped
    assert 3 <= widget.tuner.trainer.step < 40
    assert len(widget.losses) == widget.tuner.trainer.step
    assert all(np.isfinite(widget.losses))
    assert widget._line.get_xdata()[-1] == len(widget.losses)
    assert widget.save_button.enabled and "stopped after" in widget.status.value
    np.testing.assert_array_equal(layer.data, blurry)

    widget.model_name.value = "tuned-by-test"
    path = widget.save()
    assert path is not None and path.name == "tuned-by-test.json"
    loaded = load_model("tuned-by-test")
    record = loaded.record.training
    assert record["method"] == "EFCRex (unlabeled)" and record["unlabeled_images"] == [[192, 192]]
    # The fine-tuned weights are the ones saved (not the starting ones).
    import torch

    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(loaded.model(x), widget.tuner.model.eval()(x), atol=1e-6)
    assert "tuned-by-test" in deblur.model.choices
    # Saving again under the same name never overwrites.
    assert widget.save() is None and "already exists" in widget.status.value
    # A typed name is a name, never a path out of the user model folder (issue 13), and a shipped
    # model's name is refused (it could never be chosen by name).
    from napari_mpt_deblur.models.registry import user_models_dir

    root = user_models_dir().parent
    before = sorted(p.name for p in root.parent.rglob("*"))
    for name, message in (("../../escape-name", "path separator"), ("h2t-unet-fluo", "name of a shipped model"),
                          ("", "give the model a name")):
        widget.model_name.value = name
        assert widget.save() is None and message in widget.status.value, widget.status.value
    assert sorted(p.name for p in root.parent.rglob("*")) == before


def test_start_without_unlabeled_layers_is_reported(viewer_and_widget):
    _viewer, widget = viewer_and_widget
    assert widget.start() is None
    assert "unlabeled" in widget.status.value


def test_loss_plot_follows_napari_theme(viewer_and_widget):
    from matplotlib.colors import to_hex
    from napari.utils.theme import get_theme

    viewer, widget = viewer_and_widget
    for name in ("dark", "light"):
        viewer.theme = name
        theme = get_theme(name)
        ax = widget._line.axes
        assert to_hex(widget._figure.get_facecolor()) == theme.background.as_hex()
        assert to_hex(ax.get_facecolor()) == theme.background.as_hex()
        assert to_hex(ax.xaxis.label.get_color()) == theme.text.as_hex()
    assert get_theme("dark").background.as_hex() != get_theme("light").background.as_hex()
