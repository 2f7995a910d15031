"""TrainConfig: every field is a --help option, config files (TOML/YAML), the command line wins."""
from __future__ import annotations

import re
from dataclasses import fields

import pytest
from typer.testing import CliRunner

from facesense.cli import app
from facesense.core.config import (TrainConfig, config_from_dict, field_help, load_config_file, resolve_config,
                              resume_differences)
from facesense.core.errors import FaceSenseError

runner = CliRunner()


def test_every_field_is_an_option_in_help():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250", "TERM": "dumb"})
    assert result.exit_code == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    for flag in ("--config", "--no-compile", "--resume", "--amp-dtype", "--class-weights", "--max-steps"):
        assert flag in text
    assert all(field_help()[f.name] for f in fields(TrainConfig))


def test_eval_help_lists_its_options():
    result = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "250", "TERM": "dumb"})
    assert result.exit_code == 0
    for flag in ("--data", "--split", "--out", "--tta"):
        assert flag in result.output


def test_toml_and_yaml_files(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('model = "resnet18"\nepochs = 5\nlr = 1\nema = true\nmax-steps = 7\nweights = "w.pt"\n')
    yaml = tmp_path / "c.yaml"
    yaml.write_text("model: resnet18\nepochs: 5\nlr: 1\nema: true\nmax-steps: 7\nweights: w.pt\n")
    for path in (toml, yaml):
        cfg = resolve_config(path)
        assert (cfg.model, cfg.epochs, cfg.lr, cfg.ema, cfg.max_steps, cfg.weights) == \
               ("resnet18", 5, 1.0, True, 7, "w.pt")
        assert isinstance(cfg.lr, float) and cfg.batch_size == TrainConfig.batch_size  # untouched: default


def test_command_line_wins_over_file_and_defaults_do_not(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("facesense.train.loop.train", lambda cfg: seen.setdefault("cfg", cfg))
    path = tmp_path / "c.toml"
    path.write_text('model = "resnet18"\nepochs = 5\nbatch_size = 64\ncompile = false\namp = true\n')
    result = runner.invoke(app, ["train", "--config", str(path), "--epochs", "9", "--no-amp"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.compile, cfg.amp) == ("resnet18", 9, 64, False, False)
    assert cfg.lr == TrainConfig.lr


@pytest.mark.parametrize("text, message", [
    ("nope = 1\n", "unknown option 'nope'"),
    ('epochs = "ten"\n', "epochs = 'ten' should be int"),
    ("epochs = 2.5\n", "should be int"),
    ("amp = 1\n", "should be bool"),
    ('optimizer = "adam"\n', "--optimizer 'adam'"),
    ("lr = -1\n", "--lr -1.0: must be positive"),
    ("aug_scale_min = 2.0\n", "augmentation options"),
    ("epochs = [\n", "--config"),
])
def test_bad_config_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(FaceSenseError, match=re.escape(message)):
        resolve_config(path)


def test_config_file_errors_reach_the_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochz: 3\n")
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 1 and "unknown option 'epochz'" in result.output
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "missing.toml")])
    assert result.exit_code == 1 and "cannot read" in result.output
    json_file = tmp_path / "c.json"
    json_file.write_text("{}")
    with pytest.raises(FaceSenseError, match="expected a .toml, .yaml or .yml file"):
        load_config_file(json_file)


def test_round_trip_through_a_checkpoint_dict_and_resume_differences():
    cfg = TrainConfig(model="resnet18", lr=0.1, compile=False)
    again = config_from_dict(cfg.to_dict(), "ckpt")
    assert again == cfg
    assert resume_differences(cfg.to_dict(), TrainConfig(model="resnet18", lr=0.1, workers=7, resume=True)) == []
    assert resume_differences(cfg.to_dict(), TrainConfig(model="resnet50", lr=0.1)) == \
           ["--model 'resnet18' -> 'resnet50'"]
    with pytest.raises(FaceSenseError, match="does not know: future_option"):
        config_from_dict({**cfg.to_dict(), "future_option": 1}, "ckpt")


def test_a_config_saved_before_the_data_driven_options_resumes_unchanged():
    """Checkpoints before --soft-labels, --aug-saturation and --resident-budget-gb, with channels 1 and img_size
    48 written out: resuming them on FER2013 shards (the defaults resolved from the data) finds no difference."""
    from facesense.core.config import for_data

    old = TrainConfig(channels=1, img_size=48).to_dict()
    for key in ("soft_labels", "aug_saturation", "resident_budget_gb"):
        old.pop(key)
    fer2013 = {"votes": False, "splits": {"train": {"channels": 1, "image_shape": [48, 48]}}}
    assert resume_differences(old, for_data(TrainConfig(), fer2013)) == []
    assert config_from_dict(old, "old.pt") == TrainConfig(channels=1, img_size=48)
    assert resume_differences(old, TrainConfig(channels=1, img_size=48, soft_labels=True)) == \
           ["--soft-labels False -> True"]
    assert resume_differences(old, TrainConfig(channels=1, img_size=48, resident_budget_gb=4)) == []  # placement
