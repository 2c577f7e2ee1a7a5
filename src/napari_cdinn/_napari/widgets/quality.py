"""Quality view: the chi^2 histogram of a result stack, best/worst frames, the twin toggle.

The paper's Figs. 4/5, interactively.  chi^2 (design.md) is computed against a measured
intensity layer where one is chosen (the result's object, zero-padded to the pattern's size,
propagated and compared with a least-squares scale; the mask layer's and NaN pixels left out),
else taken from the amplitude layer's ``chi2`` metadata that a result widget or the reader put
there.  Frames are ranked by their misfit beyond the counting noise, ``max(chi2 - chi2_noise, 0)``
(:func:`napari_cdinn.pipelines.noise_floor`; 0 for data that are not counts), as the trust and
restart rules and the fallback judge them: a frame of few photons is not "worse" for its noise,
nor is a fit below the noise better than one at it (it follows the noise).
The twin toggle replaces the current frame of the amplitude and phase layers by its twin
(centro-symmetric inversion + conjugate), which has the same diffraction pattern; pressing it
again flips the frame back.  Everything here is cheap and runs on the main thread.
"""

from __future__ import annotations

import numpy as np
from magicgui import widgets

from ... import physics
from .. import layers as _layers
from ._common import (
    PlotCanvas,
    image_layer_picker,
    mask_layer_picker,
    mask_of,
    notify_error,
    refresh_complex,
    stack_of,
)


def result_chi2(amplitude, phase, measured, mask=None):
    """Per-frame chi^2 of a result (amplitude, phase: (N, h, w)) against measured (N, H, W).

    The object is zero-padded by ``H // h`` (which must be a whole number) before propagation;
    ``mask`` ((H, W) or (N, H, W), True = unmeasured) and NaN pixels are left out.
    """
    amplitude, phase = np.asarray(amplitude, np.float64), np.asarray(phase, np.float64)
    measured = np.asarray(measured, np.float64)
    if measured.shape[0] != amplitude.shape[0]:
        raise ValueError(f"the result has {amplitude.shape[0]} frame(s) but the pattern stack {measured.shape[0]}")
    factor = measured.shape[-1] // amplitude.shape[-1]
    if factor < 1 or measured.shape[-2:] != (factor * amplitude.shape[-2], factor * amplitude.shape[-1]):
        raise ValueError(f"a {amplitude.shape[-2:]} result does not fit {measured.shape[-2:]} patterns by a whole oversampling factor")
    predicted = physics.intensity(physics.pad(amplitude * np.exp(1j * phase), factor))
    bad = ~np.isfinite(measured)
    if mask is not None:
        bad = bad | np.broadcast_to(np.asarray(mask, dtype=bool), measured.shape)
    return physics.chi2(np.where(bad, 0.0, measured), predicted, mask=bad if bad.any() else None)


class QualityView(widgets.Container):
    """Dock widget: chi^2 histogram, jump to best/worst frames, flip a frame to its twin."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.amplitude = image_layer_picker(napari_viewer, "amplitude", kind="amplitude")
        self.phase = image_layer_picker(napari_viewer, "phase", kind="phase")
        self.measured = image_layer_picker(napari_viewer, "patterns", kind="intensity", nullable=True)
        self.mask = mask_layer_picker(napari_viewer, self.measured)
        self.update_button = widgets.PushButton(text="Update chi²")
        self.summary = widgets.Label(value="")
        # a callable: the list survives the reset_choices napari calls whenever a layer is added
        self.frames = widgets.ComboBox(label="frames (best first)", choices=self._frame_choices)
        self.best_button = widgets.PushButton(text="Best")
        self.worst_button = widgets.PushButton(text="Worst")
        self.twin_button = widgets.PushButton(text="Flip frame to twin")
        jump = widgets.Container(widgets=[self.best_button, self.worst_button], layout="horizontal", labels=False)
        super().__init__(widgets=[self.amplitude, self.phase, self.measured, self.mask, self.update_button, self.summary,
                                  self.frames, jump, self.twin_button])
        self.plot = PlotCanvas()
        self.plot.add_to(self)
        self.chi2 = self.noise = self.order = None
        self.update_button.changed.connect(lambda _v=None: self.update())
        self.best_button.changed.connect(lambda _v=None: self.jump_to_rank(0))
        self.worst_button.changed.connect(lambda _v=None: self.jump_to_rank(-1))
        self.frames.changed.connect(self._on_frame_chosen)
        self.twin_button.changed.connect(lambda _v=None: self.flip_current())
        napari_viewer.layers.selection.events.active.connect(self._follow_selection)

    def _follow_selection(self, event=None):
        """Choose the result the user selects in the layer list (its amplitude and phase pair)."""
        layer = self.viewer.layers.selection.active
        kind = getattr(layer, "metadata", {}).get("cdinn_kind")
        if kind not in ("amplitude", "phase"):
            return
        other = "phase" if kind == "amplitude" else "amplitude"
        pair = layer.name[: -len(kind)] + other if layer.name.endswith(kind) else None
        partner = self.viewer.layers[pair] if pair is not None and pair in self.viewer.layers else None
        for box, target in ((self.amplitude, layer if kind == "amplitude" else partner),
                            (self.phase, layer if kind == "phase" else partner)):
            if target is not None and target in box.choices:
                box.value = target

    # ------------------------------------------------------------------ chi^2
    def update(self):
        """Recompute chi^2 (and its counting-noise floor) of the chosen result, redraw the histogram of
        the misfit beyond the noise, refill the frame list (best first); returns chi^2."""
        try:
            chi2, noise = self._scores()
        except (ValueError, TypeError) as exc:
            notify_error(exc)
            return None
        done = np.isfinite(chi2)  # a stopped run leaves the frames it did not reach NaN: not ranked
        if not done.any():
            notify_error("no frame of this result was reconstructed (its chi² is NaN everywhere)")
            return None
        self.chi2, self.noise = chi2, noise
        misfit, counts = np.maximum(chi2 - noise, 0.0), bool(noise[done].any())
        self.order = np.flatnonzero(done)[np.argsort(misfit[done], kind="stable")]
        self.amplitude.value.metadata.update(chi2=chi2, chi2_noise=noise)
        with self.frames.changed.blocked():
            self.frames.reset_choices()
        floor = f", counting noise {np.median(noise[done]):.3g}" if counts else ""
        ranked = "beyond the noise" if counts else "chi²"
        missing = f" ({(~done).sum()} not reconstructed, left out)" if not done.all() else ""
        self.summary.value = (f"{chi2.size} frames{missing}; chi² median {np.median(chi2[done]):.3g}{floor}; {ranked}: "
                              f"best {misfit[self.order[0]]:.3g}, worst {misfit[self.order[-1]]:.3g}")
        self._draw(misfit[done], counts)
        return chi2

    def _frame_choices(self, _widget=None):
        if getattr(self, "order", None) is None:
            return []
        return [(f"frame {i}: chi² = {self.chi2[i]:.3g}" + (f" (noise {self.noise[i]:.3g})" if self.noise[i] else ""),
                 int(i)) for i in self.order]

    def _scores(self):
        """``(chi2, chi2_noise)`` per frame, float64: against the measured layer (less the mask) where one is
        chosen, else the result's metadata (no noise recorded: 0)."""
        from ...pipelines import noise_floor

        amp_layer, pha_layer = self.amplitude.value, self.phase.value
        if amp_layer is None or pha_layer is None:
            raise ValueError("choose the result's amplitude and phase layers first")
        n = 1 if amp_layer.data.ndim == 2 else amp_layer.data.shape[0]
        if self.measured.value is None:
            known, noise = amp_layer.metadata.get("chi2"), amp_layer.metadata.get("chi2_noise")
            if known is None or np.size(known) != n:
                raise ValueError("this result carries no chi², so choose its measured pattern layer")
            noise = np.zeros(n) if noise is None or np.size(noise) != n else np.asarray(noise, dtype=np.float64)
            return np.asarray(known, dtype=np.float64).reshape(n), noise.reshape(n)
        if amp_layer.data.shape != pha_layer.data.shape:
            raise ValueError("the amplitude and phase layers differ in shape")
        measured, _ = stack_of(self.measured.value)
        measured = np.asarray(measured)
        mask = mask_of(self.mask.value, measured.shape)
        mask = None if mask is None else np.asarray(mask)
        amp = np.asarray(amp_layer.data).reshape((n,) + amp_layer.data.shape[-2:])
        pha = _layers.layer_phase(pha_layer.data).reshape(amp.shape)
        chi2 = np.asarray(result_chi2(amp, pha, measured, mask), dtype=np.float64).reshape(n)
        return chi2, np.asarray(noise_floor(measured, mask), dtype=np.float64).reshape(n)

    def _draw(self, misfit, beyond_noise):
        ax = self.plot.axes
        ax.clear()
        ax.hist(misfit, bins=min(50, max(5, misfit.size // 4)), color="tab:blue")
        ax.set_xlabel("chi² beyond the counting noise" if beyond_noise else "chi²")
        ax.set_ylabel("frames")
        self.plot.draw()

    # ------------------------------------------------------------------ navigation
    def jump_to(self, frame):
        """Show ``frame`` of the stack in the viewer."""
        if self.viewer.dims.ndim >= 3:
            self.viewer.dims.set_current_step(0, int(frame))

    def jump_to_rank(self, rank):
        """Jump to the frame of the given chi^2 rank (0: best, -1: worst)."""
        if self.order is None and self.update() is None:
            return
        frame = int(self.order[rank])
        with self.frames.changed.blocked():
            self.frames.value = frame
        self.jump_to(frame)  # also when the list already shows this frame (no change event then)

    def _on_frame_chosen(self, frame):
        if frame is not None:
            self.jump_to(frame)

    # ------------------------------------------------------------------ twin
    def flip_current(self):
        """Replace the current frame of the amplitude and phase layers by its twin (a toggle)."""
        amp_layer, pha_layer = self.amplitude.value, self.phase.value
        if amp_layer is None or pha_layer is None or amp_layer.data.shape != pha_layer.data.shape:
            notify_error("choose an amplitude and a phase layer of the same shape first")
            return
        frame = self.viewer.dims.current_step[0] if amp_layer.data.ndim == 3 else None
        for layer in (amp_layer, pha_layer):
            if not (isinstance(layer.data, np.ndarray) and layer.data.flags.writeable):
                layer.data = np.array(layer.data, dtype=np.float32)
        index = (slice(None), slice(None)) if frame is None else (frame,)
        amp_layer.data[index] = physics.twin(amp_layer.data[index]).real
        pha_layer.data[index] = -physics.twin(pha_layer.data[index]).real
        n = 1 if frame is None else amp_layer.data.shape[0]
        flipped = np.asarray(amp_layer.metadata.get("cdinn_twin", np.zeros(n, bool)), dtype=bool).reshape(-1)
        flipped = flipped if flipped.size == n else np.zeros(n, bool)
        flipped[frame or 0] ^= True
        amp_layer.metadata["cdinn_twin"] = flipped
        amp_layer.refresh()
        pha_layer.refresh()
        complex_name = amp_layer.name[: -len("amplitude")] + "complex" if amp_layer.name.endswith("amplitude") else None
        if complex_name in self.viewer.layers:  # the result's complex view follows, and is shown
            refresh_complex(self.viewer, amp_layer, pha_layer)
            self.viewer.layers[complex_name].visible = True
        else:
            for layer in (amp_layer, pha_layer):
                layer.visible = True  # the flipped layers are the ones shown
        where = "" if frame is None else f"frame {frame} of "
        self.summary.value = f"{where}{amp_layer.name!r} and {pha_layer.name!r} flipped to the twin"
