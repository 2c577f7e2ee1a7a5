"""Prepare dock: raw detector frames to the centred, square patterns the other docks read.

Wired to :mod:`napari_cdinn.prepare`, the core of ``cdinn prepare``.  *Find centre* takes the beam
centre the layer's file records (NeXus/Dectris), else sums the frames in a thread worker and finds
the zero frequency by inversion symmetry (:func:`napari_cdinn.prepare.choose_centre`; a file's
centre far from the frames' is announced); the centre shows as a cross on the frames (a Points
layer): drag it to correct the centre, or type it.  *Prepare* crops a square around the centre
(unmeasured where it runs off the detector) and optionally bins it, in chunks with progress and
Stop, and adds the patterns (log display) with their mask (a Labels layer, 1 = unmeasured) that
the other docks pick up.  With "find the centre" ticked, Prepare finds it first.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from magicgui import widgets

from ... import io
from ... import prepare as core
from ...jobs import Cancelled
from ...stream import iter_chunks
from .. import layers as _layers
from ._common import (
    JobControls,
    JobRunner,
    add_or_update,
    image_layer_picker,
    mask_layer_picker,
    mask_of,
    notify,
    notify_error,
    persist,
    stack_of,
)

#: Frames read at once while summing and preparing (progress and Stop between chunks).
CHUNK = 256


def find_job(stack, mask, progress, should_stop, dark=None, file_centre=None):
    """Worker body: the centre by the ``auto`` rule (:func:`napari_cdinn.prepare.choose_centre`: the file's
    beam centre where it records one, else the symmetry centre of the frames' mean).

    Returns ``{"centre": (row, column) or None if stopped, "source": ..., "note": a sentence or None}``.
    """
    try:
        centre, source, symmetry = core.choose_centre(
            stack, mask, file_centre, chunk_size=CHUNK, should_stop=should_stop, dark=dark,
            progress=lambda d, t: progress({"stage": "centre", "done": d, "total": t}))
    except Cancelled:
        return {"centre": None, "source": None, "note": None}
    return {"centre": centre, "source": source, "note": core.centre_note(centre, source, symmetry)}


def prepare_job(stack, mask, centre, size, bin, progress, should_stop, dark=None, adu_per_photon=None,
                file_centre=None):
    """Worker body: the centre (by :func:`find_job` when ``centre`` is None), then the prepared patterns.

    ``dark`` (the mean frame without beam) and ``adu_per_photon``: an integrating detector's frames to
    photons (:func:`napari_cdinn.prepare.to_photons`).

    ``progress({"stage": "centre"|"prepare", "done": frames, "total": N})`` after every chunk.
    Returns ``{"centre", "source", "note", "size", "intensity", "mask", "stopped"}`` (``intensity`` None
    when stopped before the first chunk was prepared; ``size`` None means the default).
    """
    n = stack.shape[0]
    found = {"centre": centre, "source": "given", "note": None}
    if centre is None:
        found = find_job(stack, mask, progress, should_stop, dark, file_centre)
        if found["centre"] is None:
            return {**found, "size": size, "intensity": None, "mask": None, "stopped": True}
        centre = found["centre"]
    if size is None:
        size = core.default_size(stack.shape, centre, bin)
        core.check_side(size, f"the largest square around the centre ({centre[0]:g}, {centre[1]:g}) on the "
                              "detector", "a size of")
    chunk_size = min(CHUNK, core.frames_in_budget(stack.shape, size, bin))
    chunk = functools.partial(core.prepare_chunk, centre=centre, size=size, bin=bin, dark=dark,
                              adu_per_photon=adu_per_photon)
    parts = []
    try:
        for _a, b, res in iter_chunks(stack, chunk, chunk_size=chunk_size, mask=mask, should_stop=should_stop):
            parts.append(res)
            progress({"stage": "prepare", "done": b, "total": n})
    except Cancelled:
        pass
    done = sum(len(p["intensity"]) for p in parts)
    return {**found, "size": size, "stopped": done < n,
            "intensity": np.concatenate([p["intensity"] for p in parts]) if parts else None,
            "mask": np.concatenate([p["mask"] for p in parts]) if parts else None}


class PrepareWidget(widgets.Container):
    """Dock widget: find the beam's position on raw detector frames and cut centred patterns."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.frames = image_layer_picker(napari_viewer, "frames")
        self.mask = mask_layer_picker(napari_viewer, self.frames)
        self.auto = widgets.CheckBox(text="find the centre when preparing", value=True)
        self.centre_y = widgets.FloatSpinBox(label="centre row", value=0.0, min=-1e6, max=1e6, step=1.0)
        self.centre_x = widgets.FloatSpinBox(label="centre column", value=0.0, min=-1e6, max=1e6, step=1.0)
        self.find_button = widgets.PushButton(text="Find centre")
        self.size = widgets.SpinBox(label="size (0: auto)", value=0, min=0, max=1 << 16, step=2,
                                    tooltip="side of the output patterns in output pixels, even; 0: the largest "
                                            "multiple of 32 whose square stays on the detector")
        self.bin = widgets.SpinBox(label="bin", value=1, min=1, max=64,
                                   tooltip="sum bin x bin detector pixels into one; a block with any unmeasured "
                                           "pixel is unmeasured")
        self.dark = image_layer_picker(napari_viewer, "dark", nullable=True)
        self.dark.value = None
        self.dark.tooltip = "an integrating detector's frames without beam: their mean is subtracted first"
        self.adu = widgets.FloatSpinBox(label="units per photon", value=0.0, min=0.0, max=1e9, step=0.5,
                                        tooltip="detector units one photon gives: the frames (less the dark) are "
                                                "rounded to whole photons; 0: the frames are counts already")
        self.runner = JobRunner(self._on_progress, self._on_result, on_finish=self._on_finish)
        self.controls = JobControls("Prepare", self.run, self.runner)
        title = widgets.Label(value="Raw detector frames to centred patterns:")
        super().__init__(widgets=[title, self.frames, self.mask, self.auto, self.centre_y, self.centre_x,
                                  self.find_button, self.size, self.bin, self.dark, self.adu, self.controls])
        self.find_button.changed.connect(lambda _v=None: self.run(find_only=True))
        self.auto.changed.connect(self._auto_changed)
        self._auto_changed()
        self._job, self._placing, self._followed = None, False, set()
        persist(self, "prepare", ("size", "bin", "adu"))

    def _auto_changed(self, _value=None):
        self.centre_y.enabled = self.centre_x.enabled = not self.auto.value

    def centre(self):
        """The typed centre ``(row, column)``."""
        return float(self.centre_y.value), float(self.centre_x.value)

    def run(self, find_only=False):
        """Find the centre (``find_only``) or prepare the chosen layer (errors become notifications)."""
        if self.runner.running:
            return
        try:
            stack, _single = stack_of(self.frames.value)
            mask = mask_of(self.mask.value, stack.shape)
            size = int(self.size.value) or None
            if size is not None and size % 2:
                raise ValueError(f"the size must be even (the zero frequency sits at pixel size // 2), got {size}")
            if size is not None:
                core.check_side(size, f"the size {size}", "a size of")
                core.frames_in_budget(stack.shape, size, int(self.bin.value))
            centre = None if (find_only or self.auto.value) else self.centre()
            dark = self._dark(stack.shape)
            adu = float(self.adu.value) or None
            file_centre = self._file_centre()
            if centre is not None:
                core.check_centre(centre, stack.shape)
            if not find_only:
                side = size or max(stack.shape[-2:])
                need = stack.shape[0] * side * side * 5  # float32 patterns and their bool mask
                if need > io.memory_budget():
                    raise ValueError(f"the prepared stack would take {io.format_bytes(need)}, more than the memory "
                                     f"budget of {io.format_bytes(io.memory_budget())}; use `cdinn prepare`, which "
                                     "streams it to a file")
        except (ValueError, OSError) as exc:
            notify_error(exc)
            return
        self._job = {"name": self.frames.value.name, "find_only": find_only, "bin": int(self.bin.value),
                     "dark": None if dark is None else self.dark.value.name, "adu_per_photon": adu}
        self.controls.busy("summing the frames..." if centre is None else "preparing...")
        if find_only:
            self.runner.start(lambda progress, should_stop: find_job(stack, mask, progress, should_stop, dark,
                                                                     file_centre))
        else:
            b = int(self.bin.value)
            self.runner.start(lambda progress, should_stop: prepare_job(stack, mask, centre, size, b, progress,
                                                                        should_stop, dark, adu, file_centre))

    def _file_centre(self):
        """The beam centre the frames layer's file records (NeXus/Dectris), or None."""
        path = getattr(getattr(self.frames.value, "source", None), "path", None)
        return io.file_beam_centre(path) if path and os.path.isfile(path) else None

    def _dark(self, shape):
        """The mean frame of the dark layer (checked against the frames), or None."""
        if self.dark.value is None:
            return None
        if self.dark.value is self.frames.value:
            raise ValueError("the dark layer is the frames layer; choose the frames taken without beam")
        data, _single = stack_of(self.dark.value)
        if tuple(data.shape[-2:]) != tuple(shape[-2:]):
            raise ValueError(f"the dark frames are {data.shape[-2]} x {data.shape[-1]} pixels, the detector frames "
                             f"{shape[-2]} x {shape[-1]}")
        return core.mean_dark(data)

    def _on_progress(self, info):
        what = "summing the frames" if info["stage"] == "centre" else "preparing"
        self.controls.set_progress(info["done"], info["total"], f"{what}: {info['done']} of {info['total']} frame(s)")

    def _show_centre(self, name, centre):
        """The centre as a cross on the frames; dragging it types the new centre (and unticks "find")."""
        self._placing = True
        try:
            layer = add_or_update_points(self.viewer, f"{name} centre", centre)
        finally:
            self._placing = False
        self.centre_y.value, self.centre_x.value = centre

        def moved(_event=None):
            if not self._placing and len(layer.data):
                self.auto.value = False
                self.centre_y.value, self.centre_x.value = (float(v) for v in layer.data[-1][-2:])

        if id(layer) not in self._followed:
            layer.events.data.connect(moved)
            self._followed.add(id(layer))

    def _on_result(self, res):
        job = self._job
        name, find_only, b = job["name"], job["find_only"], job["bin"]
        if res.get("centre") is None:
            self.controls.idle("stopped before the centre was found")
            return
        self._show_centre(name, res["centre"])
        where = f"centre (row, column) = ({res['centre'][0]:g}, {res['centre'][1]:g}) {core.CENTRE_SOURCES[res['source']]}"
        if res["note"]:
            notify(res["note"])
        if find_only:
            self.controls.idle(where)
            return
        if res["intensity"] is None:
            self.controls.idle(f"{where}; stopped before any frame was prepared")
            return
        size = res["size"]
        meta = {"cdinn_source": f"{name} prepared", "centre": list(res["centre"]), "size": size, "bin": b,
                "prepared_from": name, "dark": job["dark"], "adu_per_photon": job["adu_per_photon"]}
        data = res["intensity"]
        layer = add_or_update(self.viewer, _layers.intensity_tuple(data, f"{name} prepared", **meta))
        add_or_update(self.viewer, _layers.mask_tuple(res["mask"], f"{name} prepared mask", **meta))
        for other in (name, f"{name} centre"):  # the frames live in detector coordinates: out of the way
            if other in self.viewer.layers:
                self.viewer.layers[other].visible = False
        self.viewer.layers.selection.active = layer
        self.viewer.reset_view()
        text = f"{where}; {len(data)} pattern(s) of {size} x {size}" + (f", binned {b} x {b}" if b > 1 else "")
        self.controls.idle(("stopped: " if res["stopped"] else "") + text)

    def _on_finish(self):
        if not self.controls.run_button.enabled:
            self.controls.idle()


def add_or_update_points(viewer, name, centre):
    """A Points layer ``name`` holding one cross at ``centre`` (replaced if it exists)."""
    point = np.asarray([centre], dtype=float)
    if name in viewer.layers:
        layer = viewer.layers[name]
        layer.data = point
        return layer
    return viewer.add_points(point, name=name, symbol="cross", size=12, face_color="cyan", border_color="cyan",
                             metadata={_layers.KIND: "centre"})
