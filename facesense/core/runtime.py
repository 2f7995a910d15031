"""Where a run executes: device, DDP process group, seeding, AMP context, RNG states."""
from __future__ import annotations

import os
import time
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from facesense.core.errors import FaceSenseError


@dataclass
class Runtime:
    """This process's place in the run."""

    device: torch.device
    rank: int = 0  # global DDP rank
    world_size: int = 1  # number of DDP ranks
    distributed: bool = False  # a process group is initialised (torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str, deterministic: bool) -> Runtime:
    """Pick the device and, under torchrun, join the process group (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FaceSenseError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        dev = torch.device("cuda", local_rank if world_size > 1 else (torch.device(device).index or 0))
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise FaceSenseError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if world_size == 1:
        return Runtime(dev)
    if not dist.is_initialized():
        join_process_group(dev)
    return Runtime(dev, dist.get_rank(), dist.get_world_size(), True)


def join_process_group(dev: torch.device) -> None:
    """init_process_group (NCCL on GPU, gloo on CPU); a failure (a store that never answers, a port in
    use, a broken link) is one line naming this rank and where it tried to meet the others."""
    try:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    except Exception as exc:  # DistError, RuntimeError, ValueError: the backends raise them all
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FaceSenseError(f"rank {os.environ.get('RANK', '?')}: cannot join the other ranks at {where} "
                             f"({type(exc).__name__}: {message})") from exc


def teardown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed torch, and Python's and numpy's global generators for any library that draws from them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CPU and every CUDA device


def amp_default(enabled: bool | None, device: torch.device) -> bool:
    """--amp/--no-amp as given, else on for CUDA (the target) and off on CPU (slower there)."""
    return device.type == "cuda" if enabled is None else enabled


def native_bf16(device: torch.device) -> bool:
    """bfloat16 in hardware: always on CPU; on CUDA not emulated (pre-Ampere GPUs emulate it, slowly)."""
    if device.type != "cuda":
        return True
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch without the keyword: it did not count emulation then
        return torch.cuda.is_bf16_supported()


def amp_setup(enabled: bool, dtype_name: str, device: torch.device):
    """(autocast context, GradScaler, batch dtype). AMP as an object: the loop never branches on it.

    bfloat16 needs no loss scaling; GPUs without native bfloat16 fall back to float16. float16
    gets a GradScaler (a no-op scaler when disabled, so the loop is the same either way).
    """
    if not enabled:
        return nullcontext(), torch.amp.GradScaler(device.type, enabled=False), torch.float32
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float16
    if dtype == torch.bfloat16 and not native_bf16(device):
        print(f"note: {torch.cuda.get_device_name(device)} has no native bfloat16; using float16 with a GradScaler")
        dtype = torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return torch.autocast(device.type, dtype=dtype), scaler, dtype


class DataWait:
    """Seconds the training loop spends waiting for batches, summed; read only where the loop syncs anyway.

    On CPU the host clock is the truth. On CUDA the host only enqueues work and returns at once, so
    host time reads ~0 however slow the data is; there a pair of CUDA events brackets each fetch on
    the compute stream, and the device time between them (augmentation kernels, copies, DALI's
    stream hand-over, or the device idling while the host produces the batch) is the wait.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.total, self._since, self._pending = 0.0, 0.0, []

    def start(self) -> None:
        if self.cuda:
            self._since = torch.cuda.Event(enable_timing=True)
            self._since.record()
        else:
            self._since = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._since, end))
        else:
            self.total += time.perf_counter() - self._since

    def seconds(self) -> float:
        """The total so far (on CUDA this waits for the recorded events: call it at sync points)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self.total += sum(a.elapsed_time(b) for a, b in self._pending) / 1000
            self._pending.clear()
        return self.total


def on_all_ranks(rt: Runtime, fn):
    """fn() on every rank; if it fails on any rank it fails on all, so none waits forever in a collective."""
    if not rt.distributed:
        return fn()
    try:
        result, error = fn(), None
    except Exception as exc:
        result, error = exc, str(exc) if isinstance(exc, FaceSenseError) else f"{type(exc).__name__}: {exc}"
    errors: list = [None] * rt.world_size
    dist.all_gather_object(errors, error)
    if error:
        raise result
    failed = [(rank, e) for rank, e in enumerate(errors) if e]
    if failed:
        raise FaceSenseError(f"rank {failed[0][0]}: {failed[0][1]}")
    return result


def broadcast(rt: Runtime, value):
    """Rank 0's `value` (any picklable object), on every rank."""
    if not rt.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def reduce_sum(rt: Runtime, value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; the input is left alone)."""
    value = value.detach().clone()
    if rt.distributed:
        dist.all_reduce(value)
    return value


# Checkpoints keep torch's generators only: every random draw in training (weights,
# dropout, the loaders' augmentation parameters) comes from torch or from a
# SeedSequence derived from (seed, epoch, rank); nothing draws from numpy's or
# Python's global generators, and the resume test would show it if something did.

def rng_state() -> dict:
    """torch's CPU state and the current CUDA device's (each rank owns one GPU; get_rng_state_all
    would touch them all), as tensors, so checkpoints load with weights_only=True."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rank_states(rt: Runtime, state: dict) -> list[dict]:
    """Every rank's `state` (plain values and CPU tensors), in rank order, on every rank."""
    if not rt.distributed:
        return [state]
    states: list = [None] * rt.world_size
    dist.all_gather_object(states, state)
    return states
