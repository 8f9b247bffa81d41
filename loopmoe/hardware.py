"""Spec sheets of the accelerators loopmoe knows, and the one MFU formula.

A ``SpecSheet`` holds a part's public numbers: dense (no 2:4 sparsity) matmul peaks per dtype, its
memory and memory bandwidth, and its links. They are read in two places:

- the trainer's MFU (``loopmoe.training.throughput``): the bf16 peak of the CUDA device it runs on,
  matched on ``torch.cuda.get_device_name()`` (``spec_for_cuda_name``);
- the planner's device profiles (``loopmoe.planning.hardware``), which add what a spec sheet does
  not say (achieved fractions of the peaks, launch overheads) to the parts it can plan for.

MFU (PaLM, appendix B) = model FLOPs per trained token x tokens/s / peak FLOP/s, where model FLOPs
per trained token are 3 x the forward FLOPs per token (forward + backward, which costs twice the
forward; ``loopmoe.budget`` counts the forward, attention scores over the full S x S matmuls).
Activation checkpointing's recomputation is not counted: it is hardware, not model, FLOPs. The
trainer and the planner both call ``model_flops_per_token`` and ``mfu``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecSheet:
    """One accelerator's datasheet numbers (None: not recorded here)."""

    name: str
    description: str
    bf16_flops: float  # dense bf16 tensor-core matmul peak, FLOP/s
    fp32_flops: float | None = None  # dense fp32 matmul peak, FLOP/s (TF32 on tensor cores where the part has it)
    memory_bytes: float | None = None  # device memory (HBM)
    memory_bandwidth: float | None = None  # device memory bytes/s
    intra_node_bandwidth: float | None = None  # bytes/s per device per direction inside a node (NVLink, HCCS)
    inter_node_bandwidth: float | None = None  # bytes/s per device across nodes (its share of the NICs)
    devices_per_node: int | None = None
    cuda_name: str | None = None  # substring of torch.cuda.get_device_name() that names this part
    sources: str = ""


SPECS: dict[str, SpecSheet] = {
    spec.name: spec
    for spec in (
        SpecSheet(
            name="h100-pcie",
            description="NVIDIA H100 PCIe 80GB",
            bf16_flops=756e12,
            cuda_name="H100 PCIe",
            sources="NVIDIA H100 Tensor Core GPU datasheet (PCIe)",
        ),
        SpecSheet(
            name="h100",
            description="NVIDIA H100 SXM 80GB, NVLink 4 (8 per node), 8x400 Gb/s InfiniBand per node",
            # H100 SXM datasheet (nvidia.com/en-us/data-center/h100): 989 TFLOP/s dense bf16 (1979 with
            # sparsity), 67 TFLOP/s fp32 (495 TF32 dense), 3.35 TB/s HBM3, 80 GB, NVLink 900 GB/s total
            # (450 GB/s per direction); ConnectX-7 400 Gb/s = 50 GB/s per GPU.
            bf16_flops=989e12,
            fp32_flops=495e12,  # fp32 matmuls run as TF32 on tensor cores
            memory_bytes=80e9,
            memory_bandwidth=3.35e12,
            intra_node_bandwidth=450e9,
            inter_node_bandwidth=50e9,
            devices_per_node=8,
            cuda_name="H100",
            sources="NVIDIA H100 Tensor Core GPU datasheet (SXM5); NVIDIA ConnectX-7 product brief",
        ),
        SpecSheet(
            name="h200",
            description="NVIDIA H200 SXM 141GB, NVLink 4 (8 per node), 8x400 Gb/s InfiniBand per node",
            # H200 datasheet (nvidia.com/en-us/data-center/h200): same compute as H100 SXM (989 TFLOP/s
            # dense bf16), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
            bf16_flops=989e12,
            fp32_flops=495e12,
            memory_bytes=141e9,
            memory_bandwidth=4.8e12,
            intra_node_bandwidth=450e9,
            inter_node_bandwidth=50e9,
            devices_per_node=8,
            cuda_name="H200",
            sources="NVIDIA H200 Tensor Core GPU datasheet; NVIDIA ConnectX-7 product brief",
        ),
        SpecSheet(name="h800", description="NVIDIA H800", bf16_flops=989e12, cuda_name="H800"),
        SpecSheet(name="gh200", description="NVIDIA GH200 Grace Hopper", bf16_flops=989e12, cuda_name="GH200"),
        SpecSheet(name="b200", description="NVIDIA B200", bf16_flops=2250e12, cuda_name="B200"),
        SpecSheet(
            name="a100",
            description="NVIDIA A100 SXM 80GB, NVLink 3 (8 per node), 8x200 Gb/s InfiniBand per node",
            # A100 datasheet (nvidia.com/en-us/data-center/a100): 312 TFLOP/s dense bf16, 156 TF32,
            # 80 GB HBM2e at 2.04 TB/s, NVLink 600 GB/s total (300 per direction); HDR 200 Gb/s = 25 GB/s.
            bf16_flops=312e12,
            fp32_flops=156e12,
            memory_bytes=80e9,
            memory_bandwidth=2.039e12,
            intra_node_bandwidth=300e9,
            inter_node_bandwidth=25e9,
            devices_per_node=8,
            cuda_name="A100",
            sources="NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB); NVIDIA ConnectX-6 HDR product brief",
        ),
        SpecSheet(name="a800", description="NVIDIA A800", bf16_flops=312e12, cuda_name="A800"),
        SpecSheet(name="l40s", description="NVIDIA L40S", bf16_flops=362e12, cuda_name="L40S"),
        SpecSheet(name="l4", description="NVIDIA L4", bf16_flops=121e12, cuda_name="L4"),
        SpecSheet(name="a10g", description="NVIDIA A10G", bf16_flops=70e12, cuda_name="A10G"),
        SpecSheet(name="rtx4090", description="NVIDIA GeForce RTX 4090", bf16_flops=165e12, cuda_name="RTX 4090"),
        SpecSheet(
            name="ascend910b",
            description="Huawei Ascend 910B-class NPU, 64 GB HBM, HCCS (8 per node), 200 Gb/s RoCE per NPU",
            # Huawei Ascend 910 / Atlas 800T A2 public specs (e.hihuawei.com Atlas 800T A2; Pangu Ultra MoE
            # report, arXiv 2505.04519, trains on Ascend 910-class NPUs): ~313 TFLOP/s fp16/bf16 dense per
            # NPU (Atlas 800T A2: 2.5 PFLOP/s fp16 for 8), 64 GB HBM2e at ~1.6 TB/s, HCCS 56 GB/s
            # per link x 7 links in a full mesh (~392 GB/s per NPU), 200 Gb/s RoCE = 25 GB/s per NPU.
            bf16_flops=313e12,
            fp32_flops=78e12,
            memory_bytes=64e9,
            memory_bandwidth=1.6e12,
            intra_node_bandwidth=392e9,
            inter_node_bandwidth=25e9,
            devices_per_node=8,
            sources="Huawei Atlas 800T A2 training server spec sheet; Pangu Ultra MoE (arXiv 2505.04519)",
        ),
    )
}


def spec_for_cuda_name(device_name: str) -> SpecSheet | None:
    """The spec sheet of the CUDA device called ``device_name`` (``torch.cuda.get_device_name()``), or
    None for a part not listed. Longer names are tried first: "H100 PCIe" before "H100"."""
    named = [s for s in SPECS.values() if s.cuda_name is not None]
    for spec in sorted(named, key=lambda s: len(s.cuda_name or ""), reverse=True):
        if spec.cuda_name and spec.cuda_name in device_name:
            return spec
    return None


def model_flops_per_token(forward_flops_per_token: float) -> float:
    """Model FLOPs of one trained token: 3 x its forward FLOPs (forward, and backward at twice the
    forward), recomputation not counted."""
    return 3.0 * forward_flops_per_token


def mfu(tokens_per_s: float, model_flops: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``tokens_per_s`` (over all devices) x ``model_flops`` per trained token
    (``model_flops_per_token``) / ``peak_flops``, the peak FLOP/s of all those devices together."""
    return tokens_per_s * model_flops / peak_flops
