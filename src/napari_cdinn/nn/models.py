"""Which model reads which pattern: one call, without torch (:func:`resolve_model`).

A model is named by ``None`` (the best shipped model for the pattern size), a shipped name
(``model``, ``model2x``), a ``.safetensors`` file or a model directory.  :func:`resolve_model`
finds the file, reads its architecture, input encoding and mask channel from the safetensors
header (no weights are loaded, torch is not imported) and checks once that the model can read
patterns of the given shape.  The CLI, the docks, :func:`napari_cdinn.nn.predict` and the report
all go through it.

Input sizes
-----------
The paper's networks read 32 x 32 amplitudes of the *unpadded* 32-pixel object; ``deep2x`` draws
64-pixel objects (:data:`OBJECT_SIZES`).  A square pattern of side ``S k`` for a model of
``S``-pixel objects (``k``-times oversampled) is decimated exactly by ``k``; a model reading
``m``-times oversampled patterns (``shared2x``, ``deep2x``: ``m = 2``) reads patterns with ``k`` a
multiple of ``m`` decimated by ``k / m`` (:func:`decimation_factor`), and others at a scale (below).
Sizes that are not a multiple of ``S``, or smaller than ``S m``, raise ``ValueError``.

Object size and scale
---------------------
Decimation keeps the pixel size and halves the field of view: it is right while the object fits
in the network's ``S`` pixels.  A larger object (a 64-pixel object in a 128 x 128 pattern, for a
32-pixel model) is read at a coarser *scale* ``c``: the central ``M / c`` pixels of the pattern are
the ``m``-times oversampled pattern of the object at ``c`` times the pixel size, which the network
reads (then decimated by ``k / (m c)``), and its ``S x S`` answer is interpolated back to ``S c``
pixels (:func:`napari_cdinn.nn.inference.predict`).  ``c`` need not be whole: a 192-pixel pattern
(the largest square ``cdinn prepare`` cuts from many detectors) holds the 2x-oversampled pattern of
the object at 1.5 times the pixel size in its central 128 pixels, decimated twice
(:func:`read_side`).  :func:`scales_for` lists the scales a model has for a pattern size;
:func:`candidates` the models and scales weighed for it, among which
:func:`napari_cdinn.nn.inference.choose_scale` picks from the data.

Default model
-------------
With no model named, :func:`default_model` picks the first shipped model of
:data:`DEFAULT_MODELS` that is installed and reads the pattern's size; where a shipped model of
another object size reads it too, the size policy weighs both (:func:`candidates`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_MODEL",
    "DEFAULT_MODELS",
    "OBJECT_SIZES",
    "SIZE",
    "WEIGHTS_DIR",
    "ModelInfo",
    "candidates",
    "decimation_factor",
    "default_model",
    "input_factor_of",
    "level_widths",
    "model_arch",
    "model_for",
    "object_size_of",
    "oversampling_factor",
    "read_card",
    "read_metadata",
    "read_side",
    "resolve_model",
    "resolve_model_path",
    "scales_for",
]

#: Side of the paper's networks' output frames (32 x 32); every size a network reads is a multiple of it.
SIZE = 32
#: Folder of the weights shipped with the package.
WEIGHTS_DIR = Path(__file__).with_name("weights")
#: Name of the default shipped model (``WEIGHTS_DIR / "model.safetensors"``), which reads every size.
DEFAULT_MODEL = "model"
#: Shipped models in order of preference when none is named (:func:`default_model`; a model that is
#: not installed is skipped).  ``model128`` (``deep2x``, 64-pixel objects in 128 x 128 patterns) is
#: weighed beside ``model2x`` by the size policy (:func:`candidates`), which keeps the better fit.
DEFAULT_MODELS = ("model2x", "model128", DEFAULT_MODEL)
#: Architecture names (:func:`napari_cdinn.nn.networks.build_model`).
ARCHITECTURES = ("paper", "shared", "shared2x", "deep2x")
#: Oversampling of the patterns each architecture reads.
INPUT_FACTORS = {"paper": 1, "shared": 1, "shared2x": 2, "deep2x": 2}
#: Side of the objects (the output frames) each architecture draws: 64 for ``deep2x``, which reads
#: 2x-oversampled 128 x 128 patterns with one more encoder and decoder level.
OBJECT_SIZES = {"paper": SIZE, "shared": SIZE, "shared2x": SIZE, "deep2x": 2 * SIZE}
#: The first convolution, whose input channels tell whether a model reads the mask channel.
_FIRST_CONV = "encoder.layers.0.weight"


def wrong_weights(name: str, arch: str, exc: BaseException) -> ValueError:
    """The one sentence for a weights file that does not load as an ``arch`` network (the loader's error ``exc``)."""
    text = str(exc).strip().splitlines()
    why = text[-1].strip() if text else type(exc).__name__
    return ValueError(f"{name!r} does not hold the weights of a {arch!r} network ({why})")


def nonfinite_weights(name: str, key: str) -> ValueError:
    """The one sentence for a weights file with NaN or infinite values (the first such tensor ``key``)."""
    return ValueError(f"{name!r} holds NaN or infinite weights ({key}...): the training that made it diverged; "
                      "use another checkpoint")


def input_factor_of(arch: str) -> int:
    """Oversampling factor of the patterns architecture ``arch`` reads (1 or 2)."""
    if arch not in INPUT_FACTORS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    return INPUT_FACTORS[arch]


#: Filters per level of the paper's encoders (its decoders run them backwards).
_PAPER_WIDTHS = (32, 64, 128)
#: Filters of each level a network for larger objects adds (``deep2x``: 8 x 8 -> 4 x 4).
_DEEP_WIDTH = 256


def level_widths(size: int = SIZE) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Encoder and decoder widths of a network drawing ``size``-pixel objects: the paper's three
    levels for 32, one more level per doubling (256 filters), so that the encoder always ends
    on 4 x 4 features and every output pixel hears every input pixel."""
    extra = (int(size) // SIZE).bit_length() - 1
    enc = _PAPER_WIDTHS + (_DEEP_WIDTH,) * extra
    return enc, enc[::-1]


def object_size_of(arch: str) -> int:
    """Side of the objects architecture ``arch`` draws (32, or 64 for ``deep2x``)."""
    input_factor_of(arch)  # an unknown name fails with its sentence
    return OBJECT_SIZES[arch]


def oversampling_factor(shape, size: int = SIZE) -> int:
    """Decimation factor ``k`` for a pattern of ``shape (..., H, W)`` of ``size``-pixel objects: ``H == W == size k``.

    Raises
    ------
    ValueError
        When the pattern is not square with a side that is a multiple of ``size``.
    """
    h, w = int(shape[-2]), int(shape[-1])
    if h != w or h % size or h == 0:
        from ..prepare import NOT_SQUARE_HINT

        raise ValueError(
            f"the networks read square patterns of {size} x {size} or k-times oversampled "
            f"{size}k x {size}k pixels, got {h} x {w}" + (NOT_SQUARE_HINT if h != w else "")
        )
    return h // size


def decimation_factor(shape, input_factor: int = 1, size: int = SIZE) -> int:
    """How much a pattern of ``shape`` is decimated for a model of ``size``-pixel objects reading
    ``input_factor``-times oversampled patterns.

    Raises
    ------
    ValueError
        When the pattern's oversampling (:func:`oversampling_factor`) is not a multiple of ``input_factor``.
    """
    k = oversampling_factor(shape, size)
    if k % input_factor:
        side = size * input_factor
        raise ValueError(
            f"this model reads {input_factor}x-oversampled patterns ({side} x {side}, or a multiple of it), "
            f"got {int(shape[-2])} x {int(shape[-1])}"
        )
    return k // input_factor


def scales_for(shape, input_factor: int = 1, size: int = SIZE) -> tuple:
    """The scales at which a model of ``size``-pixel objects reading ``input_factor``-times
    oversampled patterns can read patterns of ``shape`` (see the module notes), finest first.

    Scale ``c = M / K``: the network reads the central ``K = size * input_factor * b`` pixels of
    the ``M``-pixel pattern, decimated ``b`` times (``b`` = 1, 2, ...), and its object is
    interpolated back to ``size * c`` pixels, which must be a whole number.  Powers of 2 when
    ``M / (size * input_factor)`` is one; 1.5 for a 192-pixel pattern read by a 2x model (the
    central 128 pixels decimated twice).  Whole scales are ``int``, the others ``float`` (exact:
    ``size`` is a power of 2).

    Raises
    ------
    ValueError
        When the pattern's side is not a multiple of ``size`` (:func:`oversampling_factor`) or
        smaller than ``size * input_factor``.
    """
    k = oversampling_factor(shape, size)
    scales = [_as_number(k / (input_factor * b)) for b in range(k // input_factor, 0, -1)
              if (size * k) % (input_factor * b) == 0]
    if not scales:
        side = size * input_factor
        raise ValueError(
            f"this model reads {input_factor}x-oversampled patterns of {side} x {side} pixels or more, "
            f"got {int(shape[-2])} x {int(shape[-1])}"
        )
    return tuple(scales)


def _as_number(c: float):
    """A scale as ``int`` when it is whole, else as ``float``."""
    return int(c) if float(c).is_integer() else float(c)


def read_side(shape, scale) -> int:
    """Side ``K`` of the central crop a model reads at ``scale`` from patterns of ``shape`` (``M / scale``)."""
    return int(round(int(shape[-1]) / float(scale)))


def resolve_model_path(model=None) -> Path:
    """The .safetensors file meant by ``model``: None (shipped default), a shipped name, a file or a directory.

    A directory resolves to its ``best.safetensors``, else ``last.safetensors``, else
    ``model.safetensors``.  Raises ``ValueError`` (one sentence) when nothing is found.
    """
    if model is None:
        model = DEFAULT_MODEL
    p = Path(model)
    if p.is_dir():
        for name in ("best", "last", "model"):
            if (p / f"{name}.safetensors").is_file():
                return p / f"{name}.safetensors"
        raise ValueError(f"no best/last/model.safetensors in the model directory {str(p)!r}")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"model files must be .safetensors, got {str(p)!r}")
        return p
    shipped = WEIGHTS_DIR / f"{model}.safetensors"
    if p.name == str(model) and shipped.is_file():
        return shipped
    raise ValueError(f"no model named or found at {str(model)!r}")


def read_card(path) -> dict:
    """The JSON card beside a .safetensors file ({} if there is none)."""
    card = Path(path).with_suffix(".json")
    if not card.is_file():
        return {}
    try:
        value = json.loads(card.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"the model card {str(card)!r} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"the model card {str(card)!r} holds a JSON {type(value).__name__}, not an object")
    return value


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes and ``__metadata__``)."""
    header = None
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if 2 <= size <= path.stat().st_size - 8:
            try:
                header = json.loads(fh.read(size))
            except (ValueError, UnicodeDecodeError):
                header = None
    valid = isinstance(header, dict) and _tensors_fit(header, path.stat().st_size - 8 - size)
    if not valid:
        raise ValueError(f"{path.name!r} is not a valid safetensors file (truncated or another format)")
    return header


#: Bytes per element of the safetensors dtypes.
_ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _tensors_fit(header: dict, data_size: int) -> bool:
    """Whether every tensor the header lists has a known dtype, a shape, and bytes of that size inside the file."""
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = [int(d) for d in entry["shape"]]
            a, b = (int(x) for x in entry["data_offsets"])
            width = _ST_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            return False
        count = 1
        for d in shape:
            count *= d
        if min(shape, default=0) < 0 or not 0 <= a <= b <= data_size or b - a != count * width:
            return False
    return True


def read_metadata(model=None) -> dict:
    """The safetensors metadata of a model (``arch``, ``input``, ``mask``...), read without loading its weights."""
    meta = _header(resolve_model_path(model)).get("__metadata__") or {}
    return dict(meta) if isinstance(meta, dict) else {}


def model_arch(model=None) -> str:
    """Architecture name of a model (see :func:`resolve_model_path`), read without loading its weights."""
    path = resolve_model_path(model)
    return read_metadata(path).get("arch") or read_card(path).get("arch", "paper")


def _size_read(name: str, shape) -> int | None:
    """The object size of the shipped model ``name`` if it is installed and reads patterns of ``shape``, else None."""
    try:
        arch = model_arch(name)
        scales_for(shape, input_factor_of(arch), object_size_of(arch))
    except ValueError:  # not installed, or not this size
        return None
    return object_size_of(arch)


def default_model(shape=None) -> str:
    """Name of the shipped model used for patterns of ``shape`` when none is named.

    The first of :data:`DEFAULT_MODELS` that is installed and reads the pattern's size
    (:func:`decimation_factor`); ``DEFAULT_MODEL`` (reads every size) when ``shape`` is None.
    Where several read it, :func:`napari_cdinn.nn.inference.choose_scale` picks among them by the
    data (:func:`candidates`).

    Raises
    ------
    ValueError
        When ``shape`` is not a size the networks read (:func:`oversampling_factor`).
    """
    if shape is None:
        return DEFAULT_MODEL
    oversampling_factor(shape)
    return next((name for name in DEFAULT_MODELS if _size_read(name, shape) is not None), DEFAULT_MODEL)


def candidates(model, shape) -> list:
    """Every model and scale the size policy weighs for patterns of ``shape``, as :class:`ModelInfo`.

    A named model (or a :class:`ModelInfo`) at each of its scales (:func:`scales_for`); with
    ``model=None``, the first shipped model of :data:`DEFAULT_MODELS` per object size that is
    installed and reads the size (``model2x`` before ``model`` for 32-pixel objects), at each of
    its scales, in that order.
    """
    if model is not None:
        names = [model]
    else:
        names, sizes = [], set()
        for name in DEFAULT_MODELS:
            size = _size_read(name, shape)
            if size is not None and size not in sizes:
                names.append(name)
                sizes.add(size)
    out = []
    for name in names or [DEFAULT_MODEL]:
        info = resolve_model(name, shape)
        out += [resolve_model(info, shape, c) for c in scales_for(shape, info.input_factor, info.size)]
    return out


def model_for(model, shape):
    """``model`` itself, or when it is None the shipped model :func:`default_model` picks for ``shape``."""
    return default_model(shape) if model is None else model


@dataclass(frozen=True)
class ModelInfo:
    """A model resolved for a pattern shape (:func:`resolve_model`).

    Attributes
    ----------
    path : Path
        The ``.safetensors`` file, absolute.
    name : str
        The model as named: the shipped model chosen for the shape, or what was given.
    arch : str
        Architecture (:data:`ARCHITECTURES`).
    input_factor : int
        Oversampling of the patterns the model reads.
    mask_channel : bool
        Whether the model reads the map of unmeasured pixels beside the amplitudes.
    input_transform : str
        Input encoding (``linear`` or ``log``, :func:`napari_cdinn.nn.data.encode_inputs`).
    card : dict
        The model card beside the weights ({} if none).
    size : int
        Side of the objects the network draws (:data:`OBJECT_SIZES`).
    frame : tuple of int or None
        The pattern size ``(H, W)`` the model was checked against (None: not checked).
    decimation : int or None
        How much the central crop the model reads at ``scale`` (:func:`read_side`) is decimated
        (:func:`decimation_factor` of the crop).
    scale : int or float
        The object is read at ``scale`` times the pattern's pixel size (the central ``M / scale``
        pixels of the pattern; see the module notes); 1 by default.
    misfit : float or None
        Median ``chi2 - chi2_noise`` of a sample of the patterns at that scale, when
        :func:`napari_cdinn.nn.inference.choose_scale` chose it.
    extent : float or None
        Median lower bound of the objects' width from the autocorrelation of that sample
        (:func:`napari_cdinn.physics.autocorrelation_extent`; NaN behind a beamstop).
    offset : tuple of int or None
        ``(dy, dx)``: how far the sample's mean pattern's centre of symmetry lies from the centre pixel, where
        enough frames tell (:func:`napari_cdinn.nn.inference.centre_offset`); None otherwise.
    """

    path: Path
    name: str
    arch: str
    input_factor: int
    mask_channel: bool
    input_transform: str = "linear"
    card: dict = field(default_factory=dict, compare=False, repr=False)
    size: int = SIZE
    frame: tuple | None = None
    decimation: int | None = None
    scale: int | float = 1
    misfit: float | None = field(default=None, compare=False)
    extent: float | None = field(default=None, compare=False)
    offset: tuple | None = field(default=None, compare=False)

    def __fspath__(self) -> str:
        return str(self.path)


def _mask_channel(header: dict, arch: str, factor: int) -> bool:
    """Whether the weights read the mask channel: from the first convolution's input channels."""
    if arch == "paper":
        return False
    shape = (header.get(_FIRST_CONV) or {}).get("shape") or []
    if len(shape) > 1:
        return int(shape[1]) == 2 * factor**2
    return str((header.get("__metadata__") or {}).get("mask", "0")) == "1"


def _at_scale(info: ModelInfo, frame, scale=None) -> ModelInfo:
    """``info`` checked against the pattern size ``frame`` and set to read it at ``scale`` (None: the finest)."""
    scales = scales_for(frame, info.input_factor, info.size)
    match = scales[:1] if scale is None else [c for c in scales if abs(c - float(scale)) < 1e-9]
    if not match:
        raise ValueError(f"this model cannot read {frame[0]} x {frame[1]} patterns at scale {float(scale):g}; "
                         f"it can at {', '.join(f'{c:g}' for c in scales)}")
    scale = match[0]
    same = frame == info.frame and scale == info.scale
    return dataclasses.replace(info, frame=frame, scale=scale, misfit=info.misfit if same else None,
                               extent=info.extent if frame == info.frame else None,
                               offset=info.offset if frame == info.frame else None,
                               decimation=decimation_factor((read_side(frame, scale),) * 2, info.input_factor,
                                                            info.size))


def resolve_model(model=None, shape=None, scale=None) -> ModelInfo:
    """The model that reads patterns of ``shape``: its file, architecture and input, checked once.

    Parameters
    ----------
    model : None, str, os.PathLike or ModelInfo
        None: the best shipped model for ``shape`` (:func:`default_model`); a shipped name; a
        ``.safetensors`` file or a model directory; or a :class:`ModelInfo` already resolved
        (then only checked against ``shape``).
    shape : tuple of int, optional
        The patterns' shape ``(..., H, W)``.
    scale : int or float, optional
        Read the object at this scale (:func:`scales_for`; see the module notes).  Default: a
        :class:`ModelInfo`'s own scale for the size it was resolved for, else the finest the model
        has for the size (1 where it reads the size whole).

    Returns
    -------
    ModelInfo

    Raises
    ------
    ValueError
        One sentence: a pattern size no network reads, no model found, a file that is not
        safetensors, an unknown architecture, or a size this model cannot read.
    """
    frame = None if shape is None else (int(shape[-2]), int(shape[-1]))
    if isinstance(model, ModelInfo):
        if frame is None or (frame == model.frame and scale in (None, model.scale)):
            return model
        if scale is None and frame == model.frame:  # a scale is chosen for one pattern size
            scale = model.scale
        return _at_scale(model, frame, scale)
    if frame is not None:
        oversampling_factor(frame)  # a size no network reads fails first
    name = str(model_for(model, frame))
    path = resolve_model_path(name).resolve()
    header = _header(path)
    meta = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
    card = read_card(path)
    arch = meta.get("arch") or card.get("arch", "paper")
    factor = input_factor_of(arch)
    info = ModelInfo(
        path=path,
        name=name,
        arch=arch,
        input_factor=factor,
        mask_channel=_mask_channel(header, arch, factor),
        input_transform=meta.get("input") or (card.get("config") or {}).get("input", "linear"),
        card=card,
        size=object_size_of(arch),
    )
    if frame is None:
        return info
    return _at_scale(info, frame, scale)
