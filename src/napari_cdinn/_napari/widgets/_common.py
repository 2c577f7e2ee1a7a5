"""Pieces shared by the dock widgets: layer pickers, notifications, a worker runner, a plot."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
from magicgui import widgets
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QApplication

from ...device import refresh_window, threads_applied
from .. import layers as _layers


def one_sentence(exc):
    """The first line of an exception's message, as one sentence for a notification."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if text.endswith((".", "!", "?")) else text + "."


def notify_error(exc_or_text):
    """Show an error as a napari notification in one sentence."""
    text = one_sentence(exc_or_text)  # a string too: capital and full stop
    show_error(text[:1].upper() + text[1:])


def notify(text):
    """Show an information notification (a clause from the core becomes a sentence: capital, full stop)."""
    text = text[:1].upper() + text[1:]
    show_info(text if text.endswith((".", "?", "!")) else text + ".")


def image_layer_picker(viewer, label, kind=None, nullable=False):
    """A ComboBox of the viewer's image layers, kept up to date as layers come and go.

    Layers whose ``cdinn_kind`` metadata equals ``kind`` are listed first, then visible ones, top
    (last added) first: the default is the layer of that kind one sees.  Colour (RGB/RGBA) layers,
    such as the docks' complex view and its colour-wheel legend, hold no intensities, amplitudes or
    phases: they are not offered.
    """

    def choices(_widget=None):
        layers = [layer for layer in viewer.layers if isinstance(layer, Image) and not layer.rgb][::-1]
        layers.sort(key=lambda layer: (kind is not None and layer.metadata.get(_layers.KIND) != kind,
                                       not layer.visible))
        return [(layer.name, layer) for layer in layers]

    box = widgets.ComboBox(label=label, choices=choices, nullable=nullable)
    events = viewer.layers.events
    for event in (events.inserted, events.removed, events.reordered):
        event.connect(lambda _e=None: box.reset_choices())
    return box


def mask_layer_picker(viewer, patterns=None, label="mask", tooltip=None):
    """A ComboBox of the viewer's Labels and Image layers that can mark unmeasured pixels.

    The empty choice (the default) means no mask.  Labels layers are listed first.  When
    ``patterns`` (the dock's pattern picker) changes, or a mask layer is added, the mask the
    pattern file carries (a Labels layer the reader made from the same file) is chosen if no mask
    is chosen yet; a mask chosen for other patterns, which does not fit the new ones, is let go.
    """

    def choices(_widget=None):
        layers = [layer for layer in viewer.layers if isinstance(layer, Labels | Image)]
        layers.sort(key=lambda layer: not isinstance(layer, Labels))
        return [(layer.name, layer) for layer in layers]

    box = widgets.ComboBox(label=label, choices=choices, nullable=True, value=None,
                           tooltip=tooltip or "pixels that were not measured (beamstop, gaps): nonzero = unmeasured; "
                                              "shaped like one pattern (H, W) or like the stack (N, H, W)")

    def fits(mask, pattern):
        frame, shape = tuple(pattern.data.shape[-2:]), tuple(mask.data.shape)
        return shape == frame or (len(shape) == 3 and shape == tuple(pattern.data.shape))

    def own_mask(_e=None):
        pattern = patterns.value if patterns is not None else None
        if box.value is not None and pattern is not None and not fits(box.value, pattern):
            box.value = None  # chosen for other patterns: it would only fail the next run
        source = getattr(pattern, "metadata", {}).get("cdinn_source")
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


#: Runners with a job under way, closed (stopped and waited for) when the application quits.
_LIVE: set = set()
_QUIT_HOOKED = []


def _close_live_runners():
    for runner in list(_LIVE):
        runner.close()


#: The timer that keeps the thread policy's measurement window recent (one for all docks).
_WINDOW_TIMER: list = []


def _keep_thread_window_fresh(interval_ms=5000):
    """Refresh the thread policy's window every few seconds while docks are open (one file read), so that
    a job's thread count is measured without a wait (:func:`napari_cdinn.device.refresh_window`)."""
    from qtpy.QtCore import QTimer

    if _WINDOW_TIMER or QApplication.instance() is None:
        return
    refresh_window()
    timer = QTimer(QApplication.instance())
    timer.timeout.connect(refresh_window)
    timer.start(interval_ms)
    _WINDOW_TIMER.append(timer)


class JobRunner:
    """Run ``job(progress, should_stop)`` in a napari thread worker.

    ``progress(info)`` may be called from the worker thread; ``on_progress(info)`` receives it
    on the main thread.  ``on_result(value)`` and ``on_error(exc)`` run on the main thread;
    ``on_finish()`` always runs last.  :meth:`stop` sets the flag ``should_stop()`` reads.
    The job runs with torch's threads set to the free cores less one, left to the viewer (at least
    1; :func:`napari_cdinn.device.threads_applied`), restored after it.

    Closing: :meth:`close_with` ties the runner to a Qt widget; when that widget is destroyed
    (its dock or the viewer closed), or the application quits, :meth:`close` stops the job, waits
    for it to end (training then writes its checkpoint) and drops every later callback, so that no
    deleted widget is touched.
    """

    #: Seconds :meth:`close` waits for a stopped job to end.
    close_wait_s = 120.0

    def __init__(self, on_progress, on_result, on_error=notify_error, on_finish=None):
        _keep_thread_window_fresh()
        self._bridge = _Bridge()
        self._bridge.progress.connect(self._progress)
        self._on_progress = on_progress
        self._on_result, self._on_error, self._on_finish = on_result, on_error, on_finish
        self._stop = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self.closed = False
        self.worker = None
        self.error = None  # the sentence of the last job's error, None after a job that did not fail

    @property
    def running(self):
        """True while a job runs."""
        return self.worker is not None

    def close_with(self, qwidget):
        """Stop and wait for the job when ``qwidget`` is destroyed or the application quits."""
        qwidget.destroyed.connect(lambda *_: self.close())
        app = QApplication.instance()
        if app is not None and not _QUIT_HOOKED:
            app.aboutToQuit.connect(_close_live_runners)
            _QUIT_HOOKED.append(True)

    def start(self, job):
        """Start ``job`` in a thread worker (one at a time)."""
        if self.running:
            raise RuntimeError("a job is already running")
        if self.closed:
            raise RuntimeError("the dock was closed")
        self._stop.clear()
        self._done.clear()
        self.error = None

        def body(emit, should_stop):
            try:
                with threads_applied(leave=1):  # the free cores less one, left to the viewer (at least 1)
                    return job(emit, should_stop)
            finally:
                self._done.set()

        worker = create_worker(body, self._bridge.progress.emit, self._stop.is_set,
                               _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._returned)
        worker.errored.connect(self._errored)
        worker.finished.connect(self._finished)
        self.worker = worker
        _LIVE.add(self)
        worker.start()

    def stop(self):
        """Ask the running job to stop at its next check."""
        self._stop.set()

    def close(self, timeout=None):
        """Stop the job, wait for it to end (up to ``timeout`` s), ignore its later callbacks."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        self._done.wait(self.close_wait_s if timeout is None else timeout)
        _LIVE.discard(self)

    @property
    def stopped(self):
        """True when Stop was pressed during the current or last job."""
        return self._stop.is_set()

    def _progress(self, info):
        if not self.closed:
            self._on_progress(info)

    def _returned(self, value):
        if not self.closed:
            self._on_result(value)

    def _errored(self, exc):
        self.error = one_sentence(exc)
        if not self.closed:
            self._on_error(exc)

    def _finished(self):
        self.worker = None
        _LIVE.discard(self)
        if self._on_finish is not None and not self.closed:
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
        runner.close_with(self.native)
        self.run_button.changed.connect(lambda _v=None: None if runner.running else on_run())
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
        """Back to the idle state; with no ``text``, a job that failed says so (its sentence)."""
        self.run_button.enabled, self.stop_button.enabled = True, False
        if text is None and self.runner.error:
            text = f"failed: {self.runner.error}"
        if text is not None:
            self.status.value = text

    def set_progress(self, done, total, text=None):
        """Show ``done`` of ``total`` on the bar (and an optional status text)."""
        self.progress.value = round(100 * done / max(total, 1))
        if text is not None:
            self.status.value = text


class PlotCanvas:
    """A small matplotlib figure embedded in a magicgui container (Qt backend).

    ``rows`` plots stacked vertically: ``axes`` is the first, ``all_axes`` lists them all.
    """

    def __init__(self, height=2.4, rows=1):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, height), tight_layout=True)
        self.all_axes = [self.figure.add_subplot(rows, 1, i + 1) for i in range(rows)]
        self.axes = self.all_axes[0]
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(int(height * 60))

    def add_to(self, container):
        """Put the canvas at the end of ``container``."""
        container.native.layout().addWidget(self.canvas)

    def draw(self):
        """Redraw (cheap, idle-time)."""
        self.canvas.draw_idle()


def add_or_update(viewer, layer_tuple, visible=True):
    """Add a LayerDataTuple (image or labels) as a layer, or replace the data of the layer of the same name.

    ``visible``: whether a newly added layer is shown (an updated layer keeps the user's choice).
    """
    data, kwargs, kind = layer_tuple
    kwargs = dict(kwargs, visible=visible)
    name = kwargs["name"]
    if name in viewer.layers:
        layer = viewer.layers[name]
        if layer.data.shape == np.shape(data) and isinstance(layer, Labels) == (kind == "labels"):
            layer.data = data
            layer.metadata.update(kwargs.get("metadata", {}))
            return layer
        viewer.layers.remove(layer)
    return viewer.add_labels(data, **kwargs) if kind == "labels" else viewer.add_image(data, **kwargs)


ENGINES = {"NN": "CDI NN", "PR": "phase retrieval"}
WHEEL = "phase wheel (hue = phase, brightness = amplitude)"


def show_result(viewer, source, engine, amplitude, phase, translate=None, support=None, **meta):
    """Show a result of ``engine`` ("NN" or "PR") on the pattern layer ``source``.

    The complex RGBA layer ``"{source} {engine} complex"`` is shown; the amplitude and phase layers
    are added hidden beneath it (the Quality view and the writer read them).  The phase layer is
    transparent outside ``support`` (default: amplitude above the shape threshold,
    :func:`napari_cdinn.physics.support_from_amplitude`); its contrast limits widen to fit
    unwrapped phases.
    """
    from ... import physics

    names = {key: f"{source} {engine} {key}" for key in ("amplitude", "phase", "complex")}
    add_or_update(viewer, _layers.amplitude_tuple(amplitude, names["amplitude"], translate=translate, **meta),
                  visible=False)
    if support is None:
        support = physics.support_from_amplitude(np.asarray(amplitude))
    shown = _layers.phase_tuple(phase, names["phase"], translate=translate, support=support, **meta)
    layer = add_or_update(viewer, shown, visible=False)
    lo, hi = shown[1]["contrast_limits"]
    now = tuple(layer.contrast_limits)
    if (lo, hi) == (-np.pi, np.pi) and now[0] < -np.pi - 1e-3 and now[1] > np.pi + 1e-3:
        layer.contrast_limits = (lo, hi)  # wrapped phases again after an unwrapped run
    elif lo < now[0] or hi > now[1]:
        layer.contrast_limits = (min(lo, now[0]), max(hi, now[1]))
    add_or_update(viewer, _layers.complex_tuple(amplitude, phase, names["complex"], translate=translate, **meta))
    return names


def refresh_complex(viewer, amplitude_layer, phase_layer):
    """Recompute the complex layer paired with ``amplitude_layer`` (``"... amplitude"`` -> ``"... complex"``)."""
    name = amplitude_layer.name
    if not name.endswith(" amplitude"):
        return
    name = name[: -len("amplitude")] + "complex"
    if name in viewer.layers and viewer.layers[name].data.shape[:-1] == amplitude_layer.data.shape:
        from ...display import complex_to_rgb

        viewer.layers[name].data = complex_to_rgb(np.asarray(amplitude_layer.data),
                                                  _layers.layer_phase(phase_layer.data), alpha=True)


def arrange_side_by_side(viewer, source, frame_view=True):
    """Put the pattern ``source``, the network's and the retrieval's results of it next to each other.

    Results (layers whose ``cdinn_source`` is ``source``, named ``"{source} NN ..."`` or
    ``"{source} PR ..."``) move one column to the right per engine, centred on the pattern's frame
    height; a colour wheel (the phase legend) follows; the stack axis is labelled ``frame`` (the
    same frame is shown in all); a text overlay names the columns; the view is framed on them all
    (``frame_view``).
    """
    if source not in viewer.layers:
        return
    pattern = viewer.layers[source]
    h, w = pattern.data.shape[-2:]
    gap = max(2, w // 8)
    engines = [e for e in ENGINES if any(layer.name.startswith(f"{source} {e} ") for layer in viewer.layers)]
    for layer in viewer.layers:
        if layer is pattern or layer.metadata.get("cdinn_source") != source:
            continue
        for column, engine in enumerate(engines, 1):
            if layer.name.startswith(f"{source} {engine} "):
                shape = layer.data.shape[-3:-1] if getattr(layer, "rgb", False) else layer.data.shape[-2:]
                dy, dx = _layers.centre_offset((h, w), shape)
                layer.translate = (0.0,) * (layer.ndim - 2) + (dy, dx + column * (w + gap))
    from ...display import colour_wheel

    size = max(16, h // 2)
    wheel = (colour_wheel(size), {"name": WHEEL, "rgb": True, "contrast_limits": (0.0, 1.0),
                                  "metadata": {_layers.KIND: "legend"}}, "image")
    layer = add_or_update(viewer, wheel)
    layer.translate = (0.0, (len(engines) + 1) * (w + gap))
    if viewer.dims.ndim == 3:
        viewer.dims.axis_labels = ("frame", "y", "x")
    viewer.text_overlay.text = "   |   ".join(["pattern (log10 1 + I)"] + [ENGINES[e] for e in engines])
    viewer.text_overlay.position = "top_left"  # notifications come up bottom right
    viewer.text_overlay.visible = True
    if frame_view:
        viewer.reset_view()


#: Where the docks' settings persist between napari launches (overridable for tests).
SETTINGS_ENV = "NAPARI_CDINN_SETTINGS_DIR"


def _settings_path(key):
    folder = os.environ.get(SETTINGS_ENV)
    if not folder:
        from platformdirs import user_config_dir

        folder = user_config_dir("napari-cdinn")
    return Path(folder) / f"{key}.json"


def persist(dock, key, names):
    """Restore the dock's widgets ``names`` from the last session and save them on every change.

    Only the values the user changed from the dock's defaults are saved (``{"changed": {...}}``), so
    that a default a later version changes (the trust threshold, say) reaches every user who never
    set it; a file of the earlier layout (every value, flat) is restored whole.  Values that no
    longer fit a widget (a choice that went away) are skipped; a settings file that cannot be read
    or written is ignored.
    """
    path = _settings_path(key)
    defaults = {name: getattr(dock, name).value for name in names}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    saved = saved["changed"] if isinstance(saved.get("changed"), dict) else saved  # else the earlier layout
    for name in names:
        if name in saved:
            try:
                getattr(dock, name).value = saved[name]
            except (ValueError, TypeError, KeyError):
                pass

    def save(_value=None):
        changed = {}
        for name in names:
            value = getattr(dock, name).value
            if value != defaults[name]:
                changed[name] = str(value) if isinstance(value, Path) else value
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"changed": changed}, default=str))
        except (OSError, TypeError, ValueError):
            pass

    for name in names:
        getattr(dock, name).changed.connect(save)
