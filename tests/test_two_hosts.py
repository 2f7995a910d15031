"""`facesense train` across two hosts: two network namespaces joined by a veth pair, one torchrun in each.

The two "hosts" share this machine's file system: --out on one tmp directory is shared storage (or,
given one --out each, storage that is not). Rank 0 is always on host A: torchrun orders nodes by
--local_addr (10.231.X.1 < 10.231.X.2). Tiny model, 96 train images, batch 16: 3 steps per epoch on
2 ranks, 6 on 1; 2 epochs. Every wait is bounded (rendezvous join timeout 60 s, 150 s per job), so a
broken network fails a test and never hangs it. Needs root and iproute2 (else skipped).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from netns_helpers import TwoHosts, run_two, why_no_namespaces
from train_helpers import make_shards, train_args

DETERMINISTIC_KEYS = ("epoch", "step", "steps_in_epoch", "train_loss", "val_accuracy", "val_auc_macro_ovr",
                      "val_f1_weighted", "lr")
ELASTIC = ("--resume", "auto", "--save-every", "1")  # last.pt after every step: a restart continues mid-epoch
KILL_AFTER = "4"  # die when asked for batch 5: epoch 2, after its first step (and last.pt at step 4)

pytestmark = pytest.mark.skipif(why_no_namespaces() is not None, reason=str(why_no_namespaces()))


def make_hosts() -> TwoHosts:
    try:
        return TwoHosts.make()
    except RuntimeError as exc:  # root and iproute2, yet no namespaces (a container without CAP_SYS_ADMIN)
        pytest.skip(f"cannot make network namespaces: {exc}")


@pytest.fixture
def hosts():
    made = make_hosts()
    yield made
    made.delete()  # kills what is left in them, deletes them (and the veth pair)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def keys(rows_):
    return [{k: r[k] for k in DETERMINISTIC_KEYS} for r in rows_]


def kill(what: str) -> dict:
    return {"FS_NETNS_KILL": what, "FS_NETNS_KILL_AFTER": KILL_AFTER}


def logs_of(tmp_path):
    return (tmp_path / "logs" / "A.log").read_text(errors="replace"), \
        (tmp_path / "logs" / "B.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """One two-host run, nothing killed: (its --out, A's log, B's log)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = tmp / "run"
    args = train_args(data, out, *ELASTIC)
    made = make_hosts()
    try:
        a, b, text = run_two(made, args, args, tmp / "logs", rdzv_id="plain")
    finally:
        made.delete()
    assert (a, b) == (0, 0), text[-6000:]
    return (out, *logs_of(tmp))


def test_two_hosts_train_one_run_with_one_writer(uninterrupted):
    out, log_a, log_b = uninterrupted
    last = load(out / "last.pt")
    assert len(last["ranks"]) == 2  # one rank per host
    assert (last["epoch"], last["batch"], last["step"]) == (2, 0, 6)  # 96 images / 2 ranks / batch 16 = 3 a epoch
    assert [(r["epoch"], r["step"], r["steps_in_epoch"]) for r in rows(out)] == [(1, 3, 3), (2, 6, 3)]
    # One writer, rank 0 on host A: the epoch lines and the closing line are A's alone.
    assert log_a.count("epoch 1/2  step 3") == 1 and log_a.count("epoch 2/2  step 6") == 1
    assert "best val accuracy" in log_a
    assert "epoch 1/2  step" not in log_b and "best val accuracy" not in log_b


@pytest.fixture(scope="module")
def worker_killed(data, tmp_path_factory):
    """The same run, host B's worker SIGKILLed after step 4 (mid-epoch 2), --max-restarts 1."""
    tmp = tmp_path_factory.mktemp("worker_killed")
    out = tmp / "run"
    args = train_args(data, out, *ELASTIC)
    made = make_hosts()
    try:
        codes = run_two(made, args, args, tmp / "logs", rdzv_id="worker", max_restarts=1, env_b=kill("worker"))
    finally:
        made.delete()
    return (out, codes, *logs_of(tmp))


def test_a_killed_worker_restarts_and_ends_as_if_never_killed(worker_killed, uninterrupted):
    out, (a, b, text), log_a, log_b = worker_killed
    assert (a, b) == (0, 0), text[-8000:]
    assert "exitcode: -9" in log_b  # the kill happened, and torchrun restarted the workers
    # It continued from last.pt (step 4) rather than starting over: epoch 1 was trained (and printed) once.
    assert log_a.count("epoch 1/2  step 3") == 1 and log_a.count("epoch 2/2  step 6") == 1
    assert keys(rows(out)) == keys(rows(uninterrupted[0]))
    got, want = load(out / "last.pt"), load(uninterrupted[0] / "last.pt")
    assert len(got["ranks"]) == 2 and (got["epoch"], got["batch"], got["step"]) == (2, 0, 6)
    for key in want["model"]:
        assert torch.equal(got["model"][key], want["model"][key]), f"{key} differs from the uninterrupted run"


def test_the_survivor_of_a_peers_death_says_so_in_one_line(worker_killed):
    log_a = worker_killed[2]
    first_attempt = log_a.split("closing signal")[0].split("failed (exitcode")[0]
    assert "error: rank 0:" in first_attempt
    assert "Traceback" not in first_attempt


def test_a_restart_implies_resume_auto_on_every_host(data, uninterrupted, hosts, tmp_path):
    out = tmp_path / "run"
    args = train_args(data, out, "--save-every", "1")  # no --resume: torchrun's restart implies auto
    a, b, text = run_two(hosts, args, args, tmp_path / "logs", rdzv_id="implied", max_restarts=1,
                         env_b=kill("worker"))
    assert (a, b) == (0, 0), text[-4000:]
    assert keys(rows(out)) == keys(rows(uninterrupted[0]))


def test_a_lost_host_leaves_the_other_to_finish_alone(data, uninterrupted, hosts, tmp_path):
    out = tmp_path / "run"
    args = train_args(data, out, *ELASTIC)
    # --nnodes 1:2: after host B's agent and worker die (SIGKILL, mid-epoch 2) host A's worker fails on the
    # broken link, its agent restarts it, the next rendezvous round completes with A alone (1 rank).
    # last_call_timeout 8 s: at the start both hosts join within it, so the first round has both.
    a, b, text = run_two(hosts, args, args, tmp_path / "logs", rdzv_id="lost", nnodes="1:2", max_restarts=1,
                         last_call_timeout=8, env_b=kill("host"))
    log_a, _ = logs_of(tmp_path)
    assert a == 0, text[-8000:]
    assert b == -9  # the whole of host B went: its torchrun agent was SIGKILLed
    # last.pt at step 4 came from 2 ranks; 1 rank resumes it at the same number of samples seen:
    # 4 steps x 2 ranks x 16 = step 8 x 1 rank x 16 = 128 images (epoch 2's 3rd of 6 batches).
    assert "note: 2 ranks wrote this checkpoint, 1 resume it: step 4 there is step 8 here" in log_a
    assert log_a.count("epoch 1/2  step 3") == 1  # epoch 1 was not trained again
    last = load(out / "last.pt")
    assert len(last["ranks"]) == 1
    # Steps 9-12 finish epoch 2 on 1 rank: 4 x 2 x 16 + 4 x 1 x 16 = 192 images = 2 epochs of 96.
    assert (last["epoch"], last["batch"], last["step"]) == (2, 0, 12)
    got, want = rows(out), rows(uninterrupted[0])
    assert [(r["epoch"], r["step"], r["steps_in_epoch"]) for r in got] == [(1, 3, 3), (2, 12, 6)]
    assert keys(got[:1]) == keys(want[:1])  # epoch 1 ran on both hosts, exactly as without the loss
    # Epoch 2 is not bit-for-bit the 2-rank run's (other batches, reseeded augmentation), but its figures
    # are whole: the schedule ends where the 2-rank run's does (its length is counted in samples), the
    # loss is a mean over the epoch's batches, accuracies are fractions.
    assert got[1]["lr"] == pytest.approx(want[1]["lr"])
    assert math.isfinite(got[1]["train_loss"]) and 0 < got[1]["train_loss"] < 10
    assert 0 <= got[1]["train_accuracy"] <= 1 and 0 <= got[1]["val_accuracy"] <= 1
    assert "best val accuracy" in log_a


def test_without_shared_storage_a_restart_fails_in_one_line(data, hosts, tmp_path):
    # One --out per host (nothing shared): rank 0 (host A) writes last.pt into A's; at the restart after
    # B's worker is killed, rank 0 resumes from it and rank 1 (host B) cannot see it.
    out_a, out_b = tmp_path / "out-a", tmp_path / "out-b"
    a, b, text = run_two(hosts, train_args(data, out_a, *ELASTIC), train_args(data, out_b, *ELASTIC),
                         tmp_path / "logs", rdzv_id="unshared", max_restarts=1, env_b=kill("worker"))
    assert a != 0 and b != 0, text[-6000:]
    lines = [line for line in text.splitlines() if "must be on storage every node sees" in line]
    assert lines, text[-6000:]
    assert all(line.startswith("error: ") and f"cannot see {out_b / 'last.pt'}" in line for line in lines)
    last = load(out_a / "last.pt")  # what rank 0 would have resumed is still there, untouched
    assert (last["epoch"], last["batch"], last["step"]) == (1, 1, 4)
    assert not (out_b / "last.pt").exists()
