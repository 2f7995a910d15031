"""`facesense train` / `eval` never lose a run or a report, check the data they read, and fail in one line (issue 11).

Each test reproduces a case that replaced a model, trained on the wrong data, or printed a
traceback before. A ~100k-parameter timm EfficientNet on tiny made-up shards, on CPU.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facesense.core.checkpoint import save_checkpoint
from facesense.cli import app
from facesense.core.errors import FaceSenseError
from facesense.train.rundir import LOCK, RunLock
from pipeline.classes import FER2013_CLASSES
from pipeline.shards import FORMAT_VERSION, MANIFEST, split_entry, write_shard
from train_helpers import MODEL, ROOT, child_env, make_shards, train_args, wrap_train_batches

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def invoke(args: list[str]):
    """The CLI in-process; an exception that escapes it (a traceback for the user) fails the test."""
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def error_line(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def quick(data, out, *extra):
    return train_args(data, out, "--epochs", "1", "--max-steps", "2", *extra)


# ------------------------------------------------------------------ an existing run is never replaced

@pytest.mark.parametrize("existing", ["best.pt", "metrics.jsonl"])
def test_a_run_without_last_pt_is_not_overwritten(data, tmp_path, existing):
    out = tmp_path / "model"  # like the shipped model/: best.pt (and metrics), no last.pt
    out.mkdir()
    (out / existing).write_bytes(b"the shipped 60.5% model")
    line = error_line(invoke(quick(data, out)))
    assert existing in line and "--resume" in line and "--overwrite" in line
    assert (out / existing).read_bytes() == b"the shipped 60.5% model"
    assert sorted(p.name for p in out.iterdir()) == [existing]  # no lock file or other trace left


def test_out_that_is_a_regular_file_is_a_clear_error(data, tmp_path):
    (tmp_path / "run").write_text("x")
    assert "is a file, not a directory" in error_line(invoke(quick(data, tmp_path / "run")))


def test_negative_seed_is_a_clear_error(data, tmp_path):
    assert "--seed -1" in error_line(invoke(quick(data, tmp_path / "run", "--seed", "-1")))


# ------------------------------------------------------------------ one train per --out at a time

def test_a_second_train_into_a_locked_out_fails_at_once(data, tmp_path):
    out = tmp_path / "run"
    other = RunLock(out)  # another `facesense train` holding --out
    other.acquire()
    try:
        line = error_line(invoke(quick(data, out)))
        assert "in use by another facesense train" in line and f"pid {os.getpid()}" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing of the refused run was written
    finally:
        other.release()
    assert not out.exists()  # the holder made it and wrote nothing: gone


def test_a_lock_left_by_a_killed_train_does_not_block(data, tmp_path):
    out = tmp_path / "run"
    code = (f"import os, signal; from facesense.train.rundir import RunLock; RunLock({str(out)!r}).acquire(); "
            f"os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), timeout=60)
    assert proc.returncode == -9 and (out / LOCK).exists()
    result = invoke(quick(data, out))
    assert result.exit_code == 0, result.output
    assert (out / "last.pt").exists() and not (out / LOCK).exists()  # released (and removed) on exit


# ------------------------------------------------------------------ the shards are the ones packed

def test_a_swapped_shard_of_the_same_size_is_refused(data, tmp_path):
    mine = tmp_path / "shards"
    shutil.copytree(data, mine)
    other = make_shards(tmp_path / "other", seed=1)  # another pack: same counts, other images
    assert (other / "train-1.h5").stat().st_size == (mine / "train-1.h5").stat().st_size
    shutil.copy(other / "train-1.h5", mine / "train-1.h5")
    line = error_line(invoke(quick(mine, tmp_path / "run")))
    assert "train-1.h5" in line and f"run facesense verify {mine}" in line
    assert not (tmp_path / "run").exists()


def shards_with_labels(out: Path, train_labels, val_labels) -> Path:
    """7-class shards whose train/val hold exactly the given labels (grey level = class)."""
    out.mkdir(parents=True)
    splits = {}
    for split, labels in (("train", train_labels), ("val", val_labels), ("test", [0])):
        labels = np.array(labels, np.uint8)
        images = np.repeat((20 + 30 * labels)[:, None, None], 48, 1).repeat(48, 2).astype(np.uint8)
        splits[split] = split_entry(labels, FER2013_CLASSES, [write_shard(
            out, split, 0, images, labels, [f"{split}/{i}" for i in range(len(labels))], FER2013_CLASSES)])
    (out / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "classes": list(FER2013_CLASSES),
                                            "splits": splits, "source": {"fingerprint": "x"}}))
    return out


def test_one_train_class_is_refused(tmp_path):
    data = shards_with_labels(tmp_path / "shards", [3] * 32, [3] * 16)
    line = error_line(invoke(quick(data, tmp_path / "run")))
    assert "one class only (happy)" in line
    assert not (tmp_path / "run").exists()


def test_classes_missing_from_val_or_train_are_warned_about(tmp_path):
    data = shards_with_labels(tmp_path / "shards", [3, 5] * 16, [3] * 16)
    result = invoke(quick(data, tmp_path / "run"))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any("val split has no images of surprise" in w and "1 of 7 classes" in w for w in warnings), warnings
    assert any("train split has no images of angry, disgust, fear, sad, neutral" in w for w in warnings), warnings


# ------------------------------------------------------------------ memory

def test_a_configuration_that_cannot_fit_is_refused_before_training(data, tmp_path, monkeypatch):
    import facesense.train.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 50 * 2**20)  # 50 MB free
    line = error_line(invoke(quick(data, tmp_path / "run", "--img-size", "512", "--batch-size", "32")))
    assert "--img-size 512 with --batch-size 32 needs about" in line and "GB is free" in line
    assert not (tmp_path / "run").exists()


def test_memory_estimate_grows_with_the_image_area():
    from facesense.train.memory import activation_bytes
    from facesense.core.model import create_model

    model = create_model(MODEL, 1, 7)
    small, large = activation_bytes(model, 1, 48), activation_bytes(model, 1, 96)
    assert 3.5 < large / small < 4.5
    assert all(p.device.type == "cpu" for p in model.parameters())  # measured on a copy


# ------------------------------------------------------------------ stops before the first checkpoint

def poison_loader(monkeypatch, what):
    def poison(loader, images, labels):
        if what == "interrupt":
            raise KeyboardInterrupt
        return images * float("nan"), labels

    wrap_train_batches(monkeypatch, poison)


def test_ctrl_c_before_the_first_checkpoint_does_not_suggest_resume_and_leaves_no_dir(data, tmp_path,
                                                                                     monkeypatch):
    poison_loader(monkeypatch, "interrupt")
    out = tmp_path / "new" / "run"
    line = error_line(invoke(quick(data, out)), code=130)
    assert "before the first checkpoint" in line and "--resume" not in line
    assert not (tmp_path / "new").exists()


def test_nan_before_the_first_checkpoint_says_nothing_was_saved(data, tmp_path, monkeypatch):
    poison_loader(monkeypatch, "nan")
    out = tmp_path / "run"
    line = error_line(invoke(quick(data, out)))
    assert "loss became nan" in line and "no checkpoint was written yet" in line and "last.pt" not in line
    assert not out.exists()


def test_non_finite_val_outputs_stop_the_run_like_a_nan_loss(data, tmp_path, monkeypatch):
    import facesense.train.loop as train_module

    predict = train_module.predict_probs

    def diverged(*args, **kwargs):  # what --lr 1e6 did: finite loss, NaN probabilities on val
        probs, labels = predict(*args, **kwargs)
        return np.full_like(probs, np.nan), labels

    monkeypatch.setattr(train_module, "predict_probs", diverged)
    line = error_line(invoke(quick(data, tmp_path / "run")))
    assert "outputs on val became non-finite (epoch 1)" in line and "--lr" in line


# ------------------------------------------------------------------ disk full

def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "model": {"w": torch.ones(3)}})
    before = path.read_bytes()
    os.symlink("/dev/full", tmp_path / f".last.pt.tmp-{os.getpid()}")  # writes there fail with ENOSPC
    with pytest.raises(FaceSenseError, match="no space left on device .*the previous last.pt is kept"):
        save_checkpoint(path, {"step": 2, "model": {"w": torch.zeros(1000)}})
    assert path.read_bytes() == before and not (tmp_path / f".last.pt.tmp-{os.getpid()}").exists()


# ------------------------------------------------------------------ config files

def test_yaml_numbers_written_without_a_dot_are_accepted_for_float_options(tmp_path):
    from facesense.core.config import load_config_file

    (tmp_path / "c.yaml").write_text("lr: 1e-3\nweight_decay: 5E-2\nlabel_smoothing: .1\n")
    assert load_config_file(tmp_path / "c.yaml") == {"lr": 0.001, "weight_decay": 0.05, "label_smoothing": 0.1}
    for bad in ("lr: fast\n", "lr: nan\n", "epochs: '5'\n"):
        (tmp_path / "c.yaml").write_text(bad)
        with pytest.raises(FaceSenseError, match="should be"):
            load_config_file(tmp_path / "c.yaml")


def test_config_reads_toml_without_tomllib_as_on_python_3_10(tmp_path):
    (tmp_path / "c.toml").write_text('lr = 0.5\nmodel = "resnet18"\n')
    code = ("import sys, tomllib; sys.modules['tomli'] = tomllib; sys.modules['tomllib'] = None\n"
            "from facesense.core.config import load_config_file\n"
            f"print(load_config_file({str(tmp_path / 'c.toml')!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "{'lr': 0.5, 'model': 'resnet18'}"


def test_pyproject_python_and_toml_parser_agree():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    oldest = tuple(int(x) for x in project["requires-python"].removeprefix(">=").split("."))
    if oldest < (3, 11):  # tomllib arrived in 3.11: older Pythons need tomli
        assert "tomli; python_version < '3.11'" in project["dependencies"]


# ------------------------------------------------------------------ eval

@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    result = invoke(quick(data, out))
    assert result.exit_code == 0, result.output
    return out


def evaluate(*args):
    return invoke(["eval", *args, "--device", "cpu", "--loader", "resident"])


def test_eval_default_out_is_beside_the_checkpoint_and_spares_the_runs_report(data, trained, tmp_path):
    run = tmp_path / "model"
    shutil.copytree(trained, run)
    (run / "report.json").write_text('{"checkpoint": {"path": "/shipped/best.pt", "sha256": "abc"}}')
    before = (run / "report.json").read_bytes()
    result = evaluate(run / "last.pt", "--data", data, "--split", "val")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval-last-val" / "report.json").read_text())
    assert report["checkpoint"]["path"] == str((run / "last.pt").resolve()) and report["split"] == "val"
    assert (run / "report.json").read_bytes() == before


def test_eval_refuses_to_overwrite_another_checkpoints_report(data, trained, tmp_path):
    out = tmp_path / "reports"
    assert evaluate(trained / "best.pt", "--data", data, "--split", "val", "--out", out).exit_code == 0
    first = (out / "report.json").read_bytes()
    line = error_line(evaluate(trained / "last.pt", "--data", data, "--split", "val", "--out", out))
    assert "report of another checkpoint" in line and "--overwrite" in line
    assert (out / "report.json").read_bytes() == first
    assert evaluate(trained / "best.pt", "--data", data, "--split", "val", "--out", out).exit_code == 0  # same one
    assert evaluate(trained / "last.pt", "--data", data, "--split", "val", "--out", out,
                    "--overwrite").exit_code == 0
    assert json.loads((out / "report.json").read_text())["checkpoint"]["path"].endswith("last.pt")


def test_eval_out_that_is_a_file_fails_before_evaluating(data, trained, tmp_path, monkeypatch):
    import facesense.eval.metrics as evaluate_module  # report.py calls it through the module

    def never(*args, **kwargs):
        raise AssertionError("evaluated although --out cannot be written")

    monkeypatch.setattr(evaluate_module, "predict_probs", never)
    (tmp_path / "out").write_text("x")
    line = error_line(evaluate(trained / "best.pt", "--data", data, "--out", tmp_path / "out"))
    assert "is a file, not a directory" in line


def test_eval_of_non_finite_outputs_is_a_clear_error():
    from facesense.eval.metrics import compute_metrics

    probs = np.full((4, 7), 1 / 7)
    probs[1] = np.nan
    with pytest.raises(FaceSenseError, match="NaN or infinite for 1 of 4 images"):
        compute_metrics(probs, np.array([0, 1, 2, 3]), list(FER2013_CLASSES))


# ------------------------------------------------------------------ found by a hostile new user (issue 17)

def test_overwrite_refused_by_a_later_check_keeps_the_old_run(data, tmp_path, monkeypatch):
    import facesense.train.memory as memory

    out = tmp_path / "run"
    assert invoke(quick(data, out)).exit_code == 0
    before = {name: (out / name).read_bytes() for name in ("best.pt", "last.pt", "metrics.jsonl")}
    monkeypatch.setattr(memory, "available_bytes", lambda device: 50 * 2**20)  # the memory check refuses
    line = error_line(invoke(quick(data, out, "--overwrite", "--img-size", "512", "--batch-size", "32")))
    assert "needs about" in line
    assert {name: (out / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("size", [8, 16, 32])
def test_small_input_sizes_are_estimated_without_a_train_mode_batch_of_one(size):
    from facesense.core.model import create_model
    from facesense.train.memory import activation_bytes

    # EfficientNet-B0's last maps are 1x1 at these sizes: a batch of one fails in BatchNorm's train mode.
    assert activation_bytes(create_model("efficientnet_b0", 1, 7), 1, size) > 0


def test_small_input_size_trains(data, tmp_path):
    assert invoke(quick(data, tmp_path / "run", "--img-size", "16")).exit_code == 0


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_inside_data_is_refused(data, tmp_path, where):
    out = data if where == "same" else data / "run"
    before = sorted(p.name for p in data.iterdir())
    line = error_line(invoke(quick(data, out)))
    assert "is inside --data" in line
    assert sorted(p.name for p in data.iterdir()) == before


def test_resume_on_fewer_ranks_carries_the_epochs_sums(data, tmp_path):
    """A mid-epoch checkpoint of 2 ranks resumed on 1: the position maps by samples seen (2 batches on
    each of 2 ranks = 4 batches here), and the epoch's train loss and accuracy count every batch of the
    epoch, the 2 ranks' (carried in their sums) and the resumed run's."""
    out = tmp_path / "run"
    assert invoke(quick(data, out, "--save-every", "2")).exit_code == 0  # stops at step 2 of 6: mid-epoch
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (0, 2, 2)
    rank = ckpt["ranks"][0]
    # As if two ranks had each trained 2 batches with a mean loss of 1000 and no correct prediction.
    ckpt["ranks"] = [{**rank, "epoch_loss_sum": 2000.0, "epoch_correct_sum": 0.0, "epoch_batches": 2}] * 2
    save_checkpoint(out / "last.pt", ckpt)
    result = invoke(train_args(data, out, "--epochs", "1", "--resume"))
    assert result.exit_code == 0, result.output
    assert "2 ranks wrote this checkpoint, 1 resume it: step 2 there is step 4 here" in result.output
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (row["epoch"], row["step"], row["steps_in_epoch"]) == (1, 6, 6)
    # (4 x 1000 + 2 real losses below 10) / 6 batches; without the carried sums it would be a real loss.
    assert 4000 / 6 < row["train_loss"] < 4020 / 6
    assert row["train_accuracy"] <= 2 / 6  # 4 of the 6 batches count no correct prediction


class _Arbitrary:  # a pickled object: loading it would run code, so weights_only refuses it
    pass


@pytest.mark.parametrize("content, says", [
    (b"", "an empty file (0 bytes)"),
    (bytes(range(256)) * 20, "not a file written by torch.save"),
    ("object", "could run as code: refused"),
])
def test_a_file_that_is_not_a_checkpoint_gets_one_line_and_no_unsafe_advice(data, tmp_path, content, says):
    path = tmp_path / "bad.pt"
    if content == "object":
        torch.save({"x": _Arbitrary()}, path)
    else:
        path.write_bytes(content)
    for args in (["eval", str(path), "--data", str(data), "--out", str(tmp_path / "e")],
                 quick(data, tmp_path / "run", "--weights", str(path))):
        result = invoke(args)
        line = error_line(result)
        assert says in line and str(path) in line, line
        assert "weights_only" not in result.output and len(result.output.strip().splitlines()) == 1
