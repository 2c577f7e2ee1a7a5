"""Take the README screenshot: a paper-recipe stack, its CDI NN inversion and the quality view.

Run under a display, e.g. ``xvfb-run -a python docs/screenshot.py [docs/screenshot.png]``.
It opens the plugin's sample data, runs the CDI NN inversion dock with the shipped model and
the quality view on its result, shows the layers side by side (grid mode) and saves a picture
of the whole window.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication


def _wait(condition, timeout=120.0):
    """Process Qt events until ``condition()`` holds (the worker threads report through them)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the inversion did not finish in time")
        QApplication.processEvents()
        time.sleep(0.02)


def main(out="docs/screenshot.png"):
    """Build the scene and write the screenshot to ``out``."""
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 820)
    viewer.open_sample("napari-cdinn", "paper_stack")
    _dock, inversion = viewer.window.add_plugin_dock_widget("napari-cdinn", "CDI NN inversion")
    inversion.patterns.value = viewer.layers["paper-recipe intensity"]
    inversion.device.value = "cpu"
    inversion.controls.run_button.clicked.emit()
    _wait(lambda: not inversion.runner.running)
    _dock, quality = viewer.window.add_plugin_dock_widget("napari-cdinn", "Quality view")
    quality.amplitude.value = viewer.layers["paper-recipe intensity NN amplitude"]
    quality.phase.value = viewer.layers["paper-recipe intensity NN phase"]
    quality.update()
    quality.jump_to_rank(0)
    for layer in viewer.layers:
        layer.translate = (0.0,) * layer.ndim  # side by side, not nested, in grid mode
    grid = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid
    grid.enabled = True
    grid.shape = (2, 3)
    viewer.reset_view()
    QApplication.processEvents()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(out, canvas_only=False, flash=False)
    viewer.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
