"""Where each concern lives: the engines' imports, the jobs module, one model resolver."""

import ast
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import napari_cdinn
from napari_cdinn import jobs

PACKAGE = Path(napari_cdinn.__file__).parent


def _imports(path):
    """Absolute names of the ``napari_cdinn`` modules a source file imports (anywhere in it)."""
    return {n for n in _all_imports(path) if n == "napari_cdinn" or n.startswith("napari_cdinn.")}


def _all_imports(path):
    """Absolute names of every module (and imported name) a source file imports, anywhere in it."""
    module = ".".join(("napari_cdinn",) + path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package, others", [("nn", ("retrieval", "pipelines")), ("retrieval", ("nn", "pipelines"))])
def test_nn_and_retrieval_do_not_import_each_other(package, others):
    banned = {f"napari_cdinn.{other}" for other in others}
    found = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        bad = sorted(n for n in _imports(path) if ".".join(n.split(".")[:2]) in banned)
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    assert not found, f"{package} imports what sits above or beside it: {found}"


#: What only the napari face (``napari_cdinn._napari``) may import: napari, Qt and GUI toolkits.
GUI = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy", "napari_cdinn._napari")
CORE = sorted(p for p in PACKAGE.rglob("*.py") if "_napari" not in p.relative_to(PACKAGE).parts)


def test_the_napari_face_lives_in_one_subpackage():
    face = PACKAGE / "_napari"
    assert (face / "__init__.py").is_file() and (face / "widgets" / "__init__.py").is_file()
    assert not [p.name for p in PACKAGE.glob("_*.py") if p.name != "__init__.py"], "face modules at the package root"
    assert not (PACKAGE / "_widgets").exists()
    manifest = (PACKAGE / "napari.yaml").read_text()
    names = [line.split("python_name:")[1].strip() for line in manifest.splitlines() if "python_name:" in line]
    assert names and all(n.startswith("napari_cdinn._napari.") for n in names), names
    for name in names:  # every npe2 command points at a module file that defines the name
        module, attr = name.split(":")
        path = PACKAGE.parent.joinpath(*module.split("."))
        source = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
        assert f"def {attr}(" in source or f"class {attr}(" in source, name


def test_the_core_imports_neither_qt_nor_napari_in_its_source():
    assert len(CORE) > 20 and PACKAGE / "cli.py" in CORE
    found = {}
    for path in CORE:
        bad = sorted(n for n in _all_imports(path) if any(n == g or n.startswith(g + ".") for g in GUI))
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    assert not found, f"core modules import the GUI: {found}"


def test_importing_the_whole_core_loads_neither_qt_nor_napari():
    modules = [".".join(("napari_cdinn",) + p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
               for p in CORE]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {GUI[:-1]!r}"
            " or m.startswith('napari_cdinn._napari'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_import_scan_sees_relative_imports():
    # the pipelines module imports both engines (lazily): the scan must see that
    names = _imports(PACKAGE / "pipelines.py")
    assert "napari_cdinn.retrieval" in names and "napari_cdinn.nn" in names


def test_jobs_nn_and_model_resolution_need_no_torch():
    code = ("import sys; from napari_cdinn import jobs, nn, stream; "
            "info = nn.resolve_model(None, (3, 64, 64)); "
            "assert info.name in nn.DEFAULT_MODELS and info.decimation is not None; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_stop_flag_and_one_cancellation():
    from napari_cdinn import retrieval, stream
    from napari_cdinn.retrieval import engine

    assert retrieval.Cancelled is engine.Cancelled is stream.StreamCancelled is jobs.Cancelled
    assert engine.stop_requested is jobs.stop_requested
    event = threading.Event()
    assert not jobs.stop_requested(None) and not jobs.stop_requested(event) and not jobs.stop_requested(lambda: False)
    event.set()
    assert jobs.stop_requested(event) and jobs.stop_requested(lambda: True)
    with pytest.raises(jobs.Cancelled) as info:
        jobs.check_stop(event, done=7, unit="frames")
    assert info.value.done == info.value.iterations == 7 and str(info.value) == "stopped after 7 frames"


def test_progress_events_are_typed_and_read_like_the_old_messages():
    seen = []
    report = jobs.progress_events(seen.append, offset=10, scale=2, total=100, label="x")
    report(5, 20)
    event = seen[0]
    assert event.kind is jobs.Kind.PROGRESS and (event.done, event.total) == (20, 100) and event.fraction == 0.2
    assert event["kind"] == "progress" and event["done"] == 20 and event["label"] == "x" and event.get("nope") is None
    calls = []
    parts = jobs.PartsProgress(lambda done, total: calls.append((done, total)), units=10)
    parts.plan(2)
    parts.reporter("a")(10)
    parts.reporter("b")(5)
    assert calls == [(10, 20), (15, 20)]


def test_one_call_resolves_a_model_for_a_shape(tmp_path):
    from napari_cdinn import nn

    info = nn.resolve_model(None, (64, 64))
    assert info.name == "model2x" and info.input_factor == 2 and info.decimation == 1 and info.frame == (64, 64)
    assert info.path.is_absolute() and info.path.suffix == ".safetensors" and info.mask_channel  # the shipped model2x reads the mask
    small = nn.resolve_model(None, (5, 32, 32))
    assert small.name == "model" and small.decimation == 1
    assert nn.resolve_model(small, (96, 96)).decimation == 3  # a resolved model is only checked again
    assert nn.resolve_model("model", (128, 128)).decimation == 4
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    for model, shape, words in [(None, (20, 20), "32k"), ("model2x", (32, 32), "2x-oversampled"),
                                (str(tmp_path), (64, 64), "no best/last/model"), ("nope", (64, 64), "no model named"),
                                (str(bad), (64, 64), "not a valid safetensors")]:
        with pytest.raises(ValueError, match=words) as err:
            nn.resolve_model(model, shape)
        assert "\n" not in str(err.value)


def test_predict_takes_a_resolved_model():
    from napari_cdinn import nn
    from napari_cdinn.simulate import simulate

    data = simulate(3, seed=5, oversampling=2)["intensity"]
    info = nn.resolve_model(None, data.shape)
    a = nn.predict(data, model=info, device="cpu")
    b = nn.predict(data, model=str(info.path), device="cpu")
    np.testing.assert_array_equal(a["amplitude"], b["amplitude"])
