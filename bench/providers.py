"""Benchmark providers: (q, k, v, causal) -> out, each in its own layout.

fastgpt-triton, fastgpt-cpp, reference (fastgpt's backends, through fastgpt.attention), on CUDA
fastgpt-triton-onepass (the Triton backend with FASTGPT_TRITON_BACKWARD=onepass), torch SDPA
per backend (sdpa-flash, sdpa-efficient, sdpa-cudnn), FlexAttention with a causal block mask (flex)
and flash-attn's flash_attn_func when installed (flash-attn).
"""

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Provider:
    name: str
    call: Callable[[Tensor, Tensor, Tensor, bool], Tensor]
    layout: str = "bhtd"  # "bthd" for flash-attn's (B, T, H, D)
    fastgpt: bool = False  # one of ours (speed-ups are reported for these over the others)


def fastgpt_attention(backend: str) -> Callable[[Tensor, Tensor, Tensor, bool], Tensor]:
    """(q, k, v, causal) -> out through fastgpt.attention on one backend; (B, H, T, D) layout."""
    import fastgpt

    return lambda q, k, v, causal: fastgpt.attention(q, k, v, causal=causal, backend=backend)


BACKWARD_SWITCH = "FASTGPT_TRITON_BACKWARD"


class _SetSwitch(torch.autograd.Function):
    """Identity on tensors whose backward sets BACKWARD_SWITCH to `value` (None: unset it)."""

    @staticmethod
    def forward(ctx, value, *tensors):
        ctx.value = value
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.value is None:
            os.environ.pop(BACKWARD_SWITCH, None)
        else:
            os.environ[BACKWARD_SWITCH] = ctx.value
        return (None, *grads)


def triton_backward(mode: str) -> Callable[[Tensor, Tensor, Tensor, bool], Tensor]:
    """fastgpt_attention("triton") whose backward runs with FASTGPT_TRITON_BACKWARD=mode: set by
    an identity after the call (its backward runs first) and restored by one before it (whose
    backward runs after the attention's), so other providers keep the environment's choice."""
    call = fastgpt_attention("triton")

    def run(q, k, v, causal):
        q, k, v = _SetSwitch.apply(os.environ.get(BACKWARD_SWITCH), q, k, v)
        (out,) = _SetSwitch.apply(mode, call(q, k, v, causal))
        return out

    return run


def _sdpa_is_causal(causal: bool, tq: int, tk: int) -> bool:
    # SDPA aligns its causal mask top-left; fastgpt bottom-right. They agree when Tq == Tk, and a
    # single decode query sees every key under bottom-right alignment.
    if not causal or tq == 1:
        return False
    if tq != tk:
        raise ValueError(f"SDPA's is_causal is top-left aligned; cannot compare Tq={tq}, Tk={tk}.")
    return True


def _sdpa(backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v, causal):
        is_causal = _sdpa_is_causal(causal, q.shape[2], k.shape[2])
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    return call


def _flex() -> Callable:
    """FlexAttention with a causal BlockMask; imports and compiles on first use (seconds)."""
    state = {}  # "compiled": torch.compile(flex_attention); (Tq, Tk, device): causal BlockMask

    def setup():
        from torch.nn.attention.flex_attention import flex_attention

        # torch.compile's default: static shapes first, then one dynamic recompile when T
        # changes, so a run over many lengths does not pay a compile per length. Raise the
        # recompile limit so the variants of a run (dtype, D, causal, grad) all compile instead
        # of dynamo falling back to the slow eager path.
        config = torch._dynamo.config
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, limit):
                setattr(config, limit, max(64, getattr(config, limit)))
        state["eager"], state["compiled"] = flex_attention, torch.compile(flex_attention)

    def causal_mask(tq: int, tk: int, device: torch.device):
        from torch.nn.attention.flex_attention import create_block_mask

        if (tq, tk, device) not in state:
            offset = tk - tq  # bottom-right alignment, as fastgpt

            def visible(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + offset

            state[tq, tk, device] = create_block_mask(visible, None, None, tq, tk, device=device)
        return state[tq, tk, device]

    def call(q, k, v, causal):
        if not state:
            setup()
        mask = causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
        if q.device.type == "cuda":
            return state["compiled"](q, k, v, block_mask=mask)
        with warnings.catch_warnings():  # eager flex says it is unfused: that is what we time
            warnings.simplefilter("ignore", UserWarning)
            return state["eager"](q, k, v, block_mask=mask)

    return call


def _flash_attn() -> Callable:
    from flash_attn import flash_attn_func  # (B, T, H, D) layout, causal aligned bottom-right

    return lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal)


def available_providers(device: torch.device) -> dict[str, Provider]:
    """Every provider that imports here; whether one runs a configuration is found by trying."""
    import importlib.util

    from torch.nn.attention import SDPBackend

    import fastgpt

    found = {}
    backends = fastgpt.available_backends(device)
    for name in ("triton", "cpp"):
        if name in backends:
            found[f"fastgpt-{name}"] = Provider(
                f"fastgpt-{name}", fastgpt_attention(name), fastgpt=True
            )
    if device.type == "cuda" and "triton" in backends:  # the one-pass backward, to be timed
        name = "fastgpt-triton-onepass"
        found[name] = Provider(name, triton_backward("onepass"), fastgpt=True)
    found["reference"] = Provider("reference", fastgpt_attention("reference"))
    sdpa = {
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
    }
    for short, attr in sdpa.items():
        if hasattr(SDPBackend, attr):
            found[f"sdpa-{short}"] = Provider(f"sdpa-{short}", _sdpa(getattr(SDPBackend, attr)))
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        found["flex"] = Provider("flex", _flex())
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        found["flash-attn"] = Provider("flash-attn", _flash_attn(), layout="bthd")
    return found
