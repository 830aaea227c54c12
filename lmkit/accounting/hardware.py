"""Dense peak FLOP/s and board power of common accelerators, and which one this process runs on.

Peaks are the vendors' dense figures (NVIDIA's datasheets print "with sparsity" numbers,
twice these, next to them); TF32 is the tensor-core rate for fp32 matmuls with TF32
allowed, FP32 the non-tensor rate. Power is the board's maximum (TDP/TGP), the figure an
energy estimate without a meter multiplies by time. The CPU has no entry: its peak depends on
cores, clocks and vector units, so MFU is not reported there.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lmkit.errors import ConfigError, did_you_mean

PRECISIONS = ("bf16", "fp16", "tf32", "fp32")


@dataclass(frozen=True)
class Accelerator:
    """One accelerator model: dense peak FLOP/s per precision (None = not supported) and board power."""

    key: str
    name: str
    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float | None
    power_w: float

    def peak(self, precision: str) -> float | None:
        """Dense peak FLOP/s for ``precision`` (one of :data:`PRECISIONS`), None where unsupported."""
        return getattr(self, precision)


T = 1e12
ACCELERATORS = {a.key: a for a in (
    # NVIDIA A100 datasheet (2021): BF16/FP16 312, TF32 156, FP32 19.5 TFLOPS; SXM 400 W, PCIe 80GB 300 W
    Accelerator("a100_40gb_sxm", "A100 40GB SXM", 312 * T, 312 * T, 156 * T, 19.5 * T, 400),
    Accelerator("a100_80gb_sxm", "A100 80GB SXM", 312 * T, 312 * T, 156 * T, 19.5 * T, 400),
    Accelerator("a100_80gb_pcie", "A100 80GB PCIe", 312 * T, 312 * T, 156 * T, 19.5 * T, 300),
    # NVIDIA H100 datasheet (2023): SXM BF16/FP16 989.4 (1,979 sparse), TF32 494.7, FP32 66.9 TFLOPS, up to 700 W;
    # PCIe BF16/FP16 756 (1,513 sparse), TF32 378, FP32 51.2 TFLOPS, 350 W (H100 PCIe product brief PB-11133)
    Accelerator("h100_sxm", "H100 SXM", 989.4 * T, 989.4 * T, 494.7 * T, 66.9 * T, 700),
    Accelerator("h100_pcie", "H100 PCIe", 756 * T, 756 * T, 378 * T, 51.2 * T, 350),
    # NVIDIA H200 datasheet (2024): SXM, the H100 SXM's compute (BF16 989, TF32 494, FP32 67 TFLOPS), up to 700 W
    Accelerator("h200", "H200 SXM", 989.4 * T, 989.4 * T, 494.7 * T, 66.9 * T, 700),
    # NVIDIA L4 datasheet (2023): BF16/FP16 121 (242 sparse), TF32 60 (120 sparse), FP32 30.3 TFLOPS, 72 W
    Accelerator("l4", "L4", 121 * T, 121 * T, 60 * T, 30.3 * T, 72),
    # NVIDIA A10 datasheet (2021): BF16/FP16 125, TF32 62.5, FP32 31.2 TFLOPS, 150 W
    Accelerator("a10", "A10", 125 * T, 125 * T, 62.5 * T, 31.2 * T, 150),
    # AWS's A10G (g5 instances) has no NVIDIA datasheet; tensor rates as published in Baseten's
    # "NVIDIA A10 vs A10G" comparison (BF16/FP16 70, TF32 35 TFLOPS), FP32 31.2 TFLOPS, 300 W
    Accelerator("a10g", "A10G", 70 * T, 70 * T, 35 * T, 31.2 * T, 300),
    # NVIDIA V100 datasheet (2020): SXM2 tensor FP16 125, FP32 15.7 TFLOPS, 300 W; PCIe 112 / 14 TFLOPS, 250 W
    Accelerator("v100_sxm", "V100 SXM2", None, 125 * T, None, 15.7 * T, 300),
    Accelerator("v100_pcie", "V100 PCIe", None, 112 * T, None, 14 * T, 250),
    # NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): FP16/BF16 tensor with FP32 accumulate 165.2,
    # TF32 82.6, FP32 82.6 TFLOPS, 450 W total graphics power
    Accelerator("rtx4090", "GeForce RTX 4090", 165.2 * T, 165.2 * T, 82.6 * T, 82.6 * T, 450),
    # Google Cloud TPU v4 documentation: 275 TFLOPS bf16 per chip; Jouppi et al. 2023 (ISCA, TPU v4): 192 W max
    Accelerator("tpu_v4", "TPU v4", 275 * T, None, None, None, 192),
)}

#: short names accepted by ``hardware=`` (and its did-you-mean)
ALIASES = {"a100": "a100_80gb_sxm", "a100_40gb": "a100_40gb_sxm", "a100_80gb": "a100_80gb_sxm",
           "h100": "h100_sxm", "v100": "v100_sxm", "4090": "rtx4090", "tpu": "tpu_v4"}


def find_accelerator(name: str) -> Accelerator:
    """The accelerator named ``name`` (key or alias, case- and ``-``-insensitive); ConfigError otherwise."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key in ACCELERATORS:
        return ACCELERATORS[key]
    names = sorted(ACCELERATORS) + sorted(ALIASES)
    raise ConfigError(f"unknown hardware '{name}'.{did_you_mean(key, names)} Known: {', '.join(sorted(ACCELERATORS))} "
                      f"(short names: {', '.join(sorted(ALIASES))}).")


# (pattern on torch.cuda.get_device_name(), key): first match wins, so the specific names come first
_DEVICE_NAMES = (
    (r"H200", "h200"), (r"H100.*PCIe", "h100_pcie"), (r"H100", "h100_sxm"),
    (r"A100.*PCI[Ee]", "a100_80gb_pcie"), (r"A100.*80GB", "a100_80gb_sxm"), (r"A100", "a100_40gb_sxm"),
    (r"A10G", "a10g"), (r"\bA10\b", "a10"), (r"\bL4\b", "l4"),
    (r"V100.*PCI[Ee]", "v100_pcie"), (r"V100", "v100_sxm"), (r"RTX 4090", "rtx4090"),
)


def detect_accelerator(device_name: str | None) -> Accelerator | None:
    """The table's entry for a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    if not device_name:
        return None
    for pattern, key in _DEVICE_NAMES:
        if re.search(pattern, device_name):
            return ACCELERATORS[key]
    return None


def matmul_precision(trainer_precision: str) -> str | None:
    """The peak that applies to a Lightning precision setting ("bf16-mixed", "32-true", ...).

    fp32 training counts against the TF32 peak when torch lets matmuls use TF32
    (``torch.set_float32_matmul_precision("high")`` or ``allow_tf32``), else the FP32 peak.
    """
    p = str(trainer_precision)
    if p.startswith("bf16"):
        return "bf16"
    if p.startswith("16"):
        return "fp16"
    if p.startswith("32"):
        import torch

        tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
        return "tf32" if tf32 else "fp32"
    return None
