"""Launch helpers shared by the Triton host functions (attention.py, kvcache.py): tile widths,
dot precision and the device's SM count."""

import torch
import triton


def block_d(d: int) -> int:
    """Head dim padded to a power of two (at least 16, the smallest tl.dot tile)."""
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 inputs get true fp32 products (as torch's default matmul),
    not TF32; fp16 / bf16 products are exact in either."""
    return "ieee" if dtype == torch.float32 else "tf32"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 under the interpreter (a few splits, enough
    to exercise the split-K merges)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
