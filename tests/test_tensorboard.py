"""Board (facesense/train/tensorboard.py), read back with TensorBoard's own event readers."""
from __future__ import annotations

import sys
import time
from collections import Counter
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer import event_file_writer

from facesense.core.errors import FaceSenseError
from facesense.train.tensorboard import Board

STEPS_PER_EPOCH = 5


def row(epoch: int, base: float = 0.0, auc: float | None = 0.8) -> dict:
    """A metrics.jsonl row whose values encode `base` and the epoch (to tell runs apart)."""
    return {"epoch": epoch, "step": epoch * STEPS_PER_EPOCH, "steps_in_epoch": STEPS_PER_EPOCH,
            "train_loss": base + epoch, "train_accuracy": 0.1 * epoch, "val_accuracy": 0.05 * epoch,
            "val_auc_macro_ovr": auc, "val_f1_weighted": 0.04 * epoch, "lr": 0.001 * epoch,
            "images_per_s": 100.0 * epoch, "data_wait_share": 0.01 * epoch, "epoch_time_s": 3.0}


def accumulated(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard's Python loader serves them (restart markers applied)."""
    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def on_disk(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in the event files, in file order, nothing dropped
    (what a reader that ignores restart markers, like TensorBoard's Rust data server, starts from)."""
    points: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run_dir.glob("*tfevents*")):
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            for value in event.summary.value:
                points.setdefault(value.tag, []).append((event.step, value.simple_value))
    return points


def later_process(monkeypatch, hours: int) -> None:
    """Event files are named, and read, in order of their writer's start second; a resumed run is a
    later process, but in one test both would start in the same second (and then sort by a counter,
    as text: "10" before "8"). So each simulated process starts `hours` later."""
    monkeypatch.setattr(event_file_writer, "time", SimpleNamespace(time=lambda: time.time() + 3600 * hours))


def train(board: Board, first_step: int, last_step: int, base: float) -> None:
    """Interval points at every step in [first_step, last_step] and a row at each epoch's end."""
    for step in range(first_step, last_step + 1):
        board.interval(step, loss=base + step, images_per_s=10.0 * step, data_wait_share=0.5)
        if step % STEPS_PER_EPOCH == 0:
            board.epoch(row(step // STEPS_PER_EPOCH, base))


def test_interval_and_epoch_scalars_land_under_their_names_and_steps(tmp_path):
    board = Board(tmp_path, enabled=True, history=[], step=0)
    board.interval(10, loss=2.5, images_per_s=1234.0, data_wait_share=0.25)
    board.interval(20, loss=1.5, images_per_s=1500.0, data_wait_share=0.125)
    board.epoch(row(1, auc=None))
    board.epoch(row(2, auc=0.75))
    board.close()

    steps = accumulated(tmp_path / "tensorboard" / "steps")
    assert steps == {"train/loss_interval": [(10, 2.5), (20, 1.5)],
                     "speed/images_per_s": [(10, 1234.0), (20, 1500.0)],
                     "speed/data_wait_share": [(10, 0.25), (20, 0.125)]}
    epochs = accumulated(tmp_path / "tensorboard" / "epochs")
    assert set(epochs) == {"epoch/train_loss", "epoch/train_accuracy", "epoch/val_accuracy", "epoch/val_auc",
                           "epoch/val_f1", "epoch/lr", "epoch/images_per_s", "epoch/data_wait_share"}
    assert epochs["epoch/val_auc"] == [(2, 0.75)]  # epoch 1's AUC was None: no point, not a 0
    assert [s for s, _ in epochs["epoch/train_loss"]] == [1, 2]
    for key, tag in [("train_loss", "epoch/train_loss"), ("val_accuracy", "epoch/val_accuracy"),
                     ("val_f1_weighted", "epoch/val_f1"), ("lr", "epoch/lr"),
                     ("images_per_s", "epoch/images_per_s"), ("data_wait_share", "epoch/data_wait_share"),
                     ("train_accuracy", "epoch/train_accuracy")]:
        assert [v for _, v in epochs[tag]] == pytest.approx([row(1)[key], row(2)[key]]), tag


def test_epoch_flushes_so_a_killed_run_keeps_its_curves(tmp_path):
    board = Board(tmp_path, enabled=True, history=[], step=0)
    # add_scalar only queues a point for the writer's thread; epoch() waits for the queues to reach
    # the files. (The thread is quick, so this passes most times even without that wait.)
    board.epoch(row(1))
    board.interval(8, loss=0.5, images_per_s=7.0, data_wait_share=0.0)
    board.epoch(row(2))  # no close(): the process "dies" here
    assert on_disk(tmp_path / "tensorboard" / "steps")["train/loss_interval"] == [(8, 0.5)]
    assert on_disk(tmp_path / "tensorboard" / "epochs")["epoch/train_loss"] == [(1, 1.0), (2, 2.0)]
    board.close()


@pytest.mark.parametrize("read", [accumulated, on_disk], ids=["python-loader", "raw-events"])
def test_resume_continues_the_curves_without_duplicate_steps(tmp_path, monkeypatch, read):
    # First run: steps 1..20 (epochs 1..4), killed with last.pt at step 12 (mid epoch 3).
    first = Board(tmp_path, enabled=True, history=[], step=0)
    train(first, 1, 20, base=0.0)
    first.close()
    later_process(monkeypatch, 1)
    # Resumed run: last.pt's history holds epochs 1 and 2; it retrains steps 13.. with other values.
    resumed = Board(tmp_path, enabled=True, history=[row(1), row(2)], step=12)
    train(resumed, 13, 30, base=1000.0)
    resumed.close()

    loss = read(tmp_path / "tensorboard" / "steps")["train/loss_interval"]
    assert [s for s, _ in loss] == list(range(1, 31))  # each step once, in order
    assert dict(loss) == {s: float(s) if s <= 12 else 1000.0 + s for s in range(1, 31)}
    epochs = read(tmp_path / "tensorboard" / "epochs")
    for tag in ("epoch/train_loss", "epoch/val_accuracy", "epoch/val_auc"):
        assert Counter(s for s, _ in epochs[tag]) == Counter(range(1, 7)), tag
    assert dict(epochs["epoch/train_loss"]) == {1: 1.0, 2: 2.0, 3: 1003.0, 4: 1004.0, 5: 1005.0, 6: 1006.0}


def test_a_second_resume_cuts_the_first_resumes_tail_too(tmp_path, monkeypatch):
    first = Board(tmp_path, enabled=True, history=[], step=0)
    train(first, 1, 20, base=0.0)
    first.close()
    later_process(monkeypatch, 1)
    again = Board(tmp_path, enabled=True, history=[row(1), row(2)], step=12)
    train(again, 13, 25, base=1000.0)
    again.close()
    later_process(monkeypatch, 2)
    third = Board(tmp_path, enabled=True, history=[row(e, 1000.0 if e > 2 else 0.0) for e in (1, 2, 3, 4)],
                  step=22)
    train(third, 23, 26, base=2000.0)
    third.close()

    for read in (accumulated, on_disk):
        loss = dict(read(tmp_path / "tensorboard" / "steps")["train/loss_interval"])
        assert sorted(loss) == list(range(1, 27))
        assert [loss[s] for s in (12, 13, 22, 23, 26)] == [12.0, 1013.0, 1022.0, 2023.0, 2026.0]
        assert len(read(tmp_path / "tensorboard" / "steps")["train/loss_interval"]) == 26
        epochs = read(tmp_path / "tensorboard" / "epochs")["epoch/train_loss"]
        assert epochs == [(1, 1.0), (2, 2.0), (3, 1003.0), (4, 1004.0), (5, 2005.0)]


def test_disabled_board_writes_nothing(tmp_path):
    board = Board(tmp_path, enabled=False, history=[], step=0)
    board.interval(1, loss=1.0, images_per_s=1.0, data_wait_share=0.0)
    board.epoch(row(1))
    board.close()
    assert not (tmp_path / "tensorboard").exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_tensorboard_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(FaceSenseError, match="pip install tensorboard, or pass --no-tensorboard"):
        Board(tmp_path, enabled=True, history=[], step=0)
    Board(tmp_path, enabled=False, history=[], step=0).close()  # --no-tensorboard still works


def test_resume_after_a_kill_mid_write_drops_the_torn_record_and_a_stray_temporary(tmp_path, monkeypatch):
    first = Board(tmp_path, enabled=True, history=[], step=0)
    train(first, 1, 20, base=0.0)
    first.close()
    steps_dir = tmp_path / "tensorboard" / "steps"
    (old,) = steps_dir.glob("*tfevents*")
    (steps_dir / f".{old.name}.tmp-99").write_bytes(old.read_bytes())  # an earlier cut, killed
    old.write_bytes(old.read_bytes()[:-7])  # the writer was killed inside its last record
    later_process(monkeypatch, 1)
    resumed = Board(tmp_path, enabled=True, history=[row(1), row(2)], step=12)
    train(resumed, 13, 14, base=1000.0)
    resumed.close()

    assert not list(steps_dir.glob(".*.tmp-*"))
    for read in (accumulated, on_disk):
        loss = read(steps_dir)["train/loss_interval"]
        assert loss == [(s, float(s)) for s in range(1, 13)] + [(13, 1013.0), (14, 1014.0)]
