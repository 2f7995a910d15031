"""`facesense train`: the training loop.

Per step the loop does only device work: a batch from the loader (already on the
device, augmented, normalised, channels-last), forward under the AMP context, backward,
optimizer/scheduler/EMA updates, and `loss_sum += loss` on the device. The host waits
for the device only every `log_every` steps (progress bar), at checkpoints and at
epoch ends (validation).

Targets are int64 labels, or with --soft-labels (B, K) FER+ vote distributions; one
criterion takes both (`make_criterion`). Selection is on `val` (PublicTest), always scored
against the majority label; `test` is never read here (`facesense eval` does). Input size
and channels default to the data's (`config.for_data`), and checkpoints record the faces
the model takes (`source`: the train split's image shape and channels) for predict's crops.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facesense.core import data as rundata
from facesense.core import runtime
from facesense.core.checkpoint import load_checkpoint, save_checkpoint, selection_snapshot
from facesense.core.config import TrainConfig, for_data, resume_differences, source_record
from facesense.core.errors import FaceSenseError
from facesense.core.files import TMP_GLOB, write_bytes
from facesense.core.model import check_input_size, create_model
from facesense.eval.metrics import compute_metrics, predict_probs
from facesense.train import memory
from facesense.train.optim import class_weights, make_ema, make_optimizer, warmup_cosine
from facesense.train.progress import ProgressBar
from facesense.train.rundir import RunLock, check_outside_data, existing_run
from facesense.train.tensorboard import Board

OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl", "training_curves.png")


@dataclass
class TrainResult:
    model: nn.Module  # the trained network (unwrapped: no DDP / compile)
    ema: nn.Module | None  # its EMA copy, when --ema
    history: list[dict]  # one row per epoch, as in metrics.jsonl
    best_accuracy: float  # best val accuracy (selects best.pt)


class NonFiniteLoss(FaceSenseError):
    pass


@dataclass
class Run:
    """One training run: what prepare() builds and the epoch loop advances."""

    cfg: TrainConfig  # resolved against the data (config.for_data): what runs and what checkpoints record
    rt: runtime.Runtime
    out: Path
    manifest: dict  # manifest.json, read once
    data_id: dict  # split -> what was read (dir, counts, fingerprint, shard hashes): stored in checkpoints
    source: dict  # the faces the model takes: the train split's {"image_shape", "channels"} (checkpoint "source")
    model: nn.Module  # the network (DDP and compile wrap it into `runner`)
    runner: nn.Module  # what the step calls: model, or DDP(model), compiled or not
    ema: object | None  # timm ModelEmaV3, when --ema
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    autocast: object  # nullcontext() or torch.autocast(...): AMP as an object
    train_loader: object
    val_loader: object
    steps_per_epoch: int
    epoch: int = 0  # 0-based epoch in progress
    first: int = 0  # batches of `epoch` already done (a mid-epoch resume starts there)
    step: int = 0  # optimizer steps taken in all
    best: float = -1.0  # best val accuracy so far
    history: list[dict] = field(default_factory=list)
    epoch_loss: torch.Tensor | None = None  # this rank's summed step losses in the epoch (on the device)
    epoch_correct: torch.Tensor | None = None  # ... and correct predictions on the augmented train batches
    epoch_batches: int = 0  # ... and how many batches those sums hold (a resume on other ranks moves them)
    board: Board | None = None  # TensorBoard curves (rank 0; a disabled Board does nothing)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema else self.model

    def at_max_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps


@dataclass
class EpochStats:
    """What one pass of train_one_epoch did."""

    done: int  # batches of the epoch done, counting those before a mid-epoch resume
    steps: int  # steps taken in this pass
    seconds: float
    data_wait_s: float


def train(cfg: TrainConfig) -> TrainResult:
    rt = runtime.setup(cfg.device, cfg.deterministic)
    # Resolved before anything is compared or saved: a checkpoint records what actually ran.
    cfg = dataclasses.replace(cfg, amp=runtime.amp_default(cfg.amp, rt.device))
    check_outside_data(cfg.out, cfg.data)
    lock = RunLock(cfg.out)  # rank 0 writes --out, so rank 0 holds it
    run = None
    try:
        same_command_everywhere(cfg, rt)
        # Before anything looks at --out: a second train into it fails here, at once.
        runtime.on_all_ranks(rt, lambda: lock.acquire() if rt.is_main else None)
        run = prepare(cfg, rt)
        with ProgressBar(rt.is_main, cfg.epochs) as bar:
            while run.epoch < cfg.epochs and not run.at_max_steps():
                stats = train_one_epoch(run, bar)
                if stats.steps == 0:
                    break
                end_epoch(run, stats, bar)
        if rt.is_main and run.history:
            top = max(run.history, key=lambda r: r["val_accuracy"])
            print(f"best val accuracy {top['val_accuracy']:.4f} (epoch {top['epoch']}); "
                  f"checkpoints in {run.out}/ (best.pt, last.pt)")
        return TrainResult(run.model, run.ema.module if run.ema else None, run.history, run.best)
    except (torch.distributed.DistError, RuntimeError) as exc:  # a peer gone, a broken link: one line
        if not rt.distributed:  # gloo reports a broken link as a plain RuntimeError
            raise
        raise FaceSenseError(f"rank {rt.rank}: {type(exc).__name__}: {first_line(exc)}") from exc
    finally:
        if run is not None:
            run.board.close()
        lock.release()  # and removes --out again if this run created it and wrote nothing
        runtime.teardown(rt)


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# Options each node may set for itself (paths of shared storage may differ between machines).
PER_NODE = ("data", "out", "device", "workers")


def same_command_everywhere(cfg: TrainConfig, rt: runtime.Runtime) -> None:
    """Every rank runs the same FaceSense with the same options; else one line naming the first difference."""
    from facesense import __version__

    mine = {"facesense": __version__, **{k: v for k, v in cfg.to_dict().items() if k not in PER_NODE}}
    for rank, theirs in enumerate(runtime.gather_rank_states(rt, mine)):
        diff = next((k for k in mine if theirs.get(k) != mine[k]), None)
        if diff and rank < rt.rank or diff and rt.rank == 0:  # reported by both sides of the first pair
            what = "FaceSense" if diff == "facesense" else f"--{diff.replace('_', '-')}"
            raise FaceSenseError(f"rank {rank} runs {what} {theirs.get(diff)!r}, rank {rt.rank} {mine[diff]!r}: "
                                 f"every node must run the same command and version")


# ------------------------------------------------------------------ prepare: everything before the first step

def prepare(cfg: TrainConfig, rt: runtime.Runtime) -> Run:
    """Check the data and --out, build model, loaders and optimiser, and restore a resumed run.

    Every check that can refuse the run happens before --overwrite deletes anything.
    """
    out = Path(cfg.out)
    manifest, data_id = check_data(cfg, rt)
    cfg = runtime.on_all_ranks(rt, lambda: for_data(cfg, manifest))  # channels, img_size: the data's by default
    ckpt = resume_from(cfg, rt, out, manifest, data_id)
    runtime.seed_everything(cfg.seed + rt.rank)  # DDP copies rank 0's initial weights to every rank
    model = runtime.on_all_ranks(rt, lambda: build_model(cfg, rt, len(manifest["classes"]), fresh=ckpt is None))
    autocast, scaler, batch_dtype = runtime.amp_setup(cfg.amp, cfg.amp_dtype, rt.device)
    train_loader, val_loader = open_loaders(cfg, rt, manifest, batch_dtype)
    if rt.is_main:
        describe_loaders(train_loader, val_loader)
        clean_out(out, overwrite=cfg.overwrite)
    steps_per_epoch = len(train_loader)
    if rt.distributed:  # the loader pads ranks to equal steps; make sure, as a mismatch would hang DDP
        n = torch.tensor([steps_per_epoch], device=rt.device)
        torch.distributed.all_reduce(n, torch.distributed.ReduceOp.MIN)
        steps_per_epoch = int(n)
    optimizer = make_optimizer(model, cfg, rt.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr_ratio))
    criterion = make_criterion(cfg, manifest, rt.device)
    run = Run(cfg, rt, out, manifest, data_id, source_record(manifest, cfg.img_size), model, model, None,
              optimizer, scheduler, scaler, criterion,
              autocast, train_loader, val_loader, steps_per_epoch,
              epoch_loss=torch.zeros((), device=rt.device), epoch_correct=torch.zeros((), device=rt.device))
    if ckpt:
        restore_training_state(run, ckpt)
    if rt.distributed:
        run.runner = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None, gradient_as_bucket_view=True)
    run.ema = make_ema(model, cfg.ema_decay) if cfg.ema else None  # after DDP's broadcast: the same on every rank
    if run.ema and ckpt:
        run.ema.module.load_state_dict(ckpt["ema"])
    if uses_compile(cfg, rt):
        run.runner = torch.compile(run.runner)
    if ckpt:
        restore_rank_state(run, ckpt)
    run.board = Board(out, cfg.tensorboard and rt.is_main, run.history, run.step)
    return run


def check_data(cfg: TrainConfig, rt: runtime.Runtime) -> tuple[dict, dict]:
    """The manifest (read once) and data identity, after the checks; warnings printed by rank 0."""
    def read() -> dict:
        manifest = rundata.read_manifest(cfg.data)
        for split in ("train", "val"):
            if manifest["splits"][split]["count"] == 0:
                raise FaceSenseError(f"{cfg.data}: the {split} split is empty")
        return manifest

    manifest = runtime.on_all_ranks(rt, read)
    warnings = runtime.on_all_ranks(rt, lambda: rundata.class_warnings(cfg.data, manifest))
    if rt.is_main:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
    # The shards must be the ones the manifest lists: then data_id records the data trained on.
    runtime.on_all_ranks(rt, lambda: (
        rundata.check_shards(cfg.data, manifest, "train", rt.rank, rt.world_size),
        rundata.check_shards(cfg.data, manifest, "val")))
    return manifest, {s: rundata.data_identity(cfg.data, manifest, s) for s in ("train", "val")}


def resume_mode(cfg: TrainConfig, restarted: bool) -> str:
    """--resume as given; a torchrun restart (its workers get the same arguments) implies auto."""
    return "auto" if cfg.resume == "no" and restarted else cfg.resume


def resume_from(cfg: TrainConfig, rt: runtime.Runtime, out: Path, manifest: dict, data_id: dict) -> dict | None:
    """The checkpoint to resume from (after checking it fits this run), or None for a new run.

    Rank 0 decides and every rank follows: each then loads the same last.pt, which must be on
    storage every node sees. A restart counts when any rank's agent restarted it: an agent whose
    workers were restarted because a peer failed keeps its own count at 0.
    """
    last = out / "last.pt"
    seen = runtime.gather_rank_states(rt, {"restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                                           "last": last.is_file(), "path": str(last)})
    sighted = [rank for rank, s in enumerate(seen) if s["last"]]
    blind = [rank for rank, s in enumerate(seen) if not s["last"]]
    if sighted and blind:  # some ranks see a last.pt that others do not: --out is not one storage
        b, s = seen[blind[0]], seen[sighted[0]]
        raise FaceSenseError(f"--out: rank {blind[0]} cannot see {b['path']}, the last.pt rank {sighted[0]} sees "
                             f"({s['path']} there); --out must be on storage every node sees (a shared file "
                             f"system)")
    mode = resume_mode(cfg, any(s["restarts"] > 0 for s in seen))
    resume = runtime.on_all_ranks(rt, lambda: wants_resume(mode, out, cfg.overwrite) if rt.is_main else None)
    if not runtime.broadcast(rt, resume):
        return None
    return runtime.on_all_ranks(rt, lambda: load_resumable(cfg, rt, out, manifest, data_id))


def wants_resume(mode: str, out: Path, overwrite: bool) -> bool:
    """Whether --out's last.pt is to be continued; refuses to start over a run it would replace."""
    last = out / "last.pt"
    if mode == "yes" and not last.is_file():
        raise FaceSenseError(f"--resume: {last} not found; nothing to resume (drop --resume to start a run)")
    if mode != "no" and last.is_file():
        return True
    found = existing_run(out)  # best.pt alone is a run too: a shipped model has no last.pt
    if found and mode == "no" and not overwrite:
        raise FaceSenseError(f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                             f"--overwrite to replace it, or another --out")
    if found and mode == "auto":
        raise FaceSenseError(f"{out} holds a run without last.pt ({', '.join(found)}); --resume auto never "
                             f"replaces one: choose another --out, or --overwrite to replace it")
    return False


def load_resumable(cfg: TrainConfig, rt: runtime.Runtime, out: Path, manifest: dict, data_id: dict) -> dict:
    last = out / "last.pt"
    if not last.is_file():
        raise FaceSenseError(f"--out {out}: rank {rt.rank} cannot see {last}, which rank 0 resumes from; --out "
                             f"must be on storage every node sees (a shared file system)")
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


def build_model(cfg: TrainConfig, rt: runtime.Runtime, num_classes: int, fresh: bool) -> nn.Module:
    """The network on the device, after checking its input size works and its training fits in memory."""
    net = create_model(cfg.model, cfg.channels, num_classes, cfg.drop_rate, cfg.drop_path_rate,
                       pretrained=cfg.pretrained and fresh, weights=cfg.weights if fresh else None,
                       zero_init=cfg.zero_init)
    net.to(rt.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    check_input_size(net, cfg.channels, cfg.img_size, cfg.model)
    memory.check_fits(net, cfg.channels, cfg.img_size, cfg.batch_size, cfg.amp, cfg.model, rt.device)
    return net


def make_criterion(cfg: TrainConfig, manifest: dict, device: torch.device) -> nn.Module:
    """Cross-entropy (class weights, label smoothing) of the logits against int64 (B,) labels or, with
    --soft-labels, against (B, K) probabilities (the normalised FER+ votes): torch's CrossEntropyLoss takes
    either, -sum_k w_k t_k log softmax(z)_k averaged over the batch, t smoothed towards uniform."""
    return nn.CrossEntropyLoss(weight=class_weights(cfg, manifest, device), label_smoothing=cfg.label_smoothing)


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """(B,) class indices of a batch's targets: the labels, or the most voted class of (B, K) distributions."""
    return targets.argmax(1) if targets.dim() == 2 else targets


def describe_loaders(train_loader, val_loader) -> None:
    """The loaders' own line on what lives where (resident, streamed, decoded by what), when they give one."""
    for loader in (train_loader, val_loader):
        describe = getattr(loader, "describe", None)
        if describe is not None:
            print(describe())


def uses_compile(cfg: TrainConfig, rt: runtime.Runtime) -> bool:
    return cfg.compile if cfg.compile is not None else rt.device.type == "cuda"


def open_loaders(cfg: TrainConfig, rt: runtime.Runtime, manifest: dict, dtype: torch.dtype):
    """(train loader over this rank's part, val loader). Every rank opens val too (small), so a bad val
    shard fails all ranks alike; rank 0 alone uses it. --cpu-augment picks the train loader's CPU engine;
    val (no augmentation, a last batch of another size) stays on the reference: nothing to recompile.
    Val always yields the majority labels (never --soft-labels): selection scores them, as eval does."""
    hard = dataclasses.replace(cfg, soft_labels=False)
    return runtime.on_all_ranks(rt, lambda: (
        rundata.open_split(cfg.data, "train", cfg, rt.device, train=True, batch_size=cfg.batch_size, dtype=dtype,
                           rank=rt.rank, world_size=rt.world_size, compile_cpu=cfg.cpu_augment == "compiled",
                           manifest=manifest),
        rundata.open_split(cfg.data, "val", hard, rt.device, train=False, batch_size=cfg.batch_size, dtype=dtype,
                           manifest=manifest)))


def clean_out(out: Path, overwrite: bool) -> None:
    """--out made, a killed run's temporaries removed, and with --overwrite the old run's outputs."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(TMP_GLOB):
        tmp.unlink(missing_ok=True)
    if overwrite:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)


def restore_training_state(run: Run, ckpt: dict) -> None:
    """Weights, optimiser, schedule, scaler and position from last.pt.

    Progress is samples seen. On another number of ranks a step takes another number of samples,
    so the step count and the position in the epoch are mapped to this world's steps (the
    schedule, whose length is counted in this world's steps, continues where it was).
    """
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.epoch, run.first, run.step, run.best = ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["best_accuracy"]
    run.history = [row for row in ckpt["history"] if row["epoch"] <= run.epoch]  # drops a partial epoch's row
    scale = len(ckpt["ranks"]) / run.rt.world_size
    if scale != 1:
        run.step = round(ckpt["step"] * scale)
        run.first = min(round(ckpt["batch"] * scale), run.steps_per_epoch - 1)  # the epoch's last batch stays
        run.scheduler.last_epoch = run.step


def restore_rank_state(run: Run, ckpt: dict) -> None:
    """This rank's RNG state and epoch sums; a checkpoint from another world size reseeds instead."""
    rt, cfg = run.rt, run.cfg
    own = ckpt["ranks"][rt.rank] if len(ckpt["ranks"]) == rt.world_size else None
    if own is None:
        runtime.seed_everything(cfg.seed + rt.rank + 7919 * ckpt["step"])
        if rt.is_main:  # the epoch's sums so far, all ranks' together, continue on rank 0
            old = ckpt["ranks"]
            run.epoch_loss.fill_(sum(r["epoch_loss_sum"] for r in old))
            run.epoch_correct.fill_(sum(r.get("epoch_correct_sum", 0) for r in old))
            run.epoch_batches = sum(r.get("epoch_batches", ckpt["batch"]) for r in old)
            print(f"note: {len(old)} ranks wrote this checkpoint, {rt.world_size} resume it: step {ckpt['step']} "
                  f"there is step {run.step} here (same samples seen); the run continues, but not bit-for-bit "
                  f"as it would have")
        return
    runtime.set_rng_state(own["rng"])
    run.epoch_loss.fill_(own["epoch_loss_sum"])
    run.epoch_correct.fill_(own.get("epoch_correct_sum", 0))  # checkpoint version 1 did not keep it
    run.epoch_batches = own.get("epoch_batches", ckpt["batch"])


# ------------------------------------------------------------------ the epoch: steps, logs, mid-epoch saves

def train_one_epoch(run: Run, bar: ProgressBar) -> EpochStats:
    """Steps from run.first to the epoch's end (or --max-steps). Only device work per step; the host
    syncs at log points (every --log-every steps), at --save-every checkpoints and at the end."""
    cfg = run.cfg
    run.train_loader.set_epoch(run.epoch, run.first)
    bar.new_epoch(run.epoch, run.steps_per_epoch, run.first)
    run.model.train()
    log = LogInterval(run, bar)
    start, steps, batch = time.perf_counter(), 0, run.first - 1
    log.data_wait.start()
    for batch, (images, targets) in enumerate(run.train_loader, start=run.first):
        log.data_wait.stop()
        loss, logits = train_step(run, images, targets)
        steps += 1
        log.add(loss)
        run.epoch_loss += loss
        run.epoch_correct += (logits.detach().argmax(1) == hard_labels(targets)).sum()  # on the device: no sync
        run.epoch_batches += 1
        bar.advance()
        last = batch + 1 >= run.steps_per_epoch or run.at_max_steps()
        save_now = bool(cfg.save_every) and run.step % cfg.save_every == 0 and not last
        if run.step % cfg.log_every == 0 or last or save_now:
            log.show()
        if save_now:
            save(run, (run.epoch, batch + 1), is_best=False)  # the loss was checked just above
        if last:
            break
        log.data_wait.start()
    return EpochStats(batch + 1, steps, time.perf_counter() - start, log.data_wait.seconds())


def train_step(run: Run, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward under the AMP context, backward, optimiser, schedule and EMA: (detached float loss, logits).
    targets: (B,) labels, or (B, K) vote distributions with --soft-labels."""
    with run.autocast:
        logits = run.runner(images)
        loss = run.criterion(logits, targets)
    run.scaler.scale(loss).backward()
    if run.cfg.grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    if run.ema:
        run.ema.update(run.model, run.step)
    run.step += 1
    return loss.detach().float(), logits


class LogInterval:
    """The steps since the last progress update: their loss (on the device), images/s, data wait."""

    def __init__(self, run: Run, bar: ProgressBar):
        self.run, self.bar = run, bar
        self.loss = torch.zeros((), device=run.rt.device)
        self.steps, self.since, self.wait_since = 0, time.perf_counter(), 0.0
        self.data_wait = runtime.DataWait(run.rt.device)

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def show(self) -> None:
        """The host sync: mean loss over ranks (checked finite), shown with images/s and the data-wait share."""
        run = self.run
        value = runtime.reduce_sum(run.rt, self.loss).item() / (self.steps * run.rt.world_size)
        check_finite(run, value, f"epoch {run.epoch + 1}, steps {run.step - self.steps + 1}-{run.step}")
        now, wait = time.perf_counter(), self.data_wait.seconds()
        ips = self.steps * run.cfg.batch_size * run.rt.world_size / (now - self.since)
        wait_share = (wait - self.wait_since) / (now - self.since)
        self.bar.show(value, ips, wait_share)
        run.board.interval(run.step, value, ips, wait_share)
        self.loss.zero_()
        self.steps, self.since, self.wait_since = 0, now, wait


def stopped(run: Run, what: str) -> NonFiniteLoss:
    kept = (f"{run.out / 'last.pt'} holds the last good state" if (run.out / "last.pt").exists()
            else "no checkpoint was written yet")
    return NonFiniteLoss(f"{what}; the run stopped. {kept}. Try a lower --lr, --grad-clip 1.0 "
                         f"or --amp-dtype bfloat16")


def check_finite(run: Run, value: float, where: str) -> None:
    if not math.isfinite(value):
        raise stopped(run, f"the loss became {value} ({where})")


# ------------------------------------------------------------------ the epoch's end: validate, log, save

def end_epoch(run: Run, stats: EpochStats, bar: ProgressBar) -> None:
    """Train loss and accuracy over ranks, val metrics (rank 0), metrics.jsonl, curves and checkpoints."""
    cfg, rt = run.cfg, run.rt
    # Sums over every batch of the epoch on every rank, including those before a resume (on however
    # many ranks they ran): one all-reduce.
    counts = torch.tensor(float(run.epoch_batches), device=rt.device)
    loss_sum, correct, batches = runtime.reduce_sum(rt, torch.stack([run.epoch_loss, run.epoch_correct,
                                                                     counts])).tolist()
    train_loss = loss_sum / batches
    check_finite(run, train_loss, f"epoch {run.epoch + 1}")
    # Accuracy on the augmented batches the model trained on (padding included under DDP):
    # next to val accuracy it shows over- or under-fitting at a glance.
    train_acc = correct / (batches * cfg.batch_size)
    position = (run.epoch + 1, 0) if stats.done >= run.steps_per_epoch else (run.epoch, stats.done)
    if position[1] == 0:
        run.epoch_loss.zero_()  # before the checkpoint: it resumes at the next epoch's start
        run.epoch_correct.zero_()
        run.epoch_batches = 0
    row = {"epoch": run.epoch + 1, "step": run.step, "steps_in_epoch": stats.done, "train_loss": train_loss,
           "train_accuracy": train_acc}
    metrics = runtime.on_all_ranks(rt, lambda: validate(run) if rt.is_main else None)  # a stop stops all
    is_best = False
    if rt.is_main:
        row |= {f"val_{k}": metrics[k] for k in ("accuracy", "auc_macro_ovr", "f1_weighted")}
        row |= {"lr": run.optimizer.param_groups[0]["lr"],
                "images_per_s": stats.steps * cfg.batch_size * rt.world_size / stats.seconds,
                "data_wait_share": stats.data_wait_s / stats.seconds, "epoch_time_s": stats.seconds}
        is_best = row["val_accuracy"] > run.best
        run.best = max(run.best, row["val_accuracy"])
        run.history.append(row)
    save(run, position, is_best)
    run.board.epoch(row)  # after last.pt: a resume cuts the curves back to what it holds
    if rt.is_main:
        write_logs(run.out, run.history)
        bar.print(epoch_line(row, cfg.epochs, is_best))
    run.epoch, run.first = position


def validate(run: Run) -> dict:
    """Val metrics (rank 0) of the EMA when kept; outputs gone to NaN/inf stop the run as a NaN loss does."""
    probs, labels = predict_probs(run.eval_model, run.val_loader, run.autocast)
    if not np.isfinite(probs).all():
        raise stopped(run, f"the model's outputs on val became non-finite (epoch {run.epoch + 1})")
    return compute_metrics(probs, labels, run.classes)


def epoch_line(row: dict, epochs: int, is_best: bool) -> str:
    auc = row["val_auc_macro_ovr"]
    return (f"epoch {row['epoch']}/{epochs}  step {row['step']}  train loss {row['train_loss']:.4f}  "
            f"train acc {row['train_accuracy']:.4f}  val acc {row['val_accuracy']:.4f}  "
            f"AUC {'-' if auc is None else f'{auc:.4f}'}  F1 {row['val_f1_weighted']:.4f}  "
            f"{row['images_per_s']:,.0f} img/s  data wait {row['data_wait_share']:.0%}"
            + ("  *best*" if is_best else ""))


def save(run: Run, position: tuple[int, int], is_best: bool) -> None:
    """Write last.pt (and best.pt); every rank takes part (their RNG states and sums are gathered)."""
    ranks = runtime.gather_rank_states(run.rt, {"rng": runtime.rng_state(), "epoch_loss_sum": float(run.epoch_loss),
                                                "epoch_correct_sum": float(run.epoch_correct),
                                                "epoch_batches": run.epoch_batches})
    if not run.rt.is_main:
        return
    payload = {"model": run.model.state_dict(), "ema": run.ema.module.state_dict() if run.ema else None,
               "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
               "scaler": run.scaler.state_dict(), "ranks": ranks, "epoch": position[0], "batch": position[1],
               "step": run.step, "best_accuracy": run.best, "history": run.history,
               "config": run.cfg.to_dict(), "classes": run.classes, "data": run.data_id, "source": run.source}
    save_checkpoint(run.out / "last.pt", payload)
    if is_best:
        save_checkpoint(run.out / "best.pt", selection_snapshot(payload))


def write_logs(out: Path, history: list[dict]) -> None:
    """metrics.jsonl (rewritten whole, so a resumed run never duplicates rows) and the curves."""
    from facesense.eval.plots import training_curves

    hint = f"{out / 'last.pt'} is saved: free space and rerun with --resume"
    try:
        write_bytes(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
        training_curves(history, out / "training_curves.png")
    except FaceSenseError as exc:  # last.pt is already written: --resume continues from it
        raise FaceSenseError(f"{exc}; {hint}") from exc
    except OSError as exc:
        raise FaceSenseError(f"cannot write {exc.filename or out} ({exc.strerror}); {hint}") from exc
