"""Device and dtype choice, and the peak FLOP/s that MFU is measured against.

device = pick_device("cuda")             # or None: the best here, cuda > mps > cpu
dtype = pick_dtype(None, device)         # bf16 on CUDA (fp16 without bf16), else fp32
peak = peak_flops(device)                # dense bf16 FLOP/s of the GPU, None when unknown
"""

import os

import torch

from fastgpt.errors import FastGPTError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_TYPES = ("cuda", "mps", "cpu")

# Datasheet dense bf16 tensor-core peak TFLOP/s (no sparsity), matched in order as substrings of
# torch.cuda.get_device_name (the SXM H100 reports "NVIDIA H100 80GB HBM3"), so "H100 PCIe" comes
# before "H100".
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "A100": 312.0,
    "L4": 121.0,
}


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """The requested device ("cuda", "cuda:1", "mps", "cpu"), else the best one here.

    A bare "cuda" means this process's GPU under torchrun (LOCAL_RANK). FastGPTError for a device
    name torch does not know or one this machine does not have.
    """
    if requested is None:
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise FastGPTError(
            f"Unknown --device {requested!r}; expected one of {', '.join(DEVICE_TYPES)} "
            "(or cuda:N)."
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FastGPTError("--device cuda was asked for but CUDA is not available here.")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise FastGPTError(
                f"--device {device} was asked for but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)."
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FastGPTError("--device mps was asked for but MPS is not available here.")
    return device


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """The autocast dtype by name, else bf16 on CUDA (fp16 where bf16 is missing), else fp32."""
    if requested is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if requested not in DTYPES:
        raise FastGPTError(f"Unknown --dtype {requested!r}; expected one of {', '.join(DTYPES)}.")
    return DTYPES[requested]


def peak_bf16_tflops(name: str) -> float | None:
    """Datasheet dense bf16 peak TFLOP/s for a GPU name, None when unknown."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of the device (for MFU), None when unknown (CPUs, unlisted GPUs).

    FASTGPT_PEAK_FLOPS (FLOP/s) overrides it, e.g. for a GPU the table does not know.
    """
    if "FASTGPT_PEAK_FLOPS" in os.environ:
        return float(os.environ["FASTGPT_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    tflops = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12
