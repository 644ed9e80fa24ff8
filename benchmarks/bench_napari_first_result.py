"""Time to first result in napari: viewer start -> Deblur widget usable -> first plane shown.

Each run is a fresh Python process (what a user starting napari pays), with a real viewer under
the current display (use ``xvfb-run -a`` on a headless machine):

1. ``import napari`` + ``napari.Viewer()`` (shown, events processed);
2. the Deblur dock widget added through the plugin manifest, as the Plugins menu does, until
   its dock is shown and events are processed ("widget usable");
3. the real 520 x 696 BBBC006 sample plane is added, the Deblur button is clicked with the
   widget's default model and settings, and the clock stops when the restored layer has been
   added and drawn ("first plane shown"). ``--idle S`` waits S seconds between 2 and 3 (a user
   choosing a layer), during which background preloading, if any, can run; ``--wait-preload``
   clicks only once the widget's preload thread has finished (the case of a user who opens the
   widget and then spends a moment choosing a layer on a busy machine).

Median and range over ``--runs`` processes. The machine's cores are shared with whatever else
runs; run it twice side by side with the code before and after a change (``git stash`` is not
needed: ``--label`` only names the rows).

    xvfb-run -a python benchmarks/bench_napari_first_result.py --runs 3
    xvfb-run -a python benchmarks/bench_napari_first_result.py --runs 3 --idle 2
"""

from __future__ import annotations

import argparse

from _child import run_child
from _report import spread

CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
idle = float(sys.argv[1])
wait_preload = sys.argv[2] == "1"
import napari
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer(show=True)
QApplication.processEvents()
t_viewer = time.perf_counter()
dock, widget = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Deblur")
QApplication.processEvents()
t_widget = time.perf_counter()
deadline = time.perf_counter() + idle
preload = getattr(widget, "preload_thread", None)
while time.perf_counter() < deadline or (wait_preload and preload is not None and preload.is_alive()):
    QApplication.processEvents()
    time.sleep(0.01)
preload_busy = preload is not None and preload.is_alive()
from napari_mpt_deblur._sample_data import defocused_bbbc006
data, kwargs, _ = defocused_bbbc006()[0]
layer = viewer.add_image(data, **kwargs)
widget.image.value = layer
QApplication.processEvents()
model = widget.model.value
t_click = time.perf_counter()
widget.run_button.native.click()
while widget.last_layer is None:
    QApplication.processEvents()
    if widget.worker is None and widget.last_layer is None and time.perf_counter() - t_click > 1:
        raise SystemExit("the run ended without a result: " + str(widget.status.value))
    time.sleep(0.005)
QApplication.processEvents()
t_shown = time.perf_counter()
assert widget.last_layer.data.shape == data.shape, widget.last_layer.data.shape
print(json.dumps({"viewer_s": t_viewer - t_start, "widget_s": t_widget - t_viewer,
                  "click_to_plane_s": t_shown - t_click, "model": model, "shape": list(data.shape),
                  "preload_busy_at_click": preload_busy, "idle_s": t_click - t_widget}))
viewer.close()
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--idle", type=float, default=0.0, help="seconds between widget shown and the click")
    p.add_argument("--label", default="", help="name for the rows (e.g. before / after)")
    p.add_argument("--wait-preload", action="store_true",
                   help="click only once the widget's background preload (if it has one) has finished")
    args = p.parse_args(argv)
    rows = []
    for _ in range(args.runs):
        rows.append(run_child(CHILD, str(args.idle), "1" if args.wait_preload else "0", what="run"))
    print(f"{args.runs} fresh processes, default model {rows[0]['model']}, plane {rows[0]['shape']}, "
          f"idle {args.idle} s before the click")
    print()
    print("| label | viewer start s | viewer -> Deblur widget usable s | widget -> click s | preload still busy at click "
          "| click -> first plane shown s |")
    print("|---|---|---|---|---|---|")

    def cell(key: str) -> str:
        return spread([r[key] for r in rows])

    busy = sum(bool(r.get("preload_busy_at_click")) for r in rows)
    print(f"| {args.label} | {cell('viewer_s')} | {cell('widget_s')} | {cell('idle_s')} | {busy} of {len(rows)} "
          f"| {cell('click_to_plane_s')} |")


if __name__ == "__main__":
    main()
