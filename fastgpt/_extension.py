"""Loads the optional C++/CUDA extension fastgpt._C; fastgpt works without it."""

import warnings

import torch

load_error: str | None = None
try:
    from fastgpt import _C  # noqa: F401  (registers the fastgpt::cpp_* ops)
except Exception as exc:  # missing or broken build: fall back, say why once
    load_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"fastgpt's C++ extension is unavailable, the 'cpp' backend is disabled ({load_error}).",
        stacklevel=2,
    )


def cpp_available() -> bool:
    return load_error is None


def cpp_supports(device_type: str) -> bool:
    """True when the extension has kernels for tensors on `device_type` ("cpu", "cuda")."""
    if not cpp_available():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastgpt::cpp_attention_forward", key
    )
