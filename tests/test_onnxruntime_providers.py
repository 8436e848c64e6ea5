"""The onnxruntime backend's execution providers: chosen per --device, refused clearly where the installed
onnxruntime build lacks them (checked with the CPU build; onnxruntime-gpu is not installed here)."""
from __future__ import annotations

import pytest

from sadtalker_rt.errors import EnvironmentProblem, UsageError
from sadtalker_rt.runtime.backends.onnxruntime_backend import _providers, grid_sample_note, providers_for

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_providers_per_device_on_a_gpu_build():
    assert providers_for("cpu", GPU_BUILD) == ["CPUExecutionProvider"]
    assert providers_for("cuda", GPU_BUILD) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("tensorrt", GPU_BUILD) == GPU_BUILD
    with pytest.raises(EnvironmentProblem, match="needs onnxruntime's TensorrtExecutionProvider, which"):
        providers_for("tensorrt", GPU_BUILD[1:])


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_the_cpu_build_refuses_gpu_devices_in_one_sentence(device):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime is a GPU build")
    assert _providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(EnvironmentProblem) as err:
        _providers(device)
    message = str(err.value)
    assert f"--device {device} needs onnxruntime's" in message and "CUDAExecutionProvider" in message
    assert "pip install 'sadtalker-rt[gpu]'" in message and err.value.exit_code == 5 and "\n" not in message


def test_unknown_device_is_a_usage_error():
    with pytest.raises(UsageError, match="--device must be one of cpu, cuda, tensorrt"):
        providers_for("gpu", GPU_BUILD)


def test_grid_sample_note_before_onnxruntime_gpu_1_25():
    assert "on the CPU" in grid_sample_note("1.24.2", "cuda")
    assert grid_sample_note("1.25.0", "cuda") is None and grid_sample_note("1.17.0", "cpu") is None
