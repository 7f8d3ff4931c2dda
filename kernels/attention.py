"""Host side of the Triton attention: autotune configs, grids and launches.

    attention_forward(q, k, v, causal, scale) -> (out, lse)
    attention_backward(grad_out, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)

q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D); any strides with a contiguous last dim. Inputs arrive
validated by fastgpt.attention; these functions trust them. out/dq/dk/dv are contiguous in the
input dtype; lse is (B, H, Tq) float32, natural log, +inf for a row that sees no key.

Packed variable-length sequences (the same kernels with IS_VARLEN; fastgpt.attention_varlen):

    attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal, scale) -> (out, lse)
    attention_varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k, causal, scale) -> (dq, dk, dv)

q/out: (total_q, H, D); k, v: (total_k, Hkv, D); cu_seqlens_*: int32 (B + 1,); lse: (H, total_q)
float32. The grids cover max_seqlen_* rows per sequence; programs past a sequence's end exit.

Variants (keywords of the dense functions): window=(left, right) (-1 unbounded), softcap=c (0 off)
and sinks (H,) (None off), with flash-attn's semantics (fastgpt.reference). With sinks, lse
includes the sink's term and attention_backward returns (dq, dk, dv, dsinks), dsinks (H,) fp32.
"""

import functools
import math

import torch
import triton

from fastgpt.attention import last_dim_contiguous
from fastgpt.envflags import env_choice

from ._interpreter import patch_scalar_index
from .configs import (
    DECODE_CONFIGS,
    DKDV_CONFIGS,
    DQ_CONFIGS,
    FWD_CONFIGS,
    INTERPRET,
    ONEPASS_CONFIGS,
    TMA_MAX_BLOCK_D,
    prune_decode,
    prune_dkdv,
    prune_dq,
    prune_fwd,
    prune_onepass,
)
from .decode import decode_combine_kernel, decode_split_kernel
from .flash_bwd import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel
from .flash_bwd_onepass import bwd_onepass_kernel
from .flash_fwd import LOG2E, attn_fwd_kernel
from .launch import block_d as _block_d
from .launch import dot_precision as _dot_precision
from .launch import sm_count as _sm_count

if INTERPRET:
    patch_scalar_index()

# Autotune keys: head dim, causal, the GQA group and the lengths rounded up to a power of two (so
# a new length in the same bucket reuses the tuned config). dK/dV adds its group split (the work
# per program). Tensor dtypes are added by the autotuner itself.
_KEY = ["HEAD_DIM", "CAUSAL", "GROUP", "TQ_BUCKET", "TK_BUCKET", "IS_VARLEN", "WINDOW", "SOFTCAP"]

_fwd = triton.autotune(
    FWD_CONFIGS, key=[*_KEY, "USE_TMA"], prune_configs_by={"early_config_prune": prune_fwd}
)(attn_fwd_kernel)
_dkdv = triton.autotune(
    DKDV_CONFIGS,
    key=[*_KEY, "SPLITS", "USE_TMA"],
    prune_configs_by={"early_config_prune": prune_dkdv},
)(bwd_dkdv_kernel)
_dq = triton.autotune(
    DQ_CONFIGS, key=[*_KEY, "USE_TMA"], prune_configs_by={"early_config_prune": prune_dq}
)(bwd_dq_kernel)
# The one-pass backward adds into a zeroed dq accumulator: autotune's trial runs re-zero it.
_onepass = triton.autotune(
    ONEPASS_CONFIGS,
    key=[k for k in _KEY if k != "IS_VARLEN"],
    prune_configs_by={"early_config_prune": prune_onepass},
    reset_to_zero=["Acc"],
)(bwd_onepass_kernel)
_decode = triton.autotune(
    DECODE_CONFIGS,
    key=["HEAD_DIM", "TK_BUCKET"],
    prune_configs_by={"early_config_prune": prune_decode},
)(decode_split_kernel)

_DKDV_MAX_BLOCK_N = max(c.kwargs["BLOCK_N"] for c in DKDV_CONFIGS)
DECODE_MIN_KEYS = 256  # Tq == 1 with at least this many keys takes the split-K decode kernel
DECODE_MAX_SPLITS = 64  # the merge holds all partials of a row in registers: (splits, D) fp32
_DECODE_CHUNK_ALIGN = max(c.kwargs["BLOCK_N"] for c in DECODE_CONFIGS)  # every BLOCK_N divides it
_DECODE_MIN_CHUNK = 16 if INTERPRET else 512  # keys per split, at least


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def variant_args(
    window: tuple[int, int],
    softcap: float,
    sinks: torch.Tensor | None,
    causal: bool,
    scale: float,
    reach: int,
) -> dict:
    """The kernels' variant arguments: Sinks (fp32 or None), win_left / win_right (causal folded
    into right = 0, an unbounded side as `reach`, past every key), softcap, WINDOW, SOFTCAP.

    reach: more than any |query - key| offset (Tq + Tk, or the packed totals')."""
    left, right = (int(w) for w in window)
    args: dict = {"Sinks": None if sinks is None else sinks.to(torch.float32).contiguous()}
    # Causal alone is no window (CAUSAL masks it); with a left bound it is right = 0.
    args["WINDOW"] = left >= 0 or (right >= 0 and not causal)
    right = 0 if causal else right
    args["win_left"] = left if left >= 0 else reach
    args["win_right"] = right if right >= 0 else reach
    # scale 0 makes every score 0, which the cap keeps at 0: no cap to apply.
    args["SOFTCAP"] = softcap > 0.0 and scale != 0.0
    args["softcap"] = float(softcap) if args["SOFTCAP"] else 1.0
    return args


def _fp32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def base2_lse(
    lse: torch.Tensor, scale: float, softcap: float = 0.0
) -> tuple[torch.Tensor, float, float]:
    """What the backward kernels read to form p as one fma, exp2(q.k * qk_scale - lse2):
    (lse2 like lse in fp32, qk_scale, cap_out).

    qk_scale = fl(scale * log2 e) (signed, a Python float the launch passes as fp32) and
    lse2 = fl(lse * r) with r = qk_scale / scale (~log2 e) in fp64, one rounding per row, so
    q.k * qk_scale - lse2 = r * (scale * q.k - lse): fl(scale * log2 e)'s own error cancels rather
    than scaling the score. cap_out = fl(softcap * r): the softcapped score c * t as fma(t,
    cap_out, -lse2). A scale too small for a normal fp32 qk_scale (0 included) uses r = log2 e.
    lse: any shape, fp32, natural log, +inf rows stay +inf.
    """
    scale32 = abs(_fp32(scale))
    c2 = _fp32(scale32 * LOG2E.value)
    normal = math.isfinite(c2) and c2 >= torch.finfo(torch.float32).tiny
    ratio = c2 / scale32 if normal else LOG2E.value
    lse2 = (lse.to(torch.float64) * ratio).to(torch.float32)
    return lse2, math.copysign(c2, scale), _fp32(softcap * ratio)


def _plain(args: dict) -> bool:
    return not args["WINDOW"] and not args["SOFTCAP"] and args["Sinks"] is None


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    use_tma: bool | None = None,
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention forward. Returns out (B, H, Tq, D) in q.dtype and lse (B, H, Tq) fp32.

    use_tma: Q/K/V loads and the O store through tensor descriptors; default tma_ok(...) (sm_90+
    with 16-byte-aligned bases and strides). True forces it (the interpreter tests both paths).
    window, softcap, sinks: the variants (module docstring).
    """
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    extra = variant_args(window, softcap, sinks, causal, scale, Tq + Tk + 1)
    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if Tk == 0:  # no key anywhere: every row is empty (its lse the sink's, with sinks)
        if sinks is None:
            return out.zero_(), lse.fill_(math.inf)
        return out.zero_(), lse.copy_(extra["Sinks"].view(1, H, 1).expand_as(lse))
    if Tq == 1 and Tk >= DECODE_MIN_KEYS and _plain(extra):
        return decode_forward(q, k, v, scale)

    use_tma = _use_descriptors(use_tma, "fwd", _block_d(D), q, k, v, out)

    def grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]), H, B)

    _fwd[grid](
        q, k, v, out, lse, None, None,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        H, H // Hkv, Tq, Tk, abs(scale) * LOG2E.value, abs(scale),
        _bucket(Tq), _bucket(Tk),
        HEAD_DIM=D, BLOCK_D=_block_d(D), CAUSAL=bool(causal), SCALE_NEG=scale < 0,
        DOT_PRECISION=_dot_precision(q.dtype), USE_TMA=use_tma, **extra,
    )  # fmt: skip
    return out, lse


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether the forward reads / writes these (B, H, T, D) tensors through tensor descriptors:
    a CUDA device of compute capability 9.0 or newer and every tensor descriptor_aligned."""
    t0 = tensors[0]
    if t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    return all(descriptor_aligned(t) for t in tensors)


def descriptor_aligned(t: torch.Tensor) -> bool:
    """TMA's layout rules for a (B, H, T, D) tensor: unit last stride, a row stride above 0, and
    the data pointer and every other stride (in bytes) multiples of 16."""
    return (
        t.stride(-1) == 1
        and t.stride(-2) > 0
        and t.data_ptr() % 16 == 0
        and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
    )


def _use_descriptors(use_tma: bool | None, kind: str, block_d: int, *tensors) -> bool:
    """Whether the pass `kind` ("fwd", "dkdv", "dq") runs through tensor descriptors: use_tma when
    given, else tma_ok(*tensors) up to configs.TMA_MAX_BLOCK_D[kind]. Compiled, the descriptor
    path needs Triton's scratch allocator, set here the first time."""
    if use_tma is None:
        use_tma = block_d <= TMA_MAX_BLOCK_D[kind] and tma_ok(*tensors)
    if use_tma and not INTERPRET:
        _set_descriptor_allocator()
    return bool(use_tma)


@functools.cache
def _set_descriptor_allocator() -> None:
    """Descriptors made inside a kernel need global scratch memory from Triton's allocator."""

    def alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(alloc)


def decode_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K forward for one query row: q (B, H, 1, D). Causal or not is the same here.

    num_splits defaults to enough programs to fill the GPU about four times over (at most
    DECODE_MAX_SPLITS).
    """
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = H // Hkv
    if num_splits is None:
        num_splits = triton.cdiv(4 * _sm_count(q.device), B * Hkv)
    num_splits = min(max(num_splits, 1), DECODE_MAX_SPLITS)
    chunk = max(triton.cdiv(Tk, num_splits), _DECODE_MIN_CHUNK)
    chunk = triton.cdiv(chunk, _DECODE_CHUNK_ALIGN) * _DECODE_CHUNK_ALIGN
    splits = triton.cdiv(Tk, chunk)  # every split holds at least one key

    acc = torch.empty((B, H, splits, D), dtype=torch.float32, device=q.device)
    m = torch.empty((B, H, splits), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _decode[(splits, Hkv, B)](
        q, k, v, acc, m, l,
        q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3],
        Hkv, group, Tk, abs(scale) * LOG2E.value, chunk,
        _bucket(Tk),
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_G=max(16, triton.next_power_of_2(group)),
        SCALE_NEG=scale < 0,
        DOT_PRECISION=_dot_precision(q.dtype),
    )  # fmt: skip
    out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, 1), dtype=torch.float32, device=q.device)
    decode_combine_kernel[(H, B)](
        acc, m, l, out, lse, out.stride(0), out.stride(1),
        H, splits, abs(scale) * LOG2E.value, abs(scale),
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_S=triton.next_power_of_2(splits),
    )  # fmt: skip
    return out, lse


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    dkdv_split: int | None = None,
    use_tma: bool | None = None,
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Fused attention backward. Returns dq like q, dk and dv like k, contiguous, input dtype;
    with sinks also dsinks (H,) fp32 (lse must then be the forward's, the sink's term included).

    dkdv_split: how many programs share one KV head's GQA group in the dK/dV pass (a divisor of
    the group); default dkdv_splits(...), more than 1 only when the grid would not fill the GPU.
    use_tma: the dK/dV and dQ passes through tensor descriptors (as attention_forward's); default
    tma_ok(...) up to head dim 128 (configs.TMA_MAX_BLOCK_D).
    With FASTGPT_TRITON_BACKWARD=onepass (backward_mode) the one-pass kernel runs instead, through
    pointers (dkdv_split, still checked, and use_tma then do not apply).
    """
    grad_out, q, k, v, out = (last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    extra = variant_args(window, softcap, sinks, causal, scale, Tq + Tk + 1)
    sinks32 = extra.pop("Sinks")
    dq = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Tk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, Tk, D), dtype=v.dtype, device=v.device)
    dsinks = () if sinks is None else (torch.zeros((H,), dtype=torch.float32, device=q.device),)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), *dsinks
    lse = lse.to(torch.float32).contiguous()
    block_d = _block_d(D)
    lse2, qk_scale, extra["cap_out"] = base2_lse(lse, scale, extra["softcap"])

    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    pre_block_m = 64 if INTERPRET else 128
    n_pre = triton.cdiv(Tq, pre_block_m)
    partials = None if sinks is None else torch.empty((B, H, n_pre), device=q.device)
    sink_args = {} if sinks is None else dict(Lse=lse, Sinks=sinks32, DSinks=partials)
    bwd_preprocess_kernel[(n_pre, H, B)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], H, Tq,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_block_m, **sink_args,
    )  # fmt: skip
    if sinks is not None:
        dsinks = (partials.sum((0, 2)),)  # (H,): torch's fixed-order reduction, no atomics

    common = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=bool(causal), **extra)
    common["DOT_PRECISION"] = _dot_precision(q.dtype)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    buckets = (_bucket(Tq), _bucket(Tk))
    group = H // Hkv
    splits = dkdv_splits(B, Hkv, group, Tk, q.device) if dkdv_split is None else dkdv_split
    if group % splits:
        raise ValueError(
            f"dkdv_split={splits} must divide the GQA group {group} (H={H}, Hkv={Hkv})"
        )
    if backward_mode() == "onepass" and onepass_compiles_clean(
        torch.cuda.get_device_capability(q.device) if q.is_cuda else None, block_d, common["WINDOW"]
    ):
        args = (grad_out, q, k, v, lse2, delta, dq, dk, dv)
        onepass_backward(*args, scale, qk_scale, strides, buckets, common)
        return dq, dk, dv, *dsinks
    dk_out, dv_out = _dkdv_targets(dk, dv, splits)
    tma_dkdv = _use_descriptors(use_tma, "dkdv", block_d, q, k, v, grad_out, dk_out, dv_out)

    def dkdv_grid(meta):
        return (triton.cdiv(Tk, meta["BLOCK_N"]), Hkv * splits, B)

    _dkdv[dkdv_grid](
        q, k, v, grad_out, lse2, delta, dk_out, dv_out, None, None,
        *strides, *dk_out.stride()[:3], *dv_out.stride()[:3],
        H, Hkv, group, splits, Tq, Tk, scale, qk_scale, *buckets, **common,
        SCORES_AS_FORWARD=INTERPRET,
        USE_TMA=tma_dkdv,
    )  # fmt: skip
    if splits > 1:
        _sum_partials(dk, dk_out, splits)
        _sum_partials(dv, dv_out, splits)

    def dq_grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]), H, B)

    tma_dq = _use_descriptors(use_tma, "dq", block_d, q, k, v, grad_out, dq)
    _dq[dq_grid](
        q, k, v, grad_out, lse2, delta, dq, None, None,
        *strides, *dq.stride()[:3],
        H, H // Hkv, Tq, Tk, scale, qk_scale, *buckets, **common, USE_TMA=tma_dq,
    )  # fmt: skip
    return dq, dk, dv, *dsinks


BACKWARD_MODES = ("onepass", "twopass", "auto")


def backward_mode() -> str:
    """Which dense backward attention_backward runs: "onepass" (flash_bwd_onepass, 5 matmuls and
    one p per tile pair, a B * Hkv grid) or "twopass" (dK/dV then dQ), from
    FASTGPT_TRITON_BACKWARD=onepass|twopass|auto (default auto). auto is two-pass until the
    one-pass kernel is timed on a GPU (the rule it should become: bench/NOTES_triton.md).
    Varlen always runs the two passes."""
    mode = env_choice("FASTGPT_TRITON_BACKWARD", BACKWARD_MODES, "auto")
    return "twopass" if mode == "auto" else mode


def onepass_compiles_clean(capability: tuple[int, int] | None, block_d: int, window: bool) -> bool:
    """Whether the one-pass kernel has a clean (spill-free) config for a call on a GPU of this
    compute capability (None: not a GPU, the interpreter): all but a window at head dim 256 before
    sm_90, whose only row spills 232-264 B (configs._ONEPASS); those calls run the two passes."""
    return not (window and block_d > 128 and capability is not None and capability[0] < 9)


def onepass_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse2: torch.Tensor,
    delta: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    scale: float,
    qk_scale: float,
    strides: tuple[int, ...],
    buckets: tuple[int, int],
    common: dict,
) -> None:
    """dq, dk, dv (filled in place) by the one-pass kernel: grid (Hkv, B), dq summed into an fp32
    (B, H, Tq, D) accumulator in each program's fixed key-tile order, then scaled and cast."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    acc = torch.zeros((B, H, Tq, D), dtype=torch.float32, device=q.device)
    _onepass[(Hkv, B)](
        q, k, v, grad_out, lse2, delta, dk, dv, acc,
        *strides, *dk.stride()[:3], *dv.stride()[:3],
        H, H // Hkv, Tq, Tk, scale, qk_scale, *buckets, **common,
        SCORES_AS_FORWARD=INTERPRET,
    )  # fmt: skip
    dq.copy_(acc.mul_(scale))


def _dkdv_targets(
    dk: torch.Tensor, dv: torch.Tensor, splits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the dK/dV kernel writes: dk, dv themselves for one slice per KV head, else fp32
    partials (B, Hkv * splits, Tk, D), one per slice of the group."""
    if splits == 1:
        return dk, dv
    B, Hkv, Tk, D = dk.shape
    return tuple(
        torch.empty((B, Hkv * splits, Tk, D), dtype=torch.float32, device=dk.device)
        for _ in range(2)
    )


def _sum_partials(out: torch.Tensor, parts: torch.Tensor, splits: int) -> None:
    """out (B, Hkv, Tk, D) = sum of the partials (B, Hkv * splits, Tk, D) over the splits, in a
    fixed order (no atomics: bit-identical run to run)."""
    B, Hkv, Tk, D = out.shape
    out.copy_(functools.reduce(torch.add, parts.view(B, Hkv, splits, Tk, D).unbind(2)))


def dkdv_splits(B: int, Hkv: int, group: int, Tk: int, device: torch.device) -> int:
    """Programs per KV head in the dK/dV pass: 1 when cdiv(Tk, BLOCK_N) * Hkv * B programs fill
    the GPU, else the largest divisor of the GQA group that brings the grid to about one wave
    (BLOCK_N taken at its largest, so the grid is never under-counted)."""
    programs = triton.cdiv(Tk, _DKDV_MAX_BLOCK_N) * Hkv * B
    sms = _sm_count(device)
    if programs >= sms or group == 1:
        return 1
    want = triton.cdiv(sms, programs)
    return max(d for d in range(1, group + 1) if group % d == 0 and d <= want)


# --- packed variable-length sequences (IS_VARLEN) ------------------------------------------------


def _packed_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """The kernels' (batch, head, row) strides of a packed (total, heads, D) tensor: rows of
    every sequence share one row stride, so the batch stride is unused (0)."""
    return 0, t.stride(1), t.stride(0)


def _check_grid(B: int) -> None:
    if B > 65535:  # grid axis 2 (CUDA's limit); B (sequences) rides on it as in the dense grid
        raise ValueError(f"Triton varlen attention takes at most 65535 sequences, got {B}.")


def attention_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    use_tma: bool | None = None,
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward over packed sequences. q (total_q, H, D), k, v (total_k, Hkv, D); returns
    out (total_q, H, D) in q.dtype and lse (H, total_q) fp32. use_tma as attention_forward's;
    window, softcap, sinks the variants, within each sequence."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    total_q, H, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    B = cu_seqlens_q.numel() - 1
    extra = variant_args(window, softcap, sinks, causal, scale, max_seqlen_q + max_seqlen_k + 1)
    out = torch.empty((total_q, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or max_seqlen_q == 0:
        return out, lse
    if total_k == 0 or max_seqlen_k == 0:  # no key anywhere: every row is empty
        if sinks is None:
            return out.zero_(), lse.fill_(math.inf)
        return out.zero_(), lse.copy_(extra["Sinks"].view(H, 1).expand_as(lse))
    _check_grid(B)
    use_tma = _use_descriptors(use_tma, "fwd", _block_d(D), q, k, v, out)

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), H, B)

    _fwd[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        *_packed_strides(q), *_packed_strides(k), *_packed_strides(v), *_packed_strides(out),
        H, H // Hkv, total_q, total_k, abs(scale) * LOG2E.value, abs(scale),
        _bucket(max_seqlen_q), _bucket(max_seqlen_k),
        HEAD_DIM=D, BLOCK_D=_block_d(D), CAUSAL=bool(causal), SCALE_NEG=scale < 0,
        DOT_PRECISION=_dot_precision(q.dtype), USE_TMA=use_tma, IS_VARLEN=True, **extra,
    )  # fmt: skip
    return out, lse


def attention_varlen_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    dkdv_split: int | None = None,
    use_tma: bool | None = None,
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Fused backward over packed sequences: dq (total_q, H, D), dk, dv (total_k, Hkv, D),
    contiguous, input dtype, and with sinks dsinks (H,) fp32. lse: (H, total_q). dkdv_split,
    use_tma as attention_backward's; window, softcap, sinks the forward's."""
    grad_out, q, k, v, out = (last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    total_q, H, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    B = cu_seqlens_q.numel() - 1
    dq = torch.empty((total_q, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((total_k, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((total_k, Hkv, D), dtype=v.dtype, device=v.device)
    extra = variant_args(window, softcap, sinks, causal, scale, max_seqlen_q + max_seqlen_k + 1)
    sinks32 = extra.pop("Sinks")
    dsinks = () if sinks is None else (torch.zeros((H,), dtype=torch.float32, device=q.device),)
    if dq.numel() == 0 or dk.numel() == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), *dsinks
    _check_grid(B)
    lse = lse.to(torch.float32).contiguous()  # (H, total_q)
    block_d = _block_d(D)
    delta, partials = _varlen_delta(out, grad_out, block_d, lse, sinks32)  # (H, total_q)
    lse2, qk_scale, extra["cap_out"] = base2_lse(lse, scale, extra["softcap"])
    if sinks is not None:
        dsinks = (partials.sum(1),)  # (H, blocks) -> (H,), a fixed-order reduction

    group = H // Hkv
    splits = (
        dkdv_splits(B, Hkv, group, max_seqlen_k, q.device) if dkdv_split is None else dkdv_split
    )
    if group % splits:
        raise ValueError(
            f"dkdv_split={splits} must divide the GQA group {group} (H={H}, Hkv={Hkv})"
        )
    dk_out, dv_out = _varlen_dkdv_targets(dk, dv, splits)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=bool(causal), IS_VARLEN=True, **extra)
    common["DOT_PRECISION"] = _dot_precision(q.dtype)
    strides = tuple(s for t in (q, k, v, grad_out) for s in _packed_strides(t))
    tail = (scale, qk_scale, _bucket(max_seqlen_q), _bucket(max_seqlen_k))
    tma_dkdv = _use_descriptors(use_tma, "dkdv", block_d, q, k, v, grad_out, dk_out, dv_out)

    def dkdv_grid(meta):
        return (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), Hkv * splits, B)

    _dkdv[dkdv_grid](
        q, k, v, grad_out, lse2, delta, dk_out, dv_out, cu_seqlens_q, cu_seqlens_k,
        *strides, *_packed_strides(dk_out), *_packed_strides(dv_out),
        H, Hkv, group, splits, total_q, total_k, *tail, **common,
        SCORES_AS_FORWARD=INTERPRET, USE_TMA=tma_dkdv,
    )  # fmt: skip
    if splits > 1:  # (total_k, Hkv * splits, D) partials -> (total_k, Hkv, D), in a fixed order
        for out_, parts in ((dk, dk_out), (dv, dv_out)):
            out_.copy_(functools.reduce(torch.add, parts.unflatten(1, (Hkv, splits)).unbind(2)))

    def dq_grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), H, B)

    tma_dq = _use_descriptors(use_tma, "dq", block_d, q, k, v, grad_out, dq)
    _dq[dq_grid](
        q, k, v, grad_out, lse2, delta, dq, cu_seqlens_q, cu_seqlens_k,
        *strides, *_packed_strides(dq),
        H, group, total_q, total_k, *tail, **common, USE_TMA=tma_dq,
    )  # fmt: skip
    return dq, dk, dv, *dsinks


def _varlen_delta(
    out: torch.Tensor,
    grad_out: torch.Tensor,
    block_d: int,
    lse: torch.Tensor,
    sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """delta = rowsum(dO * O) as (H, total_q) fp32: the preprocess kernel over the packed rows
    as one sequence (a row's delta does not depend on where its sequence starts); with sinks
    (H,) fp32 also dsinks' partials (H, row blocks), else None."""
    total_q, H, D = out.shape
    delta = torch.empty((H, total_q), dtype=torch.float32, device=out.device)
    pre_block_m = 64 if INTERPRET else 128
    n_pre = triton.cdiv(total_q, pre_block_m)
    partials = None if sinks is None else torch.empty((H, n_pre), device=out.device)
    sink_args = {} if sinks is None else dict(Lse=lse, Sinks=sinks, DSinks=partials)
    bwd_preprocess_kernel[(n_pre, H, 1)](
        out, grad_out, delta, *_packed_strides(out), *_packed_strides(grad_out), H, total_q,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_block_m, **sink_args,
    )  # fmt: skip
    return delta, partials


def _varlen_dkdv_targets(
    dk: torch.Tensor, dv: torch.Tensor, splits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the varlen dK/dV pass writes: dk, dv themselves for one slice per KV head, else fp32
    partials (total_k, Hkv * splits, D)."""
    if splits == 1:
        return dk, dv
    total_k, Hkv, D = dk.shape
    return tuple(
        torch.empty((total_k, Hkv * splits, D), dtype=torch.float32, device=dk.device)
        for _ in range(2)
    )
