"""The one training configuration: TrainConfig, its presets, the CLI generated from it, resume compatibility."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
from pathlib import Path

import pytest

from napari_cdinn.cli import build_parser, main
from napari_cdinn.nn import PRESETS, TrainConfig
from napari_cdinn.nn.config import (
    RESUMABLE,
    chosen_fields,
    cli_fields,
    option_help,
    resolve_options,
)

#: ``cdinn train`` options that say how and where a run happens, not what it learns.
RUN_CONTROL = {"help", "out", "checkpoint_minutes", "device", "threads", "data_workers", "resume"}
#: Fields the trainer records but no one sets.
RECORDED = {"init_examples"}


def _train_parser():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_cli_options_are_exactly_the_config_fields_with_their_help():
    actions = {a.dest: a for a in _train_parser()._actions}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(actions) - RUN_CONTROL == names - RECORDED
    assert {f.name for f, _ in cli_fields()} == names - RECORDED
    for f, flag in cli_fields():
        action = actions[f.name]
        assert flag in action.option_strings and action.default is argparse.SUPPRESS
        assert f.metadata["help"] and action.help.startswith(f.metadata["help"].replace("%", "%%"))
        assert option_help(f.name) == f.metadata["help"]
        if f.metadata["choices"]:
            assert tuple(action.choices) == f.metadata["choices"]
    assert actions["time_limit_min"].option_strings == ["--time-limit"]


def test_cli_parses_into_field_names_and_leaves_unset_options_out():
    args = build_parser().parse_args(["train", "--out", "m", "--time-limit", "5", "--mask-channel", "--input", "log",
                                      "--families", "realistic", "--shift", "1", "--lr", "2e-4"])
    assert args.time_limit_min == 5.0 and args.mask_channel is True and args.input == "log"
    assert args.families == "realistic" and args.shift == 1 and args.lr == 2e-4
    assert not hasattr(args, "epochs") and not hasattr(args, "arch") and not hasattr(args, "preset")


@pytest.mark.parametrize("bad", [["--shift", "-1"], ["--epochs", "0"], ["--lr", "nan"], ["--average-from", "1"],
                                 ["--arch", "huge"], ["--train-size", "2.5"], ["--batch-size", "4096", "--preset",
                                                                               "tiny"]])
def test_cli_refuses_what_the_config_refuses(tmp_path, capsys, bad):
    assert main(["train", "--out", str(tmp_path / "m"), *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_presets_are_train_configs():
    assert set(PRESETS) == {"paper", "tiny"}
    assert all(isinstance(p, TrainConfig) for p in PRESETS.values())
    assert PRESETS["paper"] == TrainConfig() and PRESETS["paper"].preset == "paper"
    tiny = PRESETS["tiny"]
    assert (tiny.preset, tiny.arch, tiny.train_size, tiny.val_size, tiny.epochs, tiny.batch_size) == (
        "tiny", "paper", 2048, 256, 2, 64)
    paper = PRESETS["paper"]
    assert (paper.arch, paper.train_size, paper.val_size, paper.epochs, paper.batch_size, paper.lr, paper.schedule,
            paper.input) == ("shared", 180_000, 20_000, 10, 256, 1e-3, "constant", "linear")


def test_config_round_trips_through_asdict_and_json():
    config = TrainConfig.from_preset("tiny", arch="shared2x", lr=2e-4, schedule="cosine", time_limit=140,
                                     families="realistic", detector="realistic", mask_channel=True, average_from=0.5)
    d = dataclasses.asdict(config)
    assert d == config.to_dict() and TrainConfig.from_dict(d) == config
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == config
    assert d["time_limit_min"] == 140.0 and isinstance(d["time_limit_min"], float)


def test_an_old_config_without_new_keys_loads_with_defaults():
    old = {"arch": "shared", "train_size": 180000, "val_size": 20000, "epochs": 10, "batch_size": 256, "lr": 0.001,
           "schedule": "constant", "input": "linear", "preset": "paper", "seed": 3, "precision": "auto"}
    config = TrainConfig.from_dict(old)
    assert config.seed == 3 and config.shift == 0 and config.phase_weight == 1.0 and config.data_weight == 0.0
    assert config.support_weight == 0.0 and config.miss_weight == 1.0 and not config.fresh_data
    assert config.families is None and config.detector is None and not config.mask_channel
    assert config.time_limit_min is None and config.average_from is None and config.init_from is None
    assert TrainConfig.from_dict(dict(old, retired_option=1)) == config  # unknown keys are ignored


def test_the_config_of_a_current_run_loads_unchanged():
    """The ``config`` of ``last.json`` of a run started before TrainConfig (cdinn train ... --mask-channel)."""
    saved = {"arch": "shared2x", "train_size": 180000, "val_size": 4000, "epochs": 200, "batch_size": 256,
             "lr": 0.0002, "schedule": "cosine", "input": "linear", "shift": 1, "fresh_data": True,
             "phase_weight": 4.0, "data_weight": 1.0, "support_weight": 0.5, "miss_weight": 3.0,
             "families": "realistic", "detector": "realistic", "mask_channel": True, "preset": "paper", "seed": 53,
             "precision": "auto", "time_limit_min": 140.0, "init_from": "/x/model2x.safetensors",
             "init_examples": 31440128}
    d = TrainConfig.from_dict(saved).to_dict()
    assert {k: v for k, v in d.items() if k in saved} == saved and d["average_from"] is None


def test_resume_keeps_the_saved_config_but_takes_a_new_schedule(tmp_path):
    from napari_cdinn.nn.trainer import _resume_point

    old = {"arch": "paper", "train_size": 1024, "val_size": 32, "epochs": 4, "batch_size": 32, "lr": 0.001,
           "schedule": "cosine", "input": "linear", "preset": "tiny", "seed": 9, "precision": "auto"}
    (tmp_path / "last.json").write_text(json.dumps({"config": old, "epoch": 2, "step": 64}))
    (tmp_path / "last.safetensors").write_bytes(b"")
    config, chosen = resolve_options("paper")
    resumed, state = _resume_point(tmp_path, config, chosen)
    assert state["step"] == 64 and resumed == TrainConfig.from_dict(old)
    config, chosen = resolve_options("paper", epochs=1, time_limit=3, lr=5.0, seed=1)
    resumed, _ = _resume_point(tmp_path, config, chosen)
    assert resumed.epochs == 3 and resumed.time_limit_min == 3.0  # at least one epoch past the current one
    assert resumed.lr == 0.001 and resumed.seed == 9  # the recipe stays the checkpoint's
    assert set(RESUMABLE) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_options_keep_the_former_keyword_names_and_refuse_unknown_ones():
    config, chosen = resolve_options("tiny", input_transform="log", time_limit=2, arch=None, epochs=3)
    assert config.input == "log" and config.time_limit_min == 2.0 and config.arch == "paper"
    assert chosen == {"input", "time_limit_min", "epochs"}
    with pytest.raises(TypeError, match="unknown training option"):
        resolve_options("paper", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.from_preset("huge")
    assert chosen_fields(PRESETS["tiny"]) == frozenset()
    assert chosen_fields(PRESETS["tiny"].replace(epochs=5, arch="shared")) == {"epochs", "arch"}


def test_values_are_checked_on_construction():
    for bad in ({"miss_weight": 0}, {"average_from": 1.0}, {"shift": -1}, {"epochs": 2.5}, {"lr": float("inf")},
                {"arch": "huge"}, {"fresh_data": 1}, {"train_size": 100}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    config = TrainConfig(lr=1, init_from=Path("a/b.safetensors"))
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.init_from == str(Path("a/b.safetensors"))


def test_choices_name_what_the_simulator_and_the_networks_offer():
    from napari_cdinn import simulate
    from napari_cdinn.nn import networks

    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    assert set(meta["families"]["choices"]) == set(simulate.MIXTURES)
    assert set(meta["detector"]["choices"]) == set(simulate.DETECTORS)
    assert set(meta["arch"]["choices"]) == set(networks.ARCHITECTURES)


def test_no_trainer_function_is_longer_than_80_lines():
    from napari_cdinn.nn import trainer

    tree = ast.parse(Path(trainer.__file__).read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert max(lengths.values()) <= 80, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]
