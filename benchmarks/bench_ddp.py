"""DDP on this CPU: what a second process costs and gains, and what an elastic restart costs.

Run: .venv/bin/python -m benchmarks.bench_ddp --json benchmarks/results/ddp-cpu.json

1. Overhead (`overhead`): facesense train's step (model from facesense.core.model, AdamW from
   facesense.train.optim, cross-entropy, backward, step) on random batches already in memory, launched
   by torchrun on localhost (gloo), for each --models at --img-size / --batch-size per process:
   * 1 process x 1 thread, 1 process x 2 threads (no DDP wrapper: train does not wrap one process),
   * 2 processes x 1 thread each, the model in DistributedDataParallel as train wraps it.
   After --warmup steps, --repeats timed runs of --steps steps (all ranks start a repeat together after
   a barrier); the median repeat is reported. A repeat's total images/s counts every rank's batches over
   the slowest rank's time; per process is each rank's own batches over its own time (the mean over ranks).
2. Restart (`restart`): `facesense train` (the tiny model on --data, --resume auto, --save-every) under
   `torchrun --nproc_per_node 2 --max-restarts 1` (c10d rendezvous on 127.0.0.1); rank 1 SIGKILLs itself
   after --kill-after steps in the first attempt. Timestamps from inside the workers: the kill, the
   restarted worker's process start, its first batch (the run prepared and resumed) and its first step
   done. `restart_s` = kill -> first step after the restart; the parts say where it goes. A cold start
   (process start -> first step of the first attempt) is given beside it.
"""
from __future__ import annotations

import time

_STARTED = time.time()  # as early as possible: a restarted worker's start (before torch is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.env import ROOT, child_env, with_train_batch_hook, write_result  # noqa: E402

TINY = "test_efficientnet"  # the tests' ~100k-parameter timm EfficientNet
CONFIGS = ((1, 1), (1, 2), (2, 1))  # (processes, threads per process)


# ------------------------------------------------------------------ 1. overhead: the synthetic step per rank

def step_worker(model_name: str, img_size: int, batch_size: int, steps: int, warmup: int, repeats: int,
                threads: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from facesense.core.config import TrainConfig
    from facesense.core.model import create_model
    from facesense.train.optim import make_optimizer

    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = create_model(model_name, 1, 7).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, TrainConfig(model=model_name), device)
    runner = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True) if world > 1 else model
    images = torch.randn(batch_size, 1, img_size, img_size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 7, (batch_size,))

    def step():
        loss = F.cross_entropy(runner(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append(time.perf_counter() - start)
    every = [None] * world
    if world > 1:
        dist.all_gather_object(every, times)
        dist.destroy_process_group()
    else:
        every = [times]
    if rank == 0:
        out.write_text(json.dumps({"times": every}))


def overhead(model_name: str, procs: int, threads: int, img_size: int, batch_size: int, steps: int, warmup: int,
             repeats: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "benchmarks.bench_ddp", "--step-worker", model_name, "--img-size", str(img_size),
               "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", str(warmup),
               "--repeats", str(repeats), "--threads", str(threads), "--out", str(out)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**child_env(), "OMP_NUM_THREADS": str(threads)},
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        every = json.loads(out.read_text())["times"]  # [rank][repeat] seconds
    images = steps * batch_size
    totals = [procs * images / max(rank[r] for rank in every) for r in range(repeats)]
    per_process = [statistics.mean(images / rank[r] for rank in every) for r in range(repeats)]
    pick = sorted(range(repeats), key=lambda r: totals[r])[repeats // 2]  # the median repeat
    row = {"model": model_name, "processes": procs, "threads_per_process": threads, "img_size": img_size,
           "batch_size_per_process": batch_size, "steps": steps, "ddp": procs > 1,
           "images_per_s_total": totals[pick], "images_per_s_per_process": per_process[pick],
           "all_images_per_s_total": totals, "wall_s": time.perf_counter() - start}
    print(f"{model_name:18s} {procs} proc x {threads} thread  {row['images_per_s_total']:8.1f} img/s total  "
          f"{row['images_per_s_per_process']:8.1f} per process", flush=True)
    return row


# ------------------------------------------------------------------ 2. restart: timestamps from inside facesense train

def train_worker(args: list[str]) -> None:
    """`facesense ARGS` with timestamps: each batch the training loader is asked for, appended to
    BENCH_TIMES/attempt<A>-rank<R>.jsonl; rank BENCH_KILL_RANK SIGKILLs itself when asked for batch
    BENCH_KILL_AFTER + 1 in the first attempt."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    rank = os.environ.get("RANK", "0")
    log = Path(os.environ["BENCH_TIMES"]) / f"attempt{attempt}-rank{rank}.jsonl"

    def note(event: str, **extra) -> None:
        with open(log, "a") as f:
            f.write(json.dumps({"event": event, "t": time.time(), **extra}) + "\n")

    note("start", t_process=_STARTED)
    kill_after = int(os.environ.get("BENCH_KILL_AFTER", "0"))
    kill = attempt == "0" and rank == os.environ.get("BENCH_KILL_RANK", "1") and kill_after > 0
    import pipeline.loaders as loaders

    def on_batch(loader, n, images, labels):
        if kill and n > kill_after:
            note("kill", batch=n)
            os.kill(os.getpid(), signal.SIGKILL)
        note("batch", batch=n)
        return images, labels

    loaders.make_loader = with_train_batch_hook(loaders.make_loader, on_batch)
    from facesense.cli import main

    sys.argv = ["facesense", *args]
    main()


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restart(data: Path, batch_size: int, kill_after: int, save_every: int, max_steps: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        times = Path(tmp) / "times"
        times.mkdir()
        out = Path(tmp) / "run"
        train = ["train", "--data", str(data), "--out", str(out), "--model", TINY, "--epochs", "1",
                 "--max-steps", str(max_steps), "--batch-size", str(batch_size), "--device", "cpu",
                 "--loader", "resident", "--workers", "0", "--cpu-augment", "reference", "--log-every", "5",
                 "--resume", "auto", "--save-every", str(save_every)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--max-restarts", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
               "--rdzv_id", "bench", "-m", "benchmarks.bench_ddp", "--train-worker", *train]
        # A rendezvous store of its own per round (torch 2.14's shared one keeps the previous attempt's
        # gloo addresses: a restart can fail with "Connection refused"; see README, Distributed).
        env = {**child_env(), "BENCH_TIMES": str(times), "BENCH_KILL_AFTER": str(kill_after),
               "BENCH_KILL_RANK": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        first, second = _events(times / "attempt0-rank0.jsonl"), _events(times / "attempt1-rank0.jsonl")
        killed = _events(times / "attempt0-rank1.jsonl")
        if not second:
            raise RuntimeError("no second attempt: the worker was not restarted\n" + proc.stderr[-3000:])
    t_kill = next(e["t"] for e in killed if e["event"] == "kill")
    batches = [e for e in second if e["event"] == "batch"]
    t_start = second[0]["t_process"]
    t_first_batch, t_first_step = batches[0]["t"], batches[1]["t"]  # batch 2 asked: step 1 done
    cold = [e for e in first if e["event"] == "batch"]
    last_saved = kill_after // save_every * save_every
    row = {"model": TINY, "processes": 2, "batch_size_per_process": batch_size, "kill_after_steps": kill_after,
           "save_every": save_every, "steps_redone": kill_after - last_saved,
           "restart_s": t_first_step - t_kill,
           "kill_to_restarted_process_s": t_start - t_kill,
           "process_start_to_first_batch_s": t_first_batch - t_start,
           "first_step_s": t_first_step - t_first_batch,
           "cold_start_to_first_step_s": cold[1]["t"] - first[0]["t_process"],
           "job_wall_s": wall}
    print(f"restart: {row['restart_s']:.1f} s from the kill to the first step after it "
          f"(restart+rendezvous {row['kill_to_restarted_process_s']:.1f} s, start-up and resume "
          f"{row['process_start_to_first_batch_s']:.1f} s, first step {row['first_step_s']:.2f} s); "
          f"a cold start {row['cold_start_to_first_step_s']:.1f} s", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train-worker"]:
        return train_worker(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ddp", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--models", default=f"{TINY},efficientnet_b0")
    parser.add_argument("--img-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64, help="images per step per process")
    parser.add_argument("--steps", default="20,4", help="timed steps per repeat, one per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "shards", help="shards for the restart")
    parser.add_argument("--kill-after", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--skip-restart", action="store_true")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per torchrun launch")
    # The per-rank worker of part 1 (launched by torchrun).
    parser.add_argument("--step-worker", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step_worker:
        return step_worker(args.step_worker, args.img_size, args.batch_size, int(args.steps), args.warmup,
                           args.repeats, args.threads, args.out)
    load_before = os.getloadavg()  # the machine may be shared: how busy it was
    models = args.models.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    steps += [steps[-1]] * (len(models) - len(steps))
    rows = [overhead(model, procs, threads, args.img_size, args.batch_size, n, args.warmup, args.repeats,
                     args.timeout)
            for model, n in zip(models, steps) for procs, threads in CONFIGS]
    summary = {}
    for model in models:
        by = {(r["processes"], r["threads_per_process"]): r for r in rows if r["model"] == model}
        one, two = by[(1, 1)], by[(2, 1)]
        summary[model] = {
            # what each process keeps of its lone speed when it has a DDP peer (1.0: no overhead)
            "per_process_kept": two["images_per_s_per_process"] / one["images_per_s_per_process"],
            "speedup_2proc_vs_1proc_1thread": two["images_per_s_total"] / one["images_per_s_total"],
            "speedup_2proc_vs_1proc_2threads": two["images_per_s_total"] / by[(1, 2)]["images_per_s_total"]}
    payload = {"benchmark": "ddp", "overhead": rows, "summary": summary}
    if not args.skip_restart:
        payload["restart"] = restart(args.data, args.batch_size, args.kill_after, args.save_every,
                                     args.kill_after + 6, args.timeout)
    payload["loadavg_1_5_15_before"] = load_before
    payload["loadavg_1_5_15_after"] = os.getloadavg()
    payload["torch"] = __import__("torch").__version__
    payload["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()
    if args.json:
        write_result(args.json, payload)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
