"""fastgpt.attention: validate once, pick the backend once, run it.

Every entry point of fastgpt (the SDPA- and flash-attn-style functions, the nn module, the Hugging
Face registration, the GPT model) ends here, so this file is the one place that decides which
kernel runs. Set FASTGPT_DEBUG=1 to log each decision and its reason.
"""

import functools
import importlib.util
import logging
import math
import numbers
import os
from collections.abc import Callable

import torch
from torch import Tensor

from fastgpt.envflags import env_flag
from fastgpt.reference import reference_attention_with_lse

BACKENDS = ("triton", "cpp", "reference")
MAX_HEAD_DIM = 256
BACKEND_DTYPES = {  # the dtypes each backend takes
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cpp": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}

# The attention variants each backend implements: the one place a kernel declares support. A
# backend listed under a variant takes it on every layout it has kernels for (dense, and varlen
# when it is in fastgpt.varlen.VARLEN_BACKENDS), as the keyword arguments window=(left, right),
# softcap=c and sinks=(H,) tensor of its forward op, with their gradients. An automatic pick
# moves to a backend that has every variant of a call; an explicit one without raises.
VARIANT_BACKENDS: dict[str, tuple[str, ...]] = {
    "window": (
        "reference",
        "triton",
        "cpp",
    ),  # sliding window (left, right), flash-attn's window_size
    "softcap": (
        "reference",
        "triton",
        "cpp",
    ),  # scores c * tanh(s / c), Gemma 2's attention logit softcap
    "sinks": (
        "reference",
        "triton",
        "cpp",
    ),  # a learnable (H,) logit in each row's softmax denominator
}

logger = logging.getLogger("fastgpt")


def debug(message: str) -> None:
    """Log a dispatch decision when FASTGPT_DEBUG=1 (silent while torch.compile traces)."""
    if torch.compiler.is_compiling() or not env_flag("FASTGPT_DEBUG"):
        return
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[fastgpt] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    logger.debug(message)


def log_path(entry: str, path: str, reason: str) -> None:
    """With FASTGPT_DEBUG=1, log which path an entry point's call took and why."""
    debug(f"{entry} -> {path} ({reason})")


@functools.cache
def triton_importable() -> bool:
    """True when Triton imports here (it may be installed yet unusable, e.g. on macOS)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install must not break fastgpt
        return False
    return True


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET is on: Triton kernels then run interpreted on CPU tensors."""
    return env_flag("TRITON_INTERPRET")


def _cpp_supports(device_type: str) -> bool:
    from fastgpt import _extension

    return _extension.cpp_available() and _extension.cpp_supports(device_type)


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on tensors of `device`, or None when it can."""
    if backend == "triton":
        if not triton_importable():
            return "Triton is not installed or does not import"
        if device.type != "cuda" and not triton_interpreting():
            return (
                f"Triton kernels need CUDA tensors, got {device.type} tensors "
                "(set TRITON_INTERPRET=1 before importing triton to run them interpreted)"
            )
    elif backend == "cpp" and not _cpp_supports(device.type):
        from fastgpt import _extension

        if not _extension.cpp_available():
            return f"the C++ extension fastgpt._C is not available ({_extension.load_error})"
        return f"the C++ extension was built without {device.type} kernels"
    return None


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run here: on `device` if given, else on CUDA when present, else on CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [name for name in BACKENDS if _unavailable_reason(name, device) is None]


def select_backend(device: torch.device, requested: str | None = None) -> tuple[str, str]:
    """The one dispatch decision: (backend name, reason). Raises ValueError if it cannot run."""
    if requested in (None, "auto"):
        env = os.environ.get("FASTGPT_BACKEND", "auto") or "auto"
        if env != "auto":
            requested, why = env, "FASTGPT_BACKEND"
        elif device.type == "cuda" and triton_importable():
            return "triton", "auto: CUDA tensors and Triton imports"
        elif _cpp_supports(device.type):
            return "cpp", f"auto: the C++ extension has {device.type} kernels"
        else:
            return "reference", f"auto: no compiled kernel for {device.type} tensors here"
    else:
        why = "requested"
    if requested not in BACKENDS:
        raise ValueError(
            f"Unknown attention backend {requested!r} ({why}); expected one of "
            f"{', '.join(BACKENDS)} or 'auto'."
        )
    reason = _unavailable_reason(requested, device)
    if reason is not None:
        raise ValueError(f"Attention backend {requested!r} ({why}) cannot run here: {reason}.")
    return requested, why


def backend_or_reference(
    picked: tuple[str, str],
    requested: str | None,
    has_kernel: Callable[[str], bool],
    refusal: str,
    missing: str,
) -> tuple[str, str]:
    """(backend, reason) for a layout some backends have no kernel for (varlen, KV cache).

    picked: select_backend's (name, reason), kept when has_kernel(name); else, for an automatic
    pick, the reference with the reason "<name> (<reason>) has no <missing> yet"; for an explicit
    request, NotImplementedError "The <name> backend has no <refusal>; pass backend=None or
    backend='reference'."
    """
    name, why = picked
    if has_kernel(name):
        return name, why
    if requested not in (None, "auto"):
        raise NotImplementedError(
            f"The {name} backend has no {refusal}; pass backend=None or backend='reference'."
        )
    return "reference", f"{name} ({why}) has no {missing} yet"


def window_restricts(window: object, causal: bool) -> bool:
    """Whether window hides a key that causal alone does not: None, (-1, -1), and with causal any
    (-1, right) are no window at all (the call stays a plain one)."""
    if window is None:
        return False
    left, right = tuple(window)  # type: ignore[arg-type]
    return left >= 0 or (right >= 0 and not causal)


def variants_in_use(
    window: object, softcap: object, sinks: object, causal: bool = False
) -> list[str]:
    """The names (keys of VARIANT_BACKENDS) of the variants a call turns on; [] for a plain call."""
    used = {
        "window": window_restricts(window, causal),
        "softcap": softcap != 0.0,
        "sinks": sinks is not None,
    }
    return [name for name, on in used.items() if on]


def variant_backend(
    device: torch.device,
    picked: tuple[str, str],
    requested: str | None,
    variants: list[str],
    among: tuple[str, ...] = BACKENDS,
) -> tuple[str, str]:
    """(backend, reason) that implements every one of `variants` (VARIANT_BACKENDS): the picked
    one when it does; else, for an automatic pick, the first that does among `among` (in the
    automatic order) and runs here; for an explicit request, NotImplementedError naming them."""
    name, why = picked
    missing = [v for v in variants if name not in VARIANT_BACKENDS[v]]
    if not missing:
        return name, why
    if requested not in (None, "auto"):
        have = ", ".join(b for b in BACKENDS if all(b in VARIANT_BACKENDS[v] for v in missing))
        raise NotImplementedError(
            f"The {name} backend does not implement {', '.join(missing)} yet (backends that do: "
            f"{have}); pass backend=None or backend='reference'."
        )
    order = BACKENDS if device.type == "cuda" else tuple(b for b in BACKENDS if b != "triton")
    for candidate in order:
        if (
            candidate in among
            and all(candidate in VARIANT_BACKENDS[v] for v in variants)
            and _unavailable_reason(candidate, device) is None
        ):
            return candidate, f"{name} ({why}) has no {', '.join(missing)} kernels yet"
    raise AssertionError("the reference backend implements every variant")  # pragma: no cover


def _window_problem(window: object) -> str | None:
    if window is None:
        return None
    pair = tuple(window) if isinstance(window, tuple | list) else ()
    if len(pair) != 2 or not all(
        isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in pair
    ):
        return f"window must be None or a pair (left, right) of ints >= -1, got {window!r}."
    return None


def variant_problem(
    heads: int, device: torch.device, window: object, softcap: object, sinks: object
) -> tuple[type[Exception], str] | None:
    """(exception type, one sentence) for a bad window, softcap or sinks, or None: their rules.

    heads is H, the query heads the sinks must match; device is q's.
    """
    problem = _window_problem(window)
    if problem is not None:
        return ValueError, problem
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool):
        return TypeError, f"softcap must be a real number, got {type(softcap).__name__}."
    if not (math.isfinite(softcap) and softcap >= 0.0):
        return ValueError, f"softcap must be finite and >= 0 (0 turns it off), got {softcap}."
    if sinks is None:
        return None
    if not isinstance(sinks, Tensor) or not sinks.is_floating_point():
        kind = sinks.dtype if isinstance(sinks, Tensor) else type(sinks).__name__
        return TypeError, f"sinks must be a floating-point tensor (H,), got {kind}."
    if tuple(sinks.shape) != (heads,):
        return ValueError, (
            f"sinks must have shape (H,) = ({heads},), one logit per query head, got "
            f"{tuple(sinks.shape)}."
        )
    if sinks.device != device:
        return ValueError, f"sinks must be on q's device {device}, got {sinks.device}."
    return None


def validate_variants(
    heads: int, device: torch.device, window: object, softcap: object, sinks: object
) -> None:
    """Raise TypeError/ValueError with one sentence for a bad window, softcap or sinks."""
    problem = variant_problem(heads, device, window, softcap, sinks)
    if problem is not None:
        error, message = problem
        raise error(message)


def non_tensor_problem(entry: str, **named: object) -> str | None:
    """The sentence "<entry> expects tensors, got <type> for <name>." for the first of named
    that is not a tensor, or None when all are."""
    for name, t in named.items():
        if not isinstance(t, Tensor):
            return f"{entry} expects tensors, got {type(t).__name__} for {name}."
    return None


def require_tensors(entry: str, **named: object) -> None:
    """TypeError with non_tensor_problem's sentence unless every one of named is a tensor."""
    problem = non_tensor_problem(entry, **named)
    if problem is not None:
        raise TypeError(problem)


def _problem(
    q: Tensor, k: Tensor, v: Tensor, backend: str, scale: object
) -> tuple[type[Exception], str] | None:
    """(exception type, one sentence naming the problem and the shapes), or None: the rules."""
    not_tensors = non_tensor_problem("attention", q=q, k=k, v=v)
    if not_tensors is not None:
        return TypeError, not_tensors
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return ValueError, (
            f"attention expects 4-d q (B, H, Tq, D) and k, v (B, Hkv, Tk, D), got {shapes}."
        )
    if not (q.dtype == k.dtype == v.dtype):
        return TypeError, (
            f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype} ({shapes})."
        )
    if not q.is_floating_point():
        return TypeError, f"attention needs floating-point tensors, got {q.dtype} ({shapes})."
    if q.dtype not in BACKEND_DTYPES[backend]:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in BACKEND_DTYPES[backend])
        return TypeError, f"The {backend} backend supports {allowed}, got {q.dtype} ({shapes})."
    if not (q.device == k.device == v.device):
        return ValueError, (
            f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}."
        )
    (B, H, _, D), (Bk, Hkv, _, Dk) = q.shape, k.shape
    if k.shape != v.shape:
        return ValueError, f"k and v must have the same shape, got {shapes}."
    if Bk != B:
        return ValueError, f"q and k/v must have the same batch size, got {shapes}."
    if Dk != D:
        return ValueError, f"q and k/v must have the same head dim, got {shapes}."
    if Hkv == 0 or H % Hkv != 0:
        return ValueError, (
            f"The number of query heads ({H}) must be a multiple of the number of key/value "
            f"heads ({Hkv}), got {shapes}."
        )
    if backend != "reference" and not 1 <= D <= MAX_HEAD_DIM:
        return ValueError, (
            f"The {backend} backend supports head dims 1..{MAX_HEAD_DIM}, got {D} ({shapes})."
        )
    if D == 0:
        return ValueError, f"attention needs a head dim of at least 1, got 0 ({shapes})."
    if scale is not None and not isinstance(scale, numbers.Real | torch.SymFloat):
        return TypeError, f"scale must be a real number or None, got {type(scale).__name__}."
    if isinstance(scale, numbers.Real) and not math.isfinite(scale):
        return ValueError, f"scale must be a finite number, got {scale} ({shapes})."
    return None


def unsupported_reason(
    q: Tensor, k: Tensor, v: Tensor, backend: str, scale: float | None = None
) -> str | None:
    """Why `backend` cannot run attention(q, k, v, scale=scale), in one sentence; None if it can.

    The one set of input rules: attention() raises on it, the drop-ins fall back to their
    ecosystem's own implementation on it. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D).
    """
    problem = _problem(q, k, v, backend, scale)
    return None if problem is None else problem[1]


def validate(q: Tensor, k: Tensor, v: Tensor, backend: str, scale: object) -> None:
    """Raise TypeError/ValueError with one sentence naming the problem and the shapes."""
    problem = _problem(q, k, v, backend, scale)
    if problem is not None:
        error, message = problem
        raise error(message)


def validate_views(
    views: tuple[Tensor, Tensor, Tensor], backend: str, scale: object, layout: Callable[[], str]
) -> None:
    """validate() on dense (B, H, T, D) views q, k, v of another layout (packed, KV cache): its
    sentence with layout()'s description of the caller's own shapes added, "... (<layout>)."."""
    problem = _problem(*views, backend, scale)
    if problem is not None:
        error, message = problem
        raise error(f"{message.rstrip('.')} ({layout()}).")


def last_dim_contiguous(t: Tensor) -> Tensor:
    """t itself when the kernels can read it (unit stride along the last dim, or a last dim of
    size 1, where that stride is never used); else a contiguous copy. Kernels take every other
    stride as it is."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused (causal) scaled dot-product attention with grouped key/value heads.

    Args:
        q: (B, H, Tq, D) queries; any strides with the last dim contiguous (no copy is made).
        k: (B, Hkv, Tk, D) keys, H % Hkv == 0 (GQA / MQA without repeating k per head).
        v: (B, Hkv, Tk, D) values.
        causal: mask aligned bottom-right: query i sees keys j <= i + (Tk - Tq), as flash-attn
            >= 2.1 and KV-cache decoding need. A query that sees no key outputs zeros.
            Inputs must be finite: a NaN or inf in q, k or v may make any output of its (batch,
            head) non-finite, on every backend (as in torch SDPA and flash-attn).
        scale: multiplies q.k; defaults to 1 / sqrt(D); must be finite.
        window: (left, right) ints >= -1, flash-attn's window_size: query i sees keys j with
            i + Tk - Tq - left <= j <= i + Tk - Tq + right (-1: unbounded; with causal, right is
            0). None or (-1, -1): no window. (W, 0) with causal is a sliding window of W + 1 keys.
        softcap: c > 0 turns each score s = scale * q.k into c * tanh(s / c) (Gemma 2: 50.0);
            0 turns it off.
        sinks: None, or a learnable (H,) floating tensor on q's device: one extra logit per head
            in each row's softmax denominator (gpt-oss), with no value; differentiable.
        return_lse: also return the row log-sum-exp (see below).
        backend: "triton", "cpp", "reference", or None / "auto" (FASTGPT_BACKEND overrides auto).
            A variant (window, softcap, sinks) runs where VARIANT_BACKENDS lists it: an automatic
            pick moves there (FASTGPT_DEBUG=1 says so), an explicit backend without it raises
            NotImplementedError.

    Returns:
        out (B, H, Tq, D) in q's dtype, differentiable with respect to q, k, v (and sinks); with
        return_lse=True, (out, lse): lse (B, H, Tq) float32 (float64 for float64 inputs), not
        differentiable, log of each row's softmax denominator: the sum over the visible keys of
        exp(score), plus exp(sinks[h]) with sinks. A row that sees no key has lse +inf (sinks[h]
        with sinks).
    """
    out, lse = attention_with_lse(
        q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks,
        backend=backend,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """attention(..., return_lse=True): (out (B, H, Tq, D), lse (B, H, Tq)); see attention."""
    require_tensors("attention", q=q)
    name, why = select_backend(q.device, backend)
    variants = []
    if window is not None or softcap != 0.0 or sinks is not None:
        validate(q, k, v, "reference", scale)  # the shapes first: the variants' rules read H
        validate_variants(q.shape[1], q.device, window, softcap, sinks)
        variants = variants_in_use(window, softcap, sinks, causal)
        name, why = variant_backend(q.device, (name, why), backend, variants)
    validate(q, k, v, name, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.numel() == 0 or k.shape[2] == 0:
        # Empty batch, no queries or no keys: nothing for a kernel to do; the reference gives
        # the right (empty or zero) result and stays connected to autograd.
        name, why = "reference", "empty input"
    shown = f" {', '.join(variants)}" if variants else ""
    debug(
        f"attention q{tuple(q.shape)} k{tuple(k.shape)} {q.dtype} causal={causal}{shown} -> "
        f"{name} ({why})"
    )
    extra = variant_kwargs(window, softcap, sinks, causal)
    if name == "reference":
        out, lse = reference_attention_with_lse(q, k, v, causal, scale, **extra)
        return out, lse.detach()
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    from fastgpt import ops

    # A compiled backend gets the variants it declares in VARIANT_BACKENDS as keywords.
    return ops.forward_op(name)(q, k, v, causal, scale, **extra)


def variant_kwargs(
    window: tuple[int, int] | None, softcap: float, sinks: Tensor | None, causal: bool
) -> dict[str, object]:
    """The keyword arguments (window, softcap, sinks) of the variants in use, {} for none."""
    extra: dict[str, object] = {}
    if window_restricts(window, causal):
        extra["window"] = (int(window[0]), int(window[1]))  # type: ignore[index]
    if softcap != 0.0:
        extra["softcap"] = float(softcap)
    if sinks is not None:
        extra["sinks"] = sinks
    return extra
