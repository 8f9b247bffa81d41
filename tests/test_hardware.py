"""The spec sheets (``loopmoe.hardware``): one home for the numbers, read by the trainer's MFU and by the
planner, and one MFU formula."""

import pytest
import torch

from loopmoe import hardware
from loopmoe.hardware import SPECS, mfu, model_flops_per_token, spec_for_cuda_name
from loopmoe.planning.cost import plan_step
from loopmoe.planning.hardware import PROFILES
from loopmoe.planning.layout import Layout
from loopmoe.presets import get_preset
from loopmoe.training.throughput import Throughput, peak_flops_per_s


@pytest.mark.parametrize(
    ("device_name", "spec"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),  # the longer name wins
        ("NVIDIA GH200 480GB", "gh200"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
    ],
)
def test_cuda_names_find_their_spec_sheet(device_name, spec):
    assert spec_for_cuda_name(device_name) is SPECS[spec]


def test_an_unknown_gpu_has_no_spec_sheet():
    assert spec_for_cuda_name("Some Future GPU") is None


def test_the_trainer_reads_the_spec_sheet(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops_per_s(torch.device("cuda"), None) == SPECS["h100"].bf16_flops == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops_per_s(torch.device("cuda"), None) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops_per_s(torch.device("cuda"), None) is None
    assert peak_flops_per_s(torch.device("cuda"), 100.0) == 100e12  # configured: wins over the sheet


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_the_planner_reads_the_spec_sheet(name):
    hw, spec = PROFILES[name], SPECS[name]
    assert hw.matmul_flops == {"bf16": spec.bf16_flops, "fp32": spec.fp32_flops}
    assert hw.memory_bandwidth == spec.memory_bandwidth
    assert spec.memory_bytes is not None and hw.memory_bytes < spec.memory_bytes  # usable: the driver's share off
    assert spec.intra_node_bandwidth is not None and hw.intra_node_bandwidth < spec.intra_node_bandwidth
    assert hw.devices_per_node == spec.devices_per_node
    assert hw.description == spec.description and hw.sources == spec.sources


def test_one_mfu_formula_for_the_trainer_and_the_planner(monkeypatch):
    assert model_flops_per_token(100) == 300  # forward + backward at twice the forward
    assert mfu(1000.0, 300.0, 1e6) == pytest.approx(0.3)
    calls = []
    real = hardware.mfu
    monkeypatch.setattr(hardware, "mfu", lambda *a: calls.append(a) or real(*a))
    cfg = get_preset("debug")
    plan = plan_step(cfg, Layout(devices=2, micro_batch=2, seq_len=64), PROFILES["a100"])
    assert calls[-1] == (plan.tokens_per_s, 3.0 * plan.flops_per_token, 2 * PROFILES["a100"].peak("fp32"))
    meter = Throughput(0, 10, flops_per_token=300.0, peak_flops=1e6, world_size=2)
    assert meter.mfu(1000.0) == real(1000.0, 300.0, 2e6)
    assert calls[-1] == (1000.0, 300.0, 2e6)
