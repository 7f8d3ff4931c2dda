"""Loads the optional C++/CUDA extension fastgpt._C; fastgpt works without it.

Importing fastgpt._C registers the ops fastgpt::cpp_attention_forward / _backward (csrc/). If the
extension was not built (FASTGPT_NO_EXTENSION=1, no compiler) or does not load (built against
another torch), fastgpt warns once with the reason and the "cpp" backend is left out.
"""

import warnings

import torch

load_error: str | None = None
try:
    from fastgpt import _C  # noqa: F401  (registers the fastgpt::cpp_* ops)
except Exception as exc:  # missing or broken build: fall back, say why once
    load_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"fastgpt's C++ extension is unavailable, the 'cpp' backend is disabled ({load_error}).",
        RuntimeWarning,
        stacklevel=2,
    )


def _kernel_devices() -> frozenset[str]:
    """Device types with a registered kernel, asked once (torch.compile then sees a constant)."""
    if load_error is not None:
        return frozenset()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return frozenset(d for d, key in keys.items() if has("fastgpt::cpp_attention_forward", key))


_KERNEL_DEVICES = _kernel_devices()


def cpp_available() -> bool:
    """True when fastgpt._C loaded and its ops are registered."""
    return load_error is None


def cpp_supports(device_type: str) -> bool:
    """True when the extension has kernels for tensors on `device_type` ("cpu", "cuda")."""
    return device_type in _KERNEL_DEVICES
