"""`facesense train`: outputs, resume after SIGKILL, DDP on gloo, NaN stop, weights, clear errors.

Everything runs a ~100k-parameter timm EfficientNet on tiny made-up shards on CPU.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from facesense.cli import app
from facesense.core.errors import FaceSenseError
from facesense.core.model import create_model
from facesense.train.optim import warmup_cosine
from train_helpers import MODEL, ROOT, child_env, free_port, make_shards, run_cli, train_args, wrap_train_batches

runner = CliRunner()
DETERMINISTIC_KEYS = ("epoch", "step", "steps_in_epoch", "train_loss", "val_accuracy", "val_auc_macro_ovr",
                      "val_f1_weighted", "lr")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def invoke(args: list[str]):
    result = runner.invoke(app, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scalars(out, run: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar in out/tensorboard/<run>, as TensorBoard's reader sees them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / run))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_train_writes_checkpoints_metrics_and_curves(data, tmp_path):
    out = tmp_path / "run"
    # No brightness/contrast jitter: the toy classes differ by grey level only, learnt in 36 steps.
    result = invoke(train_args(data, out, "--ema", "--class-weights", "balanced", "--grad-clip", "1.0",
                               "--epochs", "6", "--aug-brightness", "0", "--aug-contrast", "0"))
    assert result.exit_code == 0, result.output
    assert "img/s" in result.output and "data wait" in result.output
    for name in ("last.pt", "best.pt", "metrics.jsonl", "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*tmp*")), "temporary files left behind"

    history = rows(out)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert scalars(out, "epochs", "epoch/val_accuracy") == [(r["epoch"], pytest.approx(r["val_accuracy"]))
                                                             for r in history]
    for row in history:
        assert {"train_loss", "val_accuracy", "val_auc_macro_ovr", "val_f1_weighted", "lr", "images_per_s",
                "data_wait_share"} <= set(row)
        assert math.isfinite(row["train_loss"]) and 0 <= row["val_accuracy"] <= 1 and row["images_per_s"] > 0
    assert history[-1]["train_accuracy"] >= 0.6 and history[-1]["val_accuracy"] >= 0.4  # chance: 1/7

    last = load(out / "last.pt")  # weights_only: the checkpoint is plain data
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "ranks", "epoch", "batch", "step",
                "config", "classes", "history", "best_accuracy"):
        assert key in last, key
    assert (last["epoch"], last["batch"], last["step"]) == (6, 0, 36)
    assert last["ema"] is not None and last["config"]["model"] == MODEL and last["config"]["ema"] is True
    assert last["config"]["class_weights"] == "balanced" and last["classes"][0] == "angry"
    assert isinstance(last["ranks"][0]["rng"]["torch"], torch.Tensor)
    best = load(out / "best.pt")
    assert "optimizer" not in best and "ranks" not in best and "model" in best  # selection snapshot
    best_epoch = max(history, key=lambda r: r["val_accuracy"])["epoch"]
    assert best["epoch"] == best_epoch and best["best_accuracy"] == max(r["val_accuracy"] for r in history)


def test_sgd_bfloat16_three_channels_upsampled_and_max_steps(data, tmp_path):
    out = tmp_path / "run"
    result = invoke(train_args(data, out, "--optimizer", "sgd", "--amp", "--max-steps", "3",
                               "--drop-path-rate", "0.2", "--channels", "3", "--img-size", "64"))
    assert result.exit_code == 0, result.output
    (row,) = rows(out)
    assert row["step"] == 3 and row["steps_in_epoch"] == 3 and math.isfinite(row["train_loss"])
    last = load(out / "last.pt")
    assert (last["epoch"], last["batch"], last["step"]) == (0, 3, 3)  # resumable mid-epoch
    assert last["config"]["amp"] and last["config"]["optimizer"] == "sgd"
    assert last["model"]["conv_stem.weight"].shape[1] == 3


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == 1.0 and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(100) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


# ------------------------------------------------------------------ resume after SIGKILL

@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli(train_args(data, out, "--epochs", "3", "--ema"))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


@pytest.mark.parametrize("save_every", [0, 2], ids=["from-epoch-end", "from-mid-epoch"])
def test_resume_after_sigkill_matches_uninterrupted(data, uninterrupted, tmp_path, save_every):
    out = tmp_path / "run"
    args = train_args(data, out, "--epochs", "3", "--ema", "--save-every", str(save_every))
    # 6 steps per epoch: die in the middle of epoch 2, after step 9 (last.pt: epoch 1's end, or step 8).
    killed = run_cli(args, FS_KILL_AFTER_STEPS="9")
    assert killed.returncode == -9, killed.stderr
    ckpt = load(out / "last.pt")
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == ((1, 2, 8) if save_every else (1, 0, 6))

    resumed = run_cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    want, got = rows(uninterrupted), rows(out)
    assert [{k: r[k] for k in DETERMINISTIC_KEYS} for r in got] == \
           [{k: r[k] for k in DETERMINISTIC_KEYS} for r in want]
    # TensorBoard continues the same curves: each epoch and logged step once, as metrics.jsonl says.
    assert scalars(out, "epochs", "epoch/train_loss") == [(r["epoch"], pytest.approx(r["train_loss"])) for r in got]
    steps = [step for step, _ in scalars(out, "steps", "train/loss_interval")]
    assert steps == sorted(set(steps)) == [s for s, _ in scalars(uninterrupted, "steps", "train/loss_interval")]
    a, b = load(uninterrupted / "last.pt"), load(out / "last.pt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"])


# ------------------------------------------------------------------ DDP: 2 ranks, gloo, CPU

def test_two_ranks_on_gloo_end_with_identical_weights(data, tmp_path):
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd = torchrun + [str(ROOT / "tests" / "train_helpers.py"),
                      *train_args(data, out, "--epochs", "1", "--batch-size", "8", "--log-every", "3")]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(FS_DUMP_WEIGHTS=str(dump)), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    rank0, rank1 = load(dump / "rank0.pt"), load(dump / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    last = load(out / "last.pt")
    assert len(last["ranks"]) == 2 and last["step"] == 6  # 96 images / 2 ranks / batch 8
    assert [r["epoch"] for r in rows(out)] == [1]  # one writer: rank 0
    assert all(torch.equal(rank0[k], last["model"][k]) for k in rank0)  # rank 0 wrote its own weights


def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    data = make_shards(tmp_path / "shards")  # train shards hold images 0-39, 40-79, 80-95
    (data / "train-2.h5").unlink()  # only rank 1 (images 48-95) reads it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(ROOT / "tests" / "train_helpers.py"), *train_args(data, tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "error: rank 1:" in proc.stderr and "train-2.h5" in proc.stderr  # rank 0 says why, and stops


# ------------------------------------------------------------------ NaN stop

def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    wrap_train_batches(monkeypatch, lambda loader, images, labels:
                       (images * float("nan") if loader.epoch >= 1 else images, labels))
    out = tmp_path / "run"
    result = invoke(train_args(data, out, "--epochs", "3"))
    assert result.exit_code == 1
    assert "loss became nan" in result.output and "epoch 2" in result.output
    last = load(out / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in rows(out)] == [1]


# ------------------------------------------------------------------ starting weights

def test_weights_adapts_stem_to_gray_and_reinitialises_head(tmp_path):
    torch.manual_seed(0)
    source = create_model(MODEL, channels=3, num_classes=10)
    path = tmp_path / "rgb.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)  # DDP-style keys
    torch.manual_seed(1)
    fresh = create_model(MODEL, channels=1, num_classes=7)
    torch.manual_seed(1)
    model = create_model(MODEL, channels=1, num_classes=7, weights=str(path))
    src, got = source.state_dict(), model.state_dict()
    assert torch.allclose(got["conv_stem.weight"], src["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(got["classifier.weight"], fresh.state_dict()["classifier.weight"])  # fresh head
    assert got["classifier.weight"].shape == (7, src["classifier.weight"].shape[1])
    for key in got:
        if not key.startswith(("conv_stem.", "classifier.")):
            assert torch.equal(got[key], src[key]), key


def test_weights_from_another_model_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(create_model("test_resnet", channels=1, num_classes=7).state_dict(), path)
    with pytest.raises(FaceSenseError, match="another model"):
        create_model(MODEL, channels=1, num_classes=7, weights=str(path))


def test_pretrained_loads_cached_timm_weights_and_adapts_them(tmp_path, monkeypatch):
    import huggingface_hub
    from safetensors.torch import save_file

    torch.manual_seed(0)
    imagenet = create_model(MODEL, channels=3, num_classes=1000)  # stands in for timm's ImageNet weights
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(path))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, filename: str(path) if filename == "model.safetensors" else None)
    model = create_model(MODEL, channels=1, num_classes=7, pretrained=True)
    src, got = imagenet.state_dict(), model.state_dict()
    assert torch.allclose(got["conv_stem.weight"], src["conv_stem.weight"].sum(1, keepdim=True))
    assert got["classifier.weight"].shape[0] == 7
    assert torch.equal(got["blocks.0.0.conv.weight"], src["blocks.0.0.conv.weight"])


def test_pretrained_fails_fast_offline(monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried = []  # offline: no DNS lookup, no connection, so no minutes of retries

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError("the network was used while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(FaceSenseError, match="--pretrained.*(offline|not cached)"):
        create_model(MODEL, channels=1, num_classes=7, pretrained=True)
    assert tried == []


# ------------------------------------------------------------------ clear errors

def _bad_version(d):
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))


def _missing_shard(d):
    (d / "train-0.h5").unlink()


def _corrupt_shard(d):
    (d / "val-0.h5").write_bytes(b"not hdf5")


@pytest.mark.parametrize("spoil, extra, message", [
    (None, ["--data", "/nonexistent/shards"], "no such directory"),
    (_bad_version, [], "format_version 99"),
    (_missing_shard, [], "train-0.h5"),
    (_corrupt_shard, [], "val-0.h5"),
    (None, ["--batch-size", "500"], "batch size 500"),
    (None, ["--batch-size", "0"], "--batch-size 0"),
    (None, ["--img-size", "4"], "--img-size 4"),
    (None, ["--model", "test_maxvit"], "cannot take 48x48"),
    (None, ["--model", "no_such_net"], "not a timm model"),
    (None, ["--optimizer", "adam"], "--optimizer 'adam'"),
    (None, ["--channels", "2"], "--channels 2"),
    (None, ["--pretrained", "--weights", "w.pt"], "pass one"),
], ids=["no-dir", "version", "missing-shard", "corrupt-shard", "batch-too-big", "batch-zero", "img-tiny",
        "img-vs-model", "model", "optimizer", "channels", "two-starts"])
def test_clear_errors(tmp_path, spoil, extra, message):
    data = make_shards(tmp_path / "shards")
    if spoil:
        spoil(data)
    result = invoke(train_args(data, tmp_path / "run", "--max-steps", "1") + extra)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output


def test_empty_val_split_is_a_clear_error(tmp_path):
    data = make_shards(tmp_path / "shards", counts={"train": 32, "val": 0, "test": 7})
    result = invoke(train_args(data, tmp_path / "run"))
    assert result.exit_code == 1 and "the val split is empty" in result.output


def test_existing_run_and_bad_resumes_are_refused(data, tmp_path):
    out = tmp_path / "run"
    args = train_args(data, out, "--epochs", "1", "--max-steps", "2")
    assert invoke(args).exit_code == 0
    again = invoke(args)
    assert again.exit_code == 1 and "--resume" in again.output and "--overwrite" in again.output
    other_model = invoke(args + ["--resume", "--model", "test_resnet"])
    assert other_model.exit_code == 1 and "another model or config" in other_model.output
    assert "test_resnet" in other_model.output
    other_config = invoke(args + ["--resume", "--lr", "0.5"])
    assert other_config.exit_code == 1 and "--lr 0.01 -> 0.5" in other_config.output
    nothing = invoke(train_args(data, tmp_path / "empty", "--resume"))
    assert nothing.exit_code == 1 and "nothing to resume" in nothing.output
    assert invoke(args + ["--overwrite"]).exit_code == 0


def test_compile_smoke(data, tmp_path):
    # ~1 min on 2 cores (torch.compile of a tiny model and of the CPU augmentation).
    proc = run_cli(train_args(data, tmp_path / "run", "--compile", "--max-steps", "2"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert math.isfinite(rows(tmp_path / "run")[0]["train_loss"])


@pytest.mark.parametrize("engine, label", [("compiled", "compiled_explicit"), ("reference", "reference")])
def test_cpu_augment_chooses_the_train_engine_without_compile(data, tmp_path, monkeypatch, engine, label):
    """--cpu-augment, not --compile, decides the CPU augmentation engine of the train loader."""
    seen = []
    wrap_train_batches(monkeypatch, lambda loader, images, labels: seen.append(loader.engine) or (images, labels))
    result = invoke(train_args(data, tmp_path / "run", "--epochs", "1", "--max-steps", "2", "--no-compile",
                               "--cpu-augment", engine))
    assert result.exit_code == 0, result.output
    assert seen == [label, label]


def test_a_process_group_that_cannot_form_is_one_line(data, tmp_path):
    """Rank 0 cannot host the rendezvous store on a port in use: one line naming the rank and address."""
    port = free_port()
    with __import__("socket").socket() as held:  # the port is taken: rank 0 cannot host the store there
        held.bind(("127.0.0.1", port))
        env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "TORCH_DIST_INIT_BARRIER": "0"}
        proc = run_cli(train_args(data, tmp_path / "run"), timeout=120, **env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: rank 0: cannot join the other ranks at 127.0.0.1:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_ranks_started_with_different_options_stop_with_one_line(data, tmp_path):
    """Two ranks of one job whose commands differ (--lr): both stop at start, naming the option."""
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_helpers.py"),
                               *train_args(data, tmp_path / "run", "--lr", lr)],
                              cwd=ROOT, env=child_env(**env, RANK=str(rank), LOCAL_RANK="0"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, lr in ((0, "0.01"), (1, "0.02"))]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 1, stderr[-2000:]
        last = [line for line in stderr.splitlines() if line.strip()][-1]
        assert "--lr" in last and "every node must run the same command" in last and last.startswith("error:"), last
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_resume_auto_starts_continues_and_never_replaces(data, tmp_path):
    out = tmp_path / "run"
    first = invoke(train_args(data, out, "--max-steps", "6", "--resume", "auto"))  # nothing there: a new run
    assert first.exit_code == 0, first.output
    again = invoke(train_args(data, out, "--resume", "auto"))  # last.pt there (epoch 1 done): continued
    assert again.exit_code == 0, again.output
    assert [r["epoch"] for r in rows(out)] == [1, 2] and again.output.count("epoch 1/") == 0
    (out / "last.pt").unlink()  # best.pt alone is still a run: auto does not replace it
    refused = invoke(train_args(data, out, "--resume", "auto"))
    assert refused.exit_code == 1 and "--resume auto never replaces one" in refused.output
