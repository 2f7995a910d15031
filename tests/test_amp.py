"""AMP defaults and the data-wait clock (the CUDA halves run where a GPU is present)."""
from __future__ import annotations

import pytest
import torch

from facesense.core import runtime
from facesense.core.config import TrainConfig


def test_amp_default_is_on_for_cuda_off_for_cpu():
    assert TrainConfig().amp is None  # "not given": decided by the device
    assert runtime.amp_default(None, torch.device("cuda")) is True
    assert runtime.amp_default(None, torch.device("cpu")) is False
    assert runtime.amp_default(False, torch.device("cuda")) is False
    assert runtime.amp_default(True, torch.device("cpu")) is True


def test_amp_setup_dtypes_and_scaler_on_cpu():
    ctx, scaler, dtype = runtime.amp_setup(False, "bfloat16", torch.device("cpu"))
    assert dtype == torch.float32 and not scaler.is_enabled()
    ctx, scaler, dtype = runtime.amp_setup(True, "bfloat16", torch.device("cpu"))
    assert dtype == torch.bfloat16 and not scaler.is_enabled()
    with ctx:
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16


def test_gpu_without_native_bf16_falls_back_to_float16(monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    made = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: made.append((device, enabled)))
    ctx, scaler, dtype = runtime.amp_setup(True, "bfloat16", torch.device("cuda"))
    assert dtype == torch.float16 and made == [("cuda", True)]  # float16 gets loss scaling


def test_native_bf16_does_not_count_emulation(monkeypatch):
    seen = {}

    def supported(including_emulation=True):
        seen["including_emulation"] = including_emulation
        return including_emulation  # an "emulating" GPU: True only when emulation counts

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert runtime.native_bf16(torch.device("cuda")) is False and seen == {"including_emulation": False}
    assert runtime.native_bf16(torch.device("cpu")) is True


def test_data_wait_on_cpu_counts_only_the_bracketed_time(monkeypatch):
    clock = iter([10.0, 10.5, 20.0, 20.25])  # fetch 0.5 s, a step in between (not counted), fetch 0.25 s
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(clock))
    wait = runtime.DataWait(torch.device("cpu"))
    for _ in range(2):
        wait.start()
        wait.stop()
    assert wait.seconds() == 0.75


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_data_wait_on_cuda_sees_device_work():
    """A fetch that only enqueues device work reads ~0 on the host clock; the events see the work."""
    wait = runtime.DataWait(torch.device("cuda"))
    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    wait.start()
    for _ in range(20):
        x = x @ x / 4096  # "augmentation" that the host only launches
    wait.stop()
    assert wait.seconds() > 0.001


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_steps_with_default_amp_and_compile(tmp_path):
    """The GPU path of facesense train: resident loader + Triton, AMP on by default, torch.compile."""
    from typer.testing import CliRunner

    from facesense.cli import app
    from train_helpers import make_shards, train_args

    data = make_shards(tmp_path / "shards")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, train_args(data, out, "--device", "cuda", "--compile", "--max-steps", "4"))
    assert result.exit_code == 0, result.output
    config = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["config"]
    assert config["amp"] is True and config["compile"] is True
