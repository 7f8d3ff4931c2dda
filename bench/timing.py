"""Timing and memory: one call timed, one provider measured on one configuration, CPU peak memory.

On CUDA the median of triton.testing.do_bench (CUDA events, L2 flushed between runs) after an
untimed warm-up call; on CPU the median of time.perf_counter over repeated calls. FLOPs are
counted as flash-attn does (attention_flops). CPU peak memory is the rise of a fresh process's
resident set over one call (peak_rss_rise_mib).
"""

import contextlib
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt.bench.providers import Provider, fastgpt_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}  # flash-attn's counting
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# Timing and memory.


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup_ms: float,
    rep_ms: float,
    grad_to_none: list[Tensor] | None = None,
) -> float:
    """Median milliseconds per call of fn (already warmed up by the caller on CPU)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"
        )
    times: list[float] = []
    deadline = time.perf_counter() + (warmup_ms + rep_ms) / 1e3
    while True:
        for t in grad_to_none or []:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        # At least 3 calls, unless one call alone outlasts the whole budget (slow paths).
        if time.perf_counter() > deadline and (len(times) >= 3 or sum(times) > rep_ms):
            break
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Warm fn up; on CUDA return the peak memory one call allocates above what is held before.

    On CUDA fn runs twice: the first call (compilation, autotuning) is left out of the peak.
    """
    fn()
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MIB


def copy_bandwidth_gbps(
    device: torch.device, nbytes: int, warmup_ms: float, rep_ms: float
) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written, in GB/s."""
    n = nbytes // 4
    src = torch.randn(n, device=device)  # random data, never zeros
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup_ms, rep_ms)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(
    device: torch.device, dtype: torch.dtype, n: int, warmup_ms: float, rep_ms: float
) -> float:
    """Measured rate of an n x n x n matrix product on random data, TFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # untimed first call (library handles, kernel choice)
    ms = time_ms(lambda: a @ b, device, warmup_ms, rep_ms)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def attention_flops(b: int, h: int, tq: int, tk: int, d: int, causal: bool, mode: str) -> float:
    """FLOPs as flash-attn counts them (the causal half is exact only when Tq == Tk)."""
    return 4 * b * h * tq * tk * d * (0.5 if causal else 1.0) * FLOP_FACTOR[mode]


# ---------------------------------------------------------------------------------------------
# One measurement.


def _inputs(p: Provider, b, h, hkv, tq, tk, d, dtype, device, grad: bool) -> tuple[Tensor, ...]:
    def rand(heads, t):
        shape = (b, heads, t, d) if p.layout == "bhtd" else (b, t, heads, d)
        return torch.randn(shape, device=device, dtype=dtype).requires_grad_(grad)

    return rand(h, tq), rand(hkv, tk), rand(hkv, tk)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def error_text(exc: BaseException) -> str:
    """One short line for a results record: "out of memory", or the exception's type and text."""
    if _is_oom(exc):
        return "out of memory"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


@contextlib.contextmanager
def recording_failure(record: dict, device: torch.device) -> Iterator[None]:
    """Run one measurement: an exception lands in record["error"] (error_text's line) instead of
    ending the run, since any provider may fail on any configuration; CUDA's cached memory is
    released afterwards, failed or not."""
    try:
        yield
    except Exception as exc:
        record["error"] = error_text(exc)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| (ref of norm 0 counted as 1e-30), as a float."""
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _relative_error(p: Provider, out: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool):
    """||out - ref|| / ||ref|| on the first batch element, against fastgpt's reference in fp32."""
    from fastgpt.reference import reference_attention

    def bhtd(t):
        return (t if p.layout == "bhtd" else t.transpose(1, 2))[:1].detach().float()

    ref = reference_attention(bhtd(q), bhtd(k), bhtd(v), causal)
    return relative_error(bhtd(out), ref)


def measure(
    p: Provider,
    shape: dict,
    dtype: torch.dtype,
    causal: bool,
    mode: str,
    device: torch.device,
    warmup_ms: float,
    rep_ms: float,
    check: bool = False,
) -> dict:
    """Time one provider on one configuration; returns a record (error set when it cannot run)."""
    b, h, hkv, tq, tk, d = (shape[key] for key in ("batch", "heads", "kv_heads", "tq", "tk", "d"))
    record = {"provider": p.name, "mode": mode, "ms": None, "peak_mib": None, "error": None}
    try:
        q, k, v = _inputs(p, b, h, hkv, tq, tk, d, dtype, device, grad=mode != "fwd")
        if mode == "fwd":
            fn, grads = (lambda: p.call(q, k, v, causal)), None
        else:
            out = p.call(q, k, v, causal)
            grad_out = torch.randn_like(out)
            grads = [q, k, v]
            if mode == "bwd":
                fn = lambda: out.backward(grad_out, retain_graph=True)
            else:
                fn = lambda: p.call(q, k, v, causal).backward(grad_out)
        record["peak_mib"] = peak_mib(fn, device)  # also the untimed warm-up
        if check:
            with torch.no_grad():
                record["rel_err"] = _relative_error(p, p.call(q, k, v, causal), q, k, v, causal)
        record["ms"] = time_ms(fn, device, warmup_ms, rep_ms, grads)
    except Exception as exc:  # any provider may fail on any configuration: record why, go on
        record["error"] = error_text(exc)
    finally:
        q = k = v = out = grad_out = grads = fn = None  # noqa: F841  (free before the next one)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


# ---------------------------------------------------------------------------------------------
# CPU peak memory: the rise of the process's resident set over one call, in a fresh process.

CPU_PEERS = ("cpp", "sdpa", "reference")  # the CPU suite's providers (fastgpt's cpp first)


def cpu_attention(name: str) -> Callable[[Tensor, Tensor, Tensor, bool], Tensor]:
    """(q, k, v, causal) -> out for the CPU suite: fastgpt cpp, torch SDPA, fastgpt reference."""
    if name == "sdpa":  # torch's own pick on CPU: its flash kernel
        return lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name not in ("cpp", "reference"):
        raise ValueError(f"Unknown CPU provider {name!r}; expected one of {', '.join(CPU_PEERS)}.")
    return fastgpt_attention(name)


def _rss_mib() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    return {
        key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024
        for key in ("VmRSS", "VmHWM")
    }


def rss_child(name: str, b: int, h: int, t: int, d: int, causal: bool) -> None:
    """peak_rss_rise_mib's child, in a fresh process: print the peak-RSS rise (MiB) of fwd + bwd."""
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))  # (B, H, T, D)
    grad_out = torch.randn(b, h, t, d)
    fn = cpu_attention(name)
    before = _rss_mib()["VmRSS"]
    try:  # reset the high-water mark to the current resident set (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        before = _rss_mib()["VmHWM"]  # fall back: the rise above the peak so far
    fn(q, k, v, causal).backward(grad_out)
    print(json.dumps({"rise_mib": _rss_mib()["VmHWM"] - before}))


def peak_rss_rise_mib(name: str, b: int, h: int, t: int, d: int, causal: bool = True) -> float:
    """How far one forward + backward on CPU raises peak resident memory above the inputs, MiB.

    Measured in a fresh Python process (Linux /proc), so allocations of earlier work and memory
    the allocator kept from it cannot hide the peak.
    """
    code = (
        "from fastgpt.bench.timing import rss_child; "
        f"rss_child({name!r}, {b}, {h}, {t}, {d}, {causal})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory run of {name} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["rise_mib"]
