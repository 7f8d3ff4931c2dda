"""Variable-length attention: packed sequences beside padded dense attention and a document mask.

One batch of causal sequences whose lengths are drawn uniformly from [lo, hi] (seed 0) until they
hold `tokens` tokens (the last one cut to fit), attended by each provider in its own layout, built
from the same packed q, k, v before timing:

    varlen-<backend>  fastgpt.attention_varlen on the packed (total, H, D), for each backend with
                      varlen kernels here (fastgpt.varlen.VARLEN_BACKENDS)
    sdpa-padded       F.scaled_dot_product_attention(is_causal=True) on the batch right-padded to
                      the longest sequence, (B, H, max_len, D); padded rows are computed and wasted
    cpp-padded        fastgpt.attention(backend="cpp") on that padded batch (when the C++ extension
                      is built)
    flex-document     FlexAttention on (1, H, total, D) with a causal document BlockMask (CUDA only,
                      compiled; the mask is built before timing)

The padded providers get their inputs already padded (the padding copies are not timed): the best
case for them. FLOPs are the useful ones, the same for every provider: per sequence the causal
4 H L^2 D / 2, x3.5 for forward + backward (flash-attn's count), so padding's waste shows as a
lower TFLOP/s. Each provider's forward output on the real tokens is checked against fastgpt's
float32 reference (rel_err).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt.bench.machine import write_json
from fastgpt.bench.timing import (
    DTYPES,
    FLOP_FACTOR,
    peak_mib,
    recording_failure,
    relative_error,
    time_ms,
)

VARLEN_MODES = ("fwd", "fwd_bwd")
# Per profile: (lowest, highest) sequence length and tokens per batch.
VARLEN_PROFILES = {"gpu": ((128, 4096), 16384), "cpu": ((64, 1024), 4096), "tiny": ((3, 20), 64)}


def length_mix(tokens: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Sequence lengths uniform in [lo, hi] adding up to exactly `tokens` (the last one cut)."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - tokens
    return [n for n in lengths if n > 0]


def useful_flops(lengths: list[int], heads: int, d: int, mode: str) -> float:
    """Causal attention FLOPs of each sequence alone (flash-attn's count), summed."""
    return sum(4 * heads * n * n * d * 0.5 for n in lengths) * FLOP_FACTOR[mode]


@dataclass
class Packed:
    """The batch every provider starts from: packed q, k, v (total, H, D) and the lengths."""

    q: Tensor
    k: Tensor
    v: Tensor
    lengths: list[int]

    @property
    def cu_seqlens(self) -> Tensor:
        from fastgpt.varlen import cu_seqlens_from_lengths

        return cu_seqlens_from_lengths(self.lengths, device=self.q.device)

    @property
    def rows(self) -> Tensor:
        """(total,) rows of the padded (B max_len) layout that hold the real tokens."""
        longest = max(self.lengths)
        return torch.cat([b * longest + torch.arange(n) for b, n in enumerate(self.lengths)]).to(
            self.q.device
        )


# A provider: packed batch -> (leaf inputs in its layout, fn() -> out, out -> packed (total, H, D)).
Setup = Callable[[Packed], tuple[list[Tensor], Callable[[], Tensor], Callable[[Tensor], Tensor]]]


def _varlen(backend: str) -> Setup:
    def setup(p: Packed):
        from fastgpt.varlen import attention_varlen

        q, k, v = (t.detach().clone() for t in (p.q, p.k, p.v))
        cu, longest = p.cu_seqlens, max(p.lengths)

        def fn():
            return attention_varlen(q, k, v, cu, cu, longest, longest, backend=backend)

        return [q, k, v], fn, lambda out: out

    return setup


def _padded(attend: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Setup:
    """A dense attention on the right-padded (B, H, max_len, D) batch."""

    def setup(p: Packed):
        B, longest, rows = len(p.lengths), max(p.lengths), p.rows

        def pad(t: Tensor) -> Tensor:  # (total, H, D) -> (B, H, max_len, D)
            full = t.new_zeros(B * longest, *t.shape[1:]).index_copy(0, rows, t.detach())
            return full.view(B, longest, *t.shape[1:]).transpose(1, 2).contiguous()

        q, k, v = pad(p.q), pad(p.k), pad(p.v)

        def unpad(out: Tensor) -> Tensor:
            return out.transpose(1, 2).flatten(0, 1).index_select(0, rows)  # (total, H, D)

        return [q, k, v], lambda: attend(q, k, v), unpad

    return setup


def _flex_document(p: Packed):
    """FlexAttention on the packed (1, H, total, D) with a causal document mask (compiled)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = p.q.shape[0]
    document = torch.repeat_interleave(
        torch.arange(len(p.lengths), device=p.q.device),
        torch.tensor(p.lengths, device=p.q.device),
    )  # (total,) document of each token

    def visible(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (kv_idx <= q_idx)

    mask = create_block_mask(visible, None, None, total, total, device=p.q.device)
    compiled = torch.compile(flex_attention)
    q, k, v = (t.detach().transpose(0, 1)[None].contiguous() for t in (p.q, p.k, p.v))
    return [q, k, v], lambda: compiled(q, k, v, block_mask=mask), lambda out: out[0].transpose(0, 1)


def varlen_providers(device: torch.device) -> dict[str, Setup]:
    """Every varlen-case provider that can run here, fastgpt's first."""
    import fastgpt
    from fastgpt.varlen import VARLEN_BACKENDS

    # On CPU, Triton runs interpreted: a check of its numbers, not a peer to time.
    skip = ("triton",) if device.type == "cpu" else ()
    backends = [b for b in fastgpt.available_backends(device) if b not in skip]
    found: dict[str, Setup] = {f"varlen-{b}": _varlen(b) for b in VARLEN_BACKENDS if b in backends}

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    found["sdpa-padded"] = _padded(sdpa)
    if "cpp" in backends and device.type == "cpu":
        found["cpp-padded"] = _padded(
            lambda q, k, v: fastgpt.attention(q, k, v, causal=True, backend="cpp")
        )
    if device.type == "cuda":
        found["flex-document"] = _flex_document
    return found


def measure_varlen(
    name: str, setup: Setup, packed: Packed, mode: str, device, timing, check: Tensor | None
) -> dict:
    """Time one provider in one mode; the record carries the error instead when it cannot run."""
    record = {"provider": name, "mode": mode, "ms": None, "peak_mib": None, "error": None}
    with recording_failure(record, device):
        leaves, forward, to_packed = setup(packed)
        if check is not None:
            with torch.no_grad():
                out = to_packed(forward()).float()  # (total, H, D)
            record["rel_err"] = relative_error(out, check)
        fn, grads = forward, None
        if mode == "fwd_bwd":
            grads = [t.requires_grad_() for t in leaves]
            grad_out = torch.randn_like(forward())

            def fn():
                forward().backward(grad_out)

        record["peak_mib"] = peak_mib(fn, device)  # also the untimed warm-up
        record["ms"] = time_ms(fn, device, *timing, grads)
    return record


def packed_batch(args, device: torch.device) -> tuple[Packed, dict]:
    """The run's batch (seed 0) and the fields every varlen record shares."""
    lo, hi = args.varlen_lengths
    lengths = length_mix(args.varlen_tokens, lo, hi)
    d = args.head_dims[0]
    heads, dtype = args.hidden // d, DTYPES[args.dtypes[0]]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(sum(lengths), heads, d, device=device, dtype=dtype, generator=gen)
        for _ in range(3)
    )
    shape = dict(dtype=args.dtypes[0], heads=heads, d=d, tokens=sum(lengths), lo=lo, hi=hi)
    shape |= dict(sequences=len(lengths), max_len=max(lengths))
    shape["padded_tokens"] = len(lengths) * max(lengths)
    return Packed(q, k, v, lengths), shape


def run_varlen(run) -> None:
    """The varlen case: every varlen provider and mode on one length mix, into results."""
    args, device, results = run.args, run.device, run.results
    packed, shape = packed_batch(args, device)
    results["varlen_lengths"] = packed.lengths
    from fastgpt.reference import reference_attention_varlen

    cu = packed.cu_seqlens
    qkv = (t.float() for t in (packed.q, packed.k, packed.v))
    check = reference_attention_varlen(*qkv, cu, cu)[0]  # (total, H, D)
    providers = varlen_providers(device)
    if args.varlen_providers is not None:
        providers = {n: s for n, s in providers.items() if n in args.varlen_providers}
    for name, setup in providers.items():
        if run.over_budget(f"varlen {name}"):
            continue
        for mode in VARLEN_MODES:
            timing = (args.warmup_ms, args.rep_ms)
            reference = check if mode == "fwd" else None
            r = measure_varlen(name, setup, packed, mode, device, timing, reference)
            if r["ms"] is not None:
                flops = useful_flops(packed.lengths, shape["heads"], shape["d"], mode)
                r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
            results["varlen"].append({**r, **shape})
        write_json(run.path, results)
    print(f"  varlen: done ({run.seconds():.0f} s)", flush=True)
