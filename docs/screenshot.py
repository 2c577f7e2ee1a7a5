"""Take the README screenshot: a paper-recipe stack, its CDI NN inversion and its phase retrieval.

Run under a display, e.g. ``xvfb-run -a python docs/screenshot.py [docs/screenshot.png]``.
It opens the plugin's sample data, runs the CDI NN inversion dock (the shipped model) and the
phase-retrieval dock on it; the docks show pattern | network | retrieval side by side as complex
images (brightness = amplitude, hue = phase) with a colour wheel, the same frame in all; a picture of the whole window is saved.
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
    from napari.settings import get_settings

    get_settings().application.gui_notification_level = "none"  # no toasts over the canvas
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1900, 900)
    viewer.open_sample("napari-cdinn", "paper_stack")
    inversion_dock, inversion = viewer.window.add_plugin_dock_widget("napari-cdinn", "CDI NN inversion")
    inversion.patterns.value = viewer.layers["paper-recipe intensity"]
    inversion.device.value = "cpu"
    inversion.controls.run_button.clicked.emit()
    _wait(lambda: not inversion.runner.running)
    _dock, retrieval = viewer.window.add_plugin_dock_widget("napari-cdinn", "Phase retrieval")
    retrieval.patterns.value = viewer.layers["paper-recipe intensity"]
    retrieval.device.value, retrieval.iterations.value = "cpu", 200
    retrieval.controls.run_button.clicked.emit()
    _wait(lambda: not retrieval.runner.running)
    for name in ("true amplitude", "true phase"):
        viewer.layers[name].visible = False
    viewer.window.remove_dock_widget(inversion_dock)  # one dock: the window keeps its size
    viewer.dims.set_current_step(0, 3)
    viewer.reset_view()
    QApplication.processEvents()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(out, canvas_only=False, flash=False)
    viewer.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
