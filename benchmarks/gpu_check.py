"""The whole GPU proof in one unattended, time-boxed run.

    python -m benchmarks.gpu_check --data SHARDS --out DIR [--smoke] [--budget-s 540]
    make gpu-check DATA=SHARDS OUT=DIR

Runs eight parts, each in its own process under its own time box (benchmarks/gpu_parts.py),
so one failing or hanging part never loses the others and the whole run ends within
--budget-s: `tests` (the CUDA tests), `augment` (Triton vs reference), `loader`
(resident / dali / dataloader), `train` (synthetic ceiling vs end to end, compiled, AMP),
`decode` (JPEG decode images/s at 224 px: torchvision nvJPEG, DALI mixed where installed),
`stream` (encoded colour shards end to end vs the ceiling at 112 and 224 px; decode and
stream are GPU-only: skipped with the reason on a CPU and in --smoke), `accuracy`
(recipes/gpu.toml on the real data, selected on val, evaluated on val and on test where the
shards have it) and `ddp` (the synthetic step through torchrun on 1 GPU
and on all of them at 112 and 224 px, scaling efficiency; skipped, taking no time, with
fewer than two GPUs). `--smoke` runs the same code on a CPU with tiny sizes (a test runs
it, so the script cannot rot).

Writes at most 8 files into --out, each small enough to collect from a remote machine:
summary.md (the table a person reads), gpu.json (env + one entry per part, each with
`status`: ok, skipped with a reason, or failed with the error's last lines), tests.log,
and the accuracy run's best.pt (fp16 eval weights when eval agrees), metrics.jsonl and
report.json. gpu.json and summary.md are rewritten after every part, so a run killed
from outside still leaves what it finished.

Needs torch (+CUDA), triton, timm, h5py, typer, rich, scikit-learn and matplotlib; runs
from the source tree (PYTHONPATH=.) with no install step; DALI is used when importable.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

from benchmarks import gpu_parts
from benchmarks.env import ROOT, child_env, environment

PARTS = tuple(gpu_parts.PARTS)  # tests, augment, loader, train, decode, stream, accuracy, ddp: the order they run in
# Each part's share of the budget; accuracy (REST) gets whatever the others leave, less the parts after it
# (at least its share). Sized for one H100 at the default 540 s: train holds three EfficientNet-B0
# compiles (48/112/224 px), accuracy a ~5 minute recipes/gpu.toml run plus its evaluations. ddp's share
# is kept back only with two GPUs or more (four eager torchrun launches); with fewer it is skipped at once
# and the other parts' boxes are what they are without it. decode (4,096 JPEGs at 224 px, a few passes per
# decoder) and stream (an 8k-image encoded colour pack, eager B0 at 112 and 224 px) take 0.13 from accuracy.
SHARES = {"tests": 0.10, "augment": 0.06, "loader": 0.08, "train": 0.22, "decode": 0.04, "stream": 0.09,
          "accuracy": 0.41, "ddp": 0.20}
REST = "accuracy"
MAX_FILE_BYTES = 16 * 2**20


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_part(name: str, settings: dict, scratch: Path, box_s: float) -> dict:
    """One part in its own process, killed at box_s; its result, or a failed entry with the output's tail."""
    part_dir = scratch / name
    part_dir.mkdir(parents=True, exist_ok=True)
    settings_path, result_path = part_dir / "settings.json", part_dir / "result.json"
    settings_path.write_text(json.dumps({**settings, "scratch": str(part_dir), "deadline_s": box_s}))
    start = time.perf_counter()
    # Its own session, so the time box ends the part and everything it started (pytest, a training run).
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_parts", name, str(settings_path),
                             str(result_path)], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=box_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        # What the part finished before the box closed (sizes already measured) is kept, marked partial.
        partial = json.loads(result_path.read_text()) if result_path.is_file() else {}
        return {**partial, "status": "failed", "error": f"timed out after {box_s:.0f} s\n{_tail(output or '')}",
                "seconds": time.perf_counter() - start}
    code = proc.returncode
    seconds = time.perf_counter() - start
    (part_dir / "output.log").write_text(output)
    if code != 0 or not result_path.is_file():
        return {"status": "failed", "error": f"exit code {code}\n{_tail(output)}", "seconds": seconds}
    return {**json.loads(result_path.read_text()), "seconds": seconds}


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def summary_markdown(report: dict) -> str:
    """The page a person reads: environment, one line per part, then the figures against their targets."""
    env = report["env"]
    machine = env.get("machine", {})
    lines = [f"# FaceSense GPU check{' (smoke, CPU)' if report['smoke'] else ''}", "",
             f"GPU {machine.get('gpu') or 'none'} (driver {machine.get('gpu_driver') or '-'}, CUDA "
             f"{machine.get('cuda') or '-'}); torch {env['versions'].get('torch')}, triton "
             f"{env['versions'].get('triton')}, DALI {env['versions'].get('nvidia-dali-cuda130') or 'not installed'}, "
             f"timm {env['versions'].get('timm')}; commit {env.get('git_commit', '-')[:12]}"
             f"{' (dirty)' if env.get('git_dirty') else ''}; budget {report['budget_s']:.0f} s, "
             f"took {report['total_s']:.0f} s.", "",
             "| part | status | seconds | note |", "|---|---|---|---|"]
    for name in PARTS:
        part = report.get(name, {"status": "not run"})
        note = part.get("error") or part.get("reason") or "; ".join(part.get("notes", []))
        note = (note or "").splitlines()[0][:120] if note else ""
        lines.append(f"| {name} | {part['status']} | {_fmt(part.get('seconds'))} | {note} |")
    lines += ["", "| figure | value | target | met |", "|---|---|---|---|"]

    def target_row(label: str, target: dict | None, digits: int = 0):
        if target:
            lines.append(f"| {label} | {_fmt(target['value'], digits)} | {_fmt(target['target'], digits)} | "
                         f"{'yes' if target['met'] else 'NO'} |")

    target_row("Triton augmentation, 224 px fp16 (img/s)", report.get("augment", {}).get("target_triton_224_fp16"))
    train = report.get("train", {})
    for key, target in train.get("targets", {}).items():
        if key == "end_to_end_over_ceiling":
            for size, t in target.items():
                target_row(f"end to end / ceiling, {size} px (resident)", t, 3)
        else:
            target_row(f"{key.replace('_', ' ')} (end to end)", target, 1)
    for size, seconds in train.get("warmup_incl_compile_s", {}).items():
        lines.append(f"| compile + warm-up, {size} px (s) | {seconds:.1f} | - | - |")
    decode = report.get("decode", {})
    for row in decode.get("results", []):
        if "images_per_s" in row:
            vs = row.get("vs_pillow")
            lines.append(f"| decode {decode['size']} px JPEGs, {row['decoder']} (img/s) | {row['images_per_s']:,.0f} | "
                         f"- | {'-' if not vs else 'max diff vs Pillow ' + str(vs['max_abs_diff'])} |")
    for size, by_loader in report.get("stream", {}).get("targets", {}).items():
        for loader, t in by_loader.items():
            target_row(f"encoded shards end to end / ceiling, {size} px ({loader})", t, 3)
    acc = report.get("accuracy", {})
    target_row("val accuracy, recipes/gpu.toml, no TTA", acc.get("target_val_accuracy"), 4)
    if acc.get("status") == "ok":
        lines.append(f"| val accuracy with --tta crops | {acc['val_tta_crops']['accuracy']:.4f} | - | - |")
        if acc.get("test"):
            lines.append(f"| test (PrivateTest) accuracy, no TTA | {acc['test']['accuracy']:.4f} | - | - |")
        lines.append(f"| training: epochs done / seconds{' (time box reached)' if acc['time_boxed'] else ''} | "
                     f"{acc['epochs_done']} / {acc['training_s']:.0f} | - | - |")
    ddp = report.get("ddp", {})
    for row in ddp.get("results", []):
        lines.append(f"| DDP synthetic step, {row['size']} px, {row['gpus']} GPU(s): img/s (per GPU) | "
                     f"{row['images_per_s']:,.0f} ({row['images_per_s_per_gpu']:,.0f}) | - | - |")
    for size, efficiency in ddp.get("scaling_efficiency", {}).items():
        lines.append(f"| DDP scaling efficiency, {size} px, 1 -> {ddp['gpus']} GPUs | {efficiency:.3f} | - | - |")
    return "\n".join(lines) + "\n"


def time_box(name: str, left: float, budget_s: float, shares: dict) -> float:
    """Seconds part `name` may take with `left` of the budget: its share, and never what the parts after it
    are owed; REST takes all of that."""
    later = sum(shares[p] for p in PARTS[PARTS.index(name) + 1:]) * budget_s
    return left - later if name == REST else min(shares[name] * budget_s, left - later)


def check(data: Path, out: Path, smoke: bool, budget_s: float) -> dict:
    if not (data / "manifest.json").is_file():
        raise typer.BadParameter(f"{data}: no manifest.json; pack the data first: facesense pack SRC --out {data}",
                                 param_hint="--data")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = start + budget_s
    report = {"env": environment(), "smoke": smoke, "budget_s": budget_s, "data": str(data.resolve())}
    settings = {"data": str(data.resolve()), "smoke": smoke}

    def save() -> None:
        report["total_s"] = time.perf_counter() - start
        (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (out / "summary.md").write_text(summary_markdown(report))

    ddp_skipped = gpu_parts.ddp_skipped(0 if smoke else gpu_parts.cuda_devices())  # smoke: a CPU run
    shares = {**SHARES, "ddp": 0.0 if ddp_skipped else SHARES["ddp"]}
    with tempfile.TemporaryDirectory(prefix="facesense-gpu-check-") as tmp:
        scratch = Path(tmp)
        for name in PARTS:
            box = time_box(name, deadline - time.perf_counter(), budget_s, shares)
            if name == "ddp" and ddp_skipped:
                report[name] = ddp_skipped
                print(f"gpu check: {name} skipped: {report[name]['reason']}", flush=True)
            elif box < 10:
                report[name] = {"status": "skipped", "reason": f"no time left in the {budget_s:.0f} s budget"}
            else:
                print(f"gpu check: {name} (time box {box:.0f} s)", flush=True)
                report[name] = run_part(name, settings, scratch, box)
                print(f"gpu check: {name} {report[name]['status']} in {report[name].get('seconds', 0):.0f} s",
                      flush=True)
            if name == "tests" and (scratch / name / "tests.log").is_file():
                shutil.copyfile(scratch / name / "tests.log", out / "tests.log")
            if name == "accuracy" and report[name].get("status") == "ok":
                for target, source in report[name].pop("files").items():
                    if Path(source).stat().st_size <= MAX_FILE_BYTES:
                        shutil.copyfile(source, out / target)
                    else:
                        report[name].setdefault("notes", []).append(f"{target} not copied: over 16 MiB")
            save()
    return report


def main(
    data: Path = typer.Option(..., "--data", help="Packed shards (facesense pack): train, val (and test if present)."),
    out: Path = typer.Option(..., "--out", help="Where the (at most 8) result files go."),
    smoke: bool = typer.Option(False, "--smoke", help="Same code path on CPU with tiny sizes and steps (minutes)."),
    budget_s: float = typer.Option(540.0, "--budget-s", help="Seconds the whole check may take; each part is boxed."),
) -> None:
    """Prove every GPU path in one unattended run: CUDA tests, augment/loader/train throughput, GPU decode and
    encoded shards end to end, accuracy, DDP."""
    report = check(data, out, smoke, budget_s)
    print((out / "summary.md").read_text())
    failed = [name for name in PARTS if report[name]["status"] == "failed"]
    if failed:
        typer.echo(f"gpu check: failed parts: {', '.join(failed)} (see {out / 'gpu.json'})", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
