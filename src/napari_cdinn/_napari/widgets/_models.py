"""The models the inversion widgets offer: shipped weights plus those trained in this session.

Listing needs no torch: shipped models are the ``*.safetensors`` files in ``nn/weights``.
The training dock calls :func:`register_model`; every open model picker offers it at once
(without choosing it).
"""

from __future__ import annotations

from pathlib import Path

from magicgui import widgets
from psygnal import Signal

from ...nn import WEIGHTS_DIR  # torch-free: listing the shipped models needs no torch

#: The first choice, ``None``: the nn engine picks the best shipped model for the pattern size
#: (:func:`napari_cdinn.nn.resolve_model`).
AUTO_LABEL = "automatic (best shipped for the size)"


class _Registry:
    changed = Signal()

    def __init__(self):
        self.trained = {}  # label -> path

    def choices(self):
        shipped = [(f"{p.stem} (shipped)", p.stem) for p in sorted(WEIGHTS_DIR.glob("*.safetensors"))]
        return [(AUTO_LABEL, None)] + shipped + [(label, str(path)) for label, path in self.trained.items()]


REGISTRY = _Registry()


def register_model(path, label=None):
    """Offer the model at ``path`` (a model directory or .safetensors file) in every picker."""
    path = Path(path)
    REGISTRY.trained[label or f"{path.name} (trained)"] = path
    REGISTRY.changed.emit()


class ModelPicker(widgets.Container):
    """A model ComboBox (shipped and trained) and an optional file/folder that overrides it."""

    def __init__(self):
        self.choice = widgets.ComboBox(label="model", choices=lambda _w=None: REGISTRY.choices())
        self.file = widgets.FileEdit(label="or model file", mode="r", filter="*.safetensors", value="")
        super().__init__(widgets=[self.choice, self.file])
        REGISTRY.changed.connect(self._refresh)

    def _refresh(self):
        try:
            self.choice.reset_choices()
        except RuntimeError:  # the Qt widget was closed with its viewer: stop listening
            REGISTRY.changed.disconnect(self._refresh)
        # a new model is offered, not chosen: the next run still uses the model the user picked

    @property
    def model(self):
        """What to pass as ``model=`` to the nn engine (None: the best shipped model for the pattern size).

        Raises ``FileNotFoundError`` (one sentence) for a typed file or folder that does not exist:
        running the chosen model instead would hide the mistake.
        """
        text = str(self.file.value or "").strip()
        if text and text != ".":
            if not Path(text).exists():
                raise FileNotFoundError(f"the model file or folder {text!r} does not exist")
            return text
        return self.choice.value
