"""`facesense train`: the training loop.

Per step the loop does only device work: a batch from the loader (already on the
device, augmented, normalised, channels-last), forward under the AMP context, backward,
optimizer/scheduler/EMA updates, and `loss_sum += loss` on the device. The host waits
for the device only every `log_every` steps (progress bar), at checkpoints and at
epoch ends (validation).

Selection is on `val` (PublicTest); `test` is never read here (`facesense eval` does).

Resuming. Checkpoints hold everything the next step depends on: weights, optimizer,
scheduler, scaler, EMA, every rank's RNG state and loss sum, and the position
(epoch, batches done, step). The loader's order and augmentation draws depend only on
(seed, epoch, rank) and `set_epoch(epoch, start_batch)` replays an epoch from any
batch, so a run killed at any point and resumed from its last.pt ends with the same
weights and metrics as one that never stopped (on CPU, or with --deterministic).

Distributed. Under torchrun each process is one rank (PyTorch DDP; NCCL on GPU, gloo
on CPU) reading its own part of the shards; every rank takes the same number of steps;
rank 0 alone validates and writes checkpoints and logs. One machine, 4 GPUs:

    torchrun --nproc_per_node 4 -m facesense train --data data/shards --amp

Several machines: the same command on each, with torchrun's rendezvous options
(--nnodes 2 --node_rank 0|1 --rdzv_backend c10d --rdzv_endpoint HOST:29400 --rdzv_id RUN).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facesense.core import data as datacheck

from facesense.train import memory

from facesense.core import runtime
from facesense.core.checkpoint import load_checkpoint, save_checkpoint, selection_snapshot
from facesense.core.config import TrainConfig, resume_differences
from facesense.core.data import data_identity, open_split, read_manifest
from facesense.core.errors import FaceSenseError
from facesense.eval.metrics import compute_metrics, predict_probs
from facesense.core.model import check_input_size, create_model
from facesense.train.optim import class_weights, make_ema, make_optimizer, warmup_cosine
from facesense.train.progress import ProgressBar
from facesense.train.rundir import RunLock, existing_run
from pipeline.errors import mount_point, no_space

OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl", "training_curves.png")


@dataclass
class TrainResult:
    model: nn.Module  # the trained network (unwrapped: no DDP / compile)
    ema: nn.Module | None  # its EMA copy, when --ema
    history: list[dict]  # one row per epoch, as in metrics.jsonl
    best_accuracy: float  # best val accuracy (selects best.pt)


class NonFiniteLoss(FaceSenseError):
    pass


def train(cfg: TrainConfig) -> TrainResult:
    rt = runtime.setup(cfg.device, cfg.deterministic)
    # Resolved before anything is compared or saved: a checkpoint records what actually ran.
    cfg = dataclasses.replace(cfg, amp=runtime.amp_default(cfg.amp, rt.device))
    lock = RunLock(cfg.out)  # rank 0 writes --out, so rank 0 holds it
    try:
        # Before anything looks at --out: a second train into it fails here, at once.
        runtime.on_all_ranks(rt, lambda: lock.acquire() if rt.is_main else None)
        return _train(cfg, rt)
    finally:
        lock.release()  # and removes --out again if this run created it and wrote nothing
        runtime.teardown(rt)


def _read_manifest(data: str) -> dict:
    manifest = read_manifest(data)
    for split in ("train", "val"):
        if manifest["splits"][split]["count"] == 0:
            raise FaceSenseError(f"{data}: the {split} split is empty")
    return manifest


def _start(cfg: TrainConfig, out: Path, manifest: dict, data_id: dict) -> dict | None:
    """The checkpoint to resume from (after checking it fits this run), or None for a new run."""
    last = out / "last.pt"
    if not cfg.resume:
        found = existing_run(out)  # best.pt alone is a run too: a shipped model has no last.pt
        if found and not cfg.overwrite:
            raise FaceSenseError(f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                                 f"--overwrite to replace it, or another --out")
        return None
    if not last.is_file():
        raise FaceSenseError(f"--resume: {last} not found; nothing to resume (drop --resume to start a run)")
    ckpt = load_checkpoint(last)
    diffs = resume_differences(ckpt["config"], cfg)
    if diffs:
        raise FaceSenseError(f"--resume: {last} comes from another model or config ({'; '.join(diffs)}); "
                             f"resume with the options it was started with")
    if ckpt["classes"] != list(manifest["classes"]):
        raise FaceSenseError(f"--resume: {last} has classes {ckpt['classes']}, {cfg.data} has {manifest['classes']}")
    strip = lambda d: {s: {k: v for k, v in e.items() if k != "dir"} for s, e in d.items()}  # noqa: E731
    if strip(ckpt["data"]) != strip(data_id):
        raise FaceSenseError(f"--resume: {cfg.data} is not the data {last} was trained on "
                             f"(shards, counts or fingerprint differ)")
    return ckpt


def _train(cfg: TrainConfig, rt: runtime.Runtime) -> TrainResult:
    out = Path(cfg.out)
    manifest = runtime.on_all_ranks(rt, lambda: _read_manifest(cfg.data))
    classes = list(manifest["classes"])
    warnings = runtime.on_all_ranks(rt, lambda: datacheck.class_warnings(cfg.data, manifest))
    if rt.is_main:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
    # The shards must be the ones the manifest lists: then data_id below records the data trained on.
    runtime.on_all_ranks(rt, lambda: (datacheck.check_shards(cfg.data, manifest, "train", rt.rank, rt.world_size),
                                      datacheck.check_shards(cfg.data, manifest, "val")))
    data_id = {s: data_identity(cfg.data, manifest, s) for s in ("train", "val")}
    ckpt = runtime.on_all_ranks(rt, lambda: _start(cfg, out, manifest, data_id))
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".*.tmp-*"):  # left by a run killed while writing
            tmp.unlink(missing_ok=True)
        if cfg.overwrite:
            for name in OUTPUTS:
                (out / name).unlink(missing_ok=True)

    runtime.seed_everything(cfg.seed + rt.rank)  # DDP copies rank 0's initial weights to every rank

    def build_model():
        net = create_model(cfg.model, cfg.channels, len(classes), cfg.drop_rate, cfg.drop_path_rate,
                           pretrained=cfg.pretrained and ckpt is None, weights=None if ckpt else cfg.weights,
                           zero_init=cfg.zero_init)
        net.to(rt.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        check_input_size(net, cfg.channels, cfg.img_size, cfg.model)
        memory.check_fits(net, cfg.channels, cfg.img_size, cfg.batch_size, cfg.amp, cfg.model, rt.device)
        return net

    model = runtime.on_all_ranks(rt, build_model)
    autocast, scaler, batch_dtype = runtime.amp_setup(cfg.amp, cfg.amp_dtype, rt.device)
    use_compile = cfg.compile if cfg.compile is not None else rt.device.type == "cuda"
    # Every rank opens val too (small), so a bad val shard fails all ranks alike; rank 0 alone uses it.
    train_loader, val_loader = runtime.on_all_ranks(rt, lambda: (
        open_split(cfg.data, "train", cfg, rt.device, train=True, batch_size=cfg.batch_size, dtype=batch_dtype,
                   rank=rt.rank, world_size=rt.world_size, compile_cpu=use_compile),
        open_split(cfg.data, "val", cfg, rt.device, train=False, batch_size=cfg.batch_size, dtype=batch_dtype)))
    steps_per_epoch = len(train_loader)
    if rt.distributed:  # the loader pads ranks to equal steps; make sure, as a mismatch would hang DDP
        n = torch.tensor([steps_per_epoch], device=rt.device)
        torch.distributed.all_reduce(n, torch.distributed.ReduceOp.MIN)
        steps_per_epoch = int(n)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(model, cfg, rt.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr_ratio))
    criterion = nn.CrossEntropyLoss(weight=class_weights(cfg, manifest, rt.device),
                                    label_smoothing=cfg.label_smoothing)

    epoch, first, step, best, history = 0, 0, 0, -1.0, []
    epoch_loss = torch.zeros((), device=rt.device)  # this rank's summed step losses in the epoch
    epoch_correct = torch.zeros((), device=rt.device)  # ... and correct predictions on augmented train batches
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        epoch, first, step, best = ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["best_accuracy"]
        history = [row for row in ckpt["history"] if row["epoch"] <= epoch]  # drops a partial epoch's row
    runner = model
    if rt.distributed:
        runner = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None, gradient_as_bucket_view=True)
    ema = make_ema(model, cfg.ema_decay) if cfg.ema else None  # after DDP's broadcast: the same on every rank
    if ema and ckpt:
        ema.module.load_state_dict(ckpt["ema"])
    if use_compile:
        runner = torch.compile(runner)
    if ckpt:
        own = ckpt["ranks"][rt.rank] if len(ckpt["ranks"]) == rt.world_size else None
        if own is None:
            runtime.seed_everything(cfg.seed + rt.rank + 7919 * ckpt["step"])
            if rt.is_main:
                print(f"note: {len(ckpt['ranks'])} ranks wrote this checkpoint, {rt.world_size} resume it: "
                      f"the run continues, but not bit-for-bit as it would have")
        else:
            runtime.set_rng_state(own["rng"])
            epoch_loss.fill_(own["epoch_loss_sum"])
            epoch_correct.fill_(own.get("epoch_correct_sum", 0))

    def checkpoint(position: tuple[int, int], is_best: bool) -> None:
        """Write last.pt (and best.pt); every rank takes part (their RNG states are gathered)."""
        ranks = runtime.gather_rank_states(rt, {"rng": runtime.rng_state(), "epoch_loss_sum": float(epoch_loss),
                                              "epoch_correct_sum": float(epoch_correct)})
        if not rt.is_main:
            return
        payload = {"model": model.state_dict(), "ema": ema.module.state_dict() if ema else None,
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "ranks": ranks, "epoch": position[0], "batch": position[1],
                   "step": step, "best_accuracy": best, "history": history,
                   "config": cfg.to_dict(), "classes": classes, "data": data_id}
        save_checkpoint(out / "last.pt", payload)
        if is_best:
            save_checkpoint(out / "best.pt", selection_snapshot(payload))

    def stopped(what: str) -> NonFiniteLoss:
        kept = (f"{out / 'last.pt'} holds the last good state" if (out / "last.pt").exists()
                else "no checkpoint was written yet")
        return NonFiniteLoss(f"{what}; the run stopped. {kept}. Try a lower --lr, --grad-clip 1.0 "
                             f"or --amp-dtype bfloat16")

    def check_finite(value: float, where: str) -> None:
        if not math.isfinite(value):
            raise stopped(f"the loss became {value} ({where})")

    def validate() -> dict:
        """Val metrics (rank 0); outputs gone to NaN/inf stop the run as a NaN loss does."""
        probs, labels = predict_probs(ema.module if ema else model, val_loader, autocast)
        if not np.isfinite(probs).all():
            raise stopped(f"the model's outputs on val became non-finite (epoch {epoch + 1})")
        return compute_metrics(probs, labels, classes)

    stop = cfg.max_steps and step >= cfg.max_steps
    with ProgressBar(rt.is_main, cfg.epochs) as bar:
        while epoch < cfg.epochs and not stop:
            train_loader.set_epoch(epoch, first)
            bar.new_epoch(epoch, steps_per_epoch, first)
            model.train()
            interval_loss = torch.zeros((), device=rt.device)
            start = last_log = time.perf_counter()
            data_wait, wait_log = runtime.DataWait(rt.device), 0.0
            n_interval = n_epoch = 0  # steps since the last log, since this (re)start of the epoch
            batch = first - 1
            data_wait.start()
            for batch, (images, labels) in enumerate(train_loader, start=first):
                data_wait.stop()
                with autocast:
                    logits = runner(images)
                    loss = criterion(logits, labels)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema:
                    ema.update(model, step)
                step += 1
                n_interval += 1
                n_epoch += 1
                loss = loss.detach().float()
                interval_loss += loss
                epoch_loss += loss
                epoch_correct += (logits.detach().argmax(1) == labels).sum()  # on the device: no sync
                bar.advance()
                stop = bool(cfg.max_steps) and step >= cfg.max_steps
                end_of_epoch = batch + 1 >= steps_per_epoch
                save_now = cfg.save_every and step % cfg.save_every == 0 and not (end_of_epoch or stop)
                if step % cfg.log_every == 0 or end_of_epoch or stop or save_now:
                    value = runtime.reduce_sum(rt, interval_loss).item() / (n_interval * rt.world_size)  # host sync
                    check_finite(value, f"epoch {epoch + 1}, steps {step - n_interval + 1}-{step}")
                    now, wait = time.perf_counter(), data_wait.seconds()
                    bar.show(value, n_interval * cfg.batch_size * rt.world_size / (now - last_log),
                             (wait - wait_log) / (now - last_log))
                    interval_loss.zero_()
                    n_interval, last_log, wait_log = 0, now, wait
                if save_now:
                    checkpoint((epoch, batch + 1), is_best=False)  # the loss was checked just above
                if end_of_epoch or stop:
                    break
                data_wait.start()
            elapsed = time.perf_counter() - start
            if n_epoch == 0:
                break

            # End of the epoch (or of the run, at --max-steps): validate, log, checkpoint.
            done = batch + 1
            train_loss = runtime.reduce_sum(rt, epoch_loss).item() / (done * rt.world_size)
            check_finite(train_loss, f"epoch {epoch + 1}")
            # Accuracy on the augmented batches the model trained on (padding included under DDP):
            # next to val accuracy it shows over- or under-fitting at a glance.
            train_acc = runtime.reduce_sum(rt, epoch_correct).item() / (done * cfg.batch_size * rt.world_size)
            position = (epoch + 1, 0) if done >= steps_per_epoch else (epoch, done)
            if position[1] == 0:
                epoch_loss.zero_()  # before the checkpoint: it resumes at the next epoch's start
                epoch_correct.zero_()
            row = {"epoch": epoch + 1, "step": step, "steps_in_epoch": done, "train_loss": train_loss,
                   "train_accuracy": train_acc}
            is_best = False
            metrics = runtime.on_all_ranks(rt, lambda: validate() if rt.is_main else None)  # a stop stops all
            if rt.is_main:
                row |= {f"val_{k}": metrics[k] for k in ("accuracy", "auc_macro_ovr", "f1_weighted")}
                row |= {"lr": optimizer.param_groups[0]["lr"],
                        "images_per_s": n_epoch * cfg.batch_size * rt.world_size / elapsed,
                        "data_wait_share": data_wait.seconds() / elapsed, "epoch_time_s": elapsed}
                is_best = row["val_accuracy"] > best
                best = max(best, row["val_accuracy"])
                history.append(row)
            checkpoint(position, is_best)
            if rt.is_main:
                _write_logs(out, history)
                auc = row["val_auc_macro_ovr"]
                bar.print(f"epoch {epoch + 1}/{cfg.epochs}  step {step}  train loss {train_loss:.4f}  "
                          f"train acc {train_acc:.4f}  "
                          f"val acc {row['val_accuracy']:.4f}  AUC {'-' if auc is None else f'{auc:.4f}'}  "
                          f"F1 {row['val_f1_weighted']:.4f}  {row['images_per_s']:,.0f} img/s  "
                          f"data wait {row['data_wait_share']:.0%}" + ("  *best*" if is_best else ""))
            epoch, first = position
    if rt.is_main and history:
        top = max(history, key=lambda r: r["val_accuracy"])
        print(f"best val accuracy {top['val_accuracy']:.4f} (epoch {top['epoch']}); "
              f"checkpoints in {out}/ (best.pt, last.pt)")
    return TrainResult(model, ema.module if ema else None, history, best)


def _write_logs(out: Path, history: list[dict]) -> None:
    """metrics.jsonl (rewritten whole, so a resumed run never duplicates rows) and the curves."""
    from facesense.eval.plots import training_curves

    tmp = out / f".metrics.jsonl.tmp-{os.getpid()}"
    try:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
        os.replace(tmp, out / "metrics.jsonl")
        training_curves(history, out / "training_curves.png")
    except OSError as exc:  # last.pt is already written: --resume continues from it
        tmp.unlink(missing_ok=True)
        why = (f"no space left on device {mount_point(out)}" if no_space(exc)
               else f"cannot write {exc.filename or out} ({exc.strerror})")
        raise FaceSenseError(f"{why}; {out / 'last.pt'} is saved: free space and rerun with --resume") from exc
