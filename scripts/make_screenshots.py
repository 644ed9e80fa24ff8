"""Screenshots of each widget after a run on the bundled sample data, for docs/ and the README.

Runs a real napari viewer (under Xvfb on a headless machine):

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/make_screenshots.py --out docs/images

Every shot is of a 1280 x 800 window (a laptop screen), the widget docked at its own size: the
layout tests (tests/test_widget_layout.py) check that nothing is cut off at that size. Writes
``menu_layers_filter.png`` (Layers > Filter with our entries; ``--only menu`` writes just that one),
``widget_deblur.png`` (``--only deblur``: the two so far), ``widget_finetune.png`` and ``widget_compare.png``. The deblur and
compare shots use the shipped model (``--model``, default the demo's) on the real defocused
BBBC006 sample; the fine-tune shot runs a short EFCRex fine-tune (``--finetune-steps``) on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _wait(worker, app, timeout_s: float = 900) -> None:
    import time

    done = {"flag": False}
    worker.finished.connect(lambda: done.__setitem__("flag", True))
    t0 = time.time()
    while not done["flag"]:
        app.processEvents()
        time.sleep(0.05)
        if time.time() - t0 > timeout_s:
            raise TimeoutError("worker did not finish")
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)


WINDOW = (1280, 800)


def _narrow(viewer, dock, width: int = 520) -> None:
    """Keep the widget's dock from taking the canvas's room."""
    from qtpy.QtCore import Qt

    viewer.window._qt_window.resizeDocks([dock], [width], Qt.Horizontal)


def _shot(viewer, path: Path, app) -> None:
    for _ in range(20):
        app.processEvents()
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path}")


def _menu_shot(viewer, path: Path, app) -> None:
    """Layers > Filter opened, with our entries: menus are popup windows that ``viewer.screenshot``
    does not see, so the screen region under the main window's top-left is grabbed instead."""
    import time

    from qtpy.QtCore import QPoint

    window = viewer.window._qt_window
    window.show()
    window.raise_()
    for _ in range(20):
        app.processEvents()
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
    bar = window.menuBar()
    layers = next(a for a in bar.actions() if a.text().replace("&", "") == "Layers")
    menu = layers.menu()
    menu.popup(window.mapToGlobal(bar.actionGeometry(layers).bottomLeft()))
    for _ in range(20):
        app.processEvents()
    filt = next(a for a in menu.actions() if a.text().replace("&", "") in ("Filter", "Filters"))
    menu.setActiveAction(filt)
    filt.menu().popup(menu.mapToGlobal(menu.actionGeometry(filt).topRight()))
    for _ in range(40):
        app.processEvents()
        time.sleep(0.02)
    sub = filt.menu()
    right = sub.mapToGlobal(QPoint(sub.width(), sub.height()))
    top_left = window.mapToGlobal(QPoint(0, 0))
    width = min(right.x() - top_left.x() + 240, window.width())
    height = min(right.y() - top_left.y() + 160, window.height())
    image = app.primaryScreen().grabWindow(0, top_left.x(), top_left.y(), width, height)
    image.save(str(path))
    sub.hide()
    menu.hide()
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/images"))
    p.add_argument("--model", default=None, help="deblur model (default: the demo's shipped model)")
    p.add_argument("--finetune-steps", type=int, default=30)
    p.add_argument("--only", choices=("menu", "deblur", "all"), default="all",
                   help="menu: only the Layers > Filter menu shot (seconds, no model run); deblur: that and "
                        "the Deblur widget (one model run)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_mpt_deblur.data.samples import defocused_bbbc006, u2os_nuclei
    from napari_mpt_deblur.demo import DEFAULT_DEMO_MODEL

    model = args.model or DEFAULT_DEMO_MODEL
    app = QApplication.instance() or QApplication([])

    # 0. Layers > Filter lists Deblur (and Fine-tune) next to napari's own filters.
    viewer = napari.Viewer(title="napari-mpt-deblur: Deblur")
    viewer.window._qt_window.resize(*WINDOW)
    blurry = defocused_bbbc006()
    viewer.add_image(blurry, name="defocused BBBC006 z00", scale=(0.645, 0.645), units=("um", "um"))
    _menu_shot(viewer, args.out / "menu_layers_filter.png", app)
    if args.only == "menu":
        viewer.close()
        return

    # 1. Deblur
    dock, widget = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Deblur")
    _narrow(viewer, dock)
    widget.model.reset_choices()
    widget.model.value = model
    _wait(widget.run(), app)
    viewer.grid.enabled = True
    viewer.reset_view()
    _shot(viewer, args.out / "widget_deblur.png", app)
    if args.only == "deblur":
        viewer.close()
        return

    # 2. Fine-tune (a short run so the loss curve has something to show)
    viewer.layers.clear()
    viewer.grid.enabled = False
    viewer.add_image(blurry, name="defocused BBBC006 z00")
    viewer.window.remove_dock_widget("all")
    dock, ft = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Fine-tune with EFCRex")
    _narrow(viewer, dock)
    ft.unlabeled.reset_choices()
    ft.unlabeled.value = ["defocused BBBC006 z00"]
    ft.start_model.reset_choices()
    ft.start_model.value = model
    ft.steps.value = args.finetune_steps
    ft.batch.value = 2
    _wait(ft.start(), app)
    _shot(viewer, args.out / "widget_finetune.png", app)

    # 3. StarDist compare with ground truth: the bundled U2OS sample (held-out test image),
    #    defocused by 6 um with the benchmark's 20x/0.45 NA PSF and camera noise, then deblurred.
    from napari_mpt_deblur.data.normalisation import normalise, percentile_range
    from napari_mpt_deblur.data.psf import PSFParams
    from napari_mpt_deblur.data.synthesis import synthesize_defocus
    from napari_mpt_deblur.inference.engine import Deblurrer

    image, labels = u2os_nuclei()
    sharp = normalise(image, *percentile_range(image))
    blurred = synthesize_defocus(sharp, PSFParams(defocus_um=6.0), rng=np.random.default_rng(0))
    restored = Deblurrer(model).deblur_plane(blurred)
    viewer.layers.clear()
    viewer.window.remove_dock_widget("all")
    before = viewer.add_image(blurred, name="U2OS defocused 6 um")
    after = viewer.add_image(restored, name="U2OS deblurred")
    truth = viewer.add_labels(labels, name="ground truth", visible=False)
    viewer.window._qt_window.resize(*WINDOW)
    dock, cmp = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "StarDist compare")
    _narrow(viewer, dock)
    cmp.reset_choices()
    cmp.before.value, cmp.after.value, cmp.ground_truth.value = before, after, truth
    _wait(cmp.run(), app)
    viewer.grid.enabled = True
    viewer.reset_view()
    _shot(viewer, args.out / "widget_compare.png", app)
    viewer.close()


if __name__ == "__main__":
    main()
