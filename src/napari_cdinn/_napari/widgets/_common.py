"""Pieces shared by the dock widgets: layer pickers, notifications, a worker runner, a plot."""

from __future__ import annotations

import threading

import numpy as np
from magicgui import widgets
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from .. import layers as _layers


def one_sentence(exc):
    """The first line of an exception's message, as one sentence for a notification."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if text.endswith((".", "!", "?")) else text + "."


def notify_error(exc_or_text):
    """Show an error as a napari notification in one sentence."""
    text = exc_or_text if isinstance(exc_or_text, str) else one_sentence(exc_or_text)
    show_error(text[:1].upper() + text[1:])


def notify(text):
    """Show an information notification."""
    show_info(text)


def image_layer_picker(viewer, label, kind=None, nullable=False):
    """A ComboBox of the viewer's image layers, kept up to date as layers come and go.

    Layers whose ``cdinn_kind`` metadata equals ``kind`` are listed first.
    """

    def choices(_widget=None):
        layers = [layer for layer in viewer.layers if isinstance(layer, Image)]
        if kind is not None:
            layers.sort(key=lambda layer: layer.metadata.get(_layers.KIND) != kind)
        return [(layer.name, layer) for layer in layers]

    box = widgets.ComboBox(label=label, choices=choices, nullable=nullable)
    events = viewer.layers.events
    for event in (events.inserted, events.removed, events.reordered):
        event.connect(lambda _e=None: box.reset_choices())
    return box


def mask_layer_picker(viewer, patterns=None, label="mask"):
    """A ComboBox of the viewer's Labels and Image layers that can mark unmeasured pixels.

    The empty choice (the default) means no mask.  Labels layers are listed first.  When
    ``patterns`` (the dock's pattern picker) changes, or a mask layer is added, the mask the
    pattern file carries (a Labels layer the reader made from the same file) is chosen if no mask
    is chosen yet.
    """

    def choices(_widget=None):
        layers = [layer for layer in viewer.layers if isinstance(layer, Labels | Image)]
        layers.sort(key=lambda layer: not isinstance(layer, Labels))
        return [(layer.name, layer) for layer in layers]

    box = widgets.ComboBox(label=label, choices=choices, nullable=True, value=None,
                           tooltip="pixels that were not measured (beamstop, gaps): nonzero = unmeasured; "
                                   "shaped like one pattern (H, W) or like the stack (N, H, W)")

    def own_mask(_e=None):
        source = getattr(patterns.value, "metadata", {}).get("cdinn_source") if patterns is not None else None
        if box.value is not None or source is None:
            return
        for layer in viewer.layers:
            if (isinstance(layer, Labels) and layer.metadata.get(_layers.KIND) == "mask"
                    and layer.metadata.get("cdinn_source") == source):
                box.value = layer
                return

    events = viewer.layers.events
    for event in (events.inserted, events.removed, events.reordered):
        event.connect(lambda _e=None: box.reset_choices())
    events.inserted.connect(own_mask)
    if patterns is not None:
        patterns.changed.connect(own_mask)
    own_mask()
    return box


def mask_of(layer, shape):
    """Unmeasured pixels (True) from a mask ``layer`` for patterns of ``shape`` (N, H, W), or None.

    Nonzero (and NaN) values are unmeasured.  A lazy (dask) layer stays lazy: the worker's chunked
    loop (:func:`napari_cdinn.stream.iter_chunks`) reads it chunk by chunk.

    Raises
    ------
    ValueError
        The layer is shaped neither like one pattern (H, W) nor like the stack (N, H, W).
    """
    if layer is None:
        return None
    data = layer.data
    if getattr(layer, "multiscale", False) or getattr(layer, "rgb", False):
        raise ValueError(f"the mask layer {layer.name!r} must be a plain (H, W) or (N, H, W) array")
    frame, stack = tuple(shape[-2:]), (shape[0],) + tuple(shape[-2:])
    if tuple(data.shape) not in (frame, stack):
        raise ValueError(f"the mask layer {layer.name!r} is shaped {tuple(data.shape)}, which matches neither "
                         f"one pattern {frame} nor the stack {stack}")
    if np.dtype(data.dtype).kind == "c":
        raise ValueError(f"the mask layer {layer.name!r} holds complex data, not a mask")
    return data != 0  # a copy for NumPy data: painting the layer later does not change a running job


def stack_of(layer):
    """``(intensities, single)``: the layer's true intensities as (N, H, W) and whether it was 2-D.

    The returned array may be lazy (dask); compute it in a worker.
    """
    if layer is None:
        raise ValueError("choose an image layer first")
    data = _layers.layer_intensities(layer.data, layer.metadata)
    if getattr(layer, "rgb", False) or data.ndim not in (2, 3):
        raise ValueError(f"layer {layer.name!r} is not a pattern (H, W) or a stack (N, H, W)")
    if np.dtype(data.dtype).kind == "c":
        raise ValueError(f"layer {layer.name!r} holds complex data, not intensities")
    return (data[None] if data.ndim == 2 else data), data.ndim == 2


class _Bridge(QObject):
    """Carries progress messages from a worker thread to the main thread (queued signal)."""

    progress = Signal(object)


class JobRunner:
    """Run ``job(progress, should_stop)`` in a napari thread worker.

    ``progress(info)`` may be called from the worker thread; ``on_progress(info)`` receives it
    on the main thread.  ``on_result(value)`` and ``on_error(exc)`` run on the main thread;
    ``on_finish()`` always runs last.  :meth:`stop` sets the flag ``should_stop()`` reads.
    """

    def __init__(self, on_progress, on_result, on_error=notify_error, on_finish=None):
        self._bridge = _Bridge()
        self._bridge.progress.connect(on_progress)
        self._on_result, self._on_error, self._on_finish = on_result, on_error, on_finish
        self._stop = threading.Event()
        self.worker = None

    @property
    def running(self):
        """True while a job runs."""
        return self.worker is not None

    def start(self, job):
        """Start ``job`` in a thread worker (one at a time)."""
        if self.running:
            raise RuntimeError("a job is already running")
        self._stop.clear()
        worker = create_worker(job, self._bridge.progress.emit, self._stop.is_set,
                               _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_result)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._finished)
        self.worker = worker
        worker.start()

    def stop(self):
        """Ask the running job to stop at its next check."""
        self._stop.set()

    @property
    def stopped(self):
        """True when Stop was pressed during the current or last job."""
        return self._stop.is_set()

    def _finished(self):
        self.worker = None
        if self._on_finish is not None:
            self._on_finish()


class JobControls(widgets.Container):
    """Run / Stop buttons, a progress bar and a status line wired to a :class:`JobRunner`."""

    def __init__(self, run_text, on_run, runner):
        self.run_button = widgets.PushButton(text=run_text)
        self.stop_button = widgets.PushButton(text="Stop", enabled=False)
        self.progress = widgets.ProgressBar(value=0, min=0, max=100, label="progress")
        self.status = widgets.Label(value="")
        buttons = widgets.Container(widgets=[self.run_button, self.stop_button], layout="horizontal", labels=False)
        super().__init__(widgets=[buttons, self.progress, self.status], labels=False)
        self.runner = runner
        self.run_button.changed.connect(lambda _v=None: on_run())
        self.stop_button.changed.connect(lambda _v=None: self._stop())

    def _stop(self):
        self.runner.stop()
        self.status.value = "stopping..."

    def busy(self, text="running..."):
        """Switch to the running state."""
        self.run_button.enabled, self.stop_button.enabled = False, True
        self.progress.value = 0
        self.status.value = text

    def idle(self, text=None):
        """Back to the idle state."""
        self.run_button.enabled, self.stop_button.enabled = True, False
        if text is not None:
            self.status.value = text

    def set_progress(self, done, total, text=None):
        """Show ``done`` of ``total`` on the bar (and an optional status text)."""
        self.progress.value = round(100 * done / max(total, 1))
        if text is not None:
            self.status.value = text


class PlotCanvas:
    """A small matplotlib figure embedded in a magicgui container (Qt backend)."""

    def __init__(self, height=2.4):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, height), tight_layout=True)
        self.axes = self.figure.add_subplot(111)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(int(height * 60))

    def add_to(self, container):
        """Put the canvas at the end of ``container``."""
        container.native.layout().addWidget(self.canvas)

    def draw(self):
        """Redraw (cheap, idle-time)."""
        self.canvas.draw_idle()


def add_or_update(viewer, layer_tuple):
    """Add a LayerDataTuple as a layer, or replace the data of the layer of the same name."""
    data, kwargs, _kind = layer_tuple
    name = kwargs["name"]
    if name in viewer.layers:
        layer = viewer.layers[name]
        if layer.data.shape == np.shape(data):
            layer.data = data
            layer.metadata.update(kwargs.get("metadata", {}))
            return layer
        viewer.layers.remove(layer)
    return viewer.add_image(data, **kwargs)
