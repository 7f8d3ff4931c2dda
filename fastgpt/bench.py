"""Attention benchmark: fastgpt's kernels beside their peers, timed in the same run.

    fastgpt bench                       # GPU: flash-attn's configuration, bf16 and fp16
    fastgpt bench --tiny                # CPU smoke run at tiny sizes (the CI path)
    fastgpt bench --device cpu --dtypes fp32 --seqlens 256,1024 --head-dims 64 --tokens 1024

Providers: fastgpt-triton, fastgpt-cpp, reference (fastgpt's backends, through fastgpt.attention),
torch SDPA per backend (sdpa-flash, sdpa-efficient, sdpa-cudnn), FlexAttention with a causal block
mask (flex) and flash-attn's flash_attn_func when installed (flash-attn). A provider that cannot run
a configuration (missing backend, unsupported dtype, out of memory) gets an error record instead of
a time, so every run says what it could not measure.

Timing: on CUDA the median of triton.testing.do_bench (CUDA events, L2 flushed between runs) after
an untimed warm-up call; on CPU the median of time.perf_counter over repeated calls. FLOPs are
counted as flash-attn does: 4 * B * H * Tq * Tk * D for the forward, halved when causal, x2.5 for
the backward, x3.5 for forward + backward. Decode (Tq = 1 against a KV cache) is reported in GB/s
(q, k, v read once, out written once) beside the device's measured copy bandwidth.

Results: <out>/<machine>-<date>.json (machine, versions, git commit, every number; rewritten after
each configuration, so an interrupted run keeps what it measured) and PNG plots beside it.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}  # flash-attn's counting
MIB = 2**20

# Dense bf16 tensor-core peaks (datasheet, no sparsity) for the training benchmark's MFU.
# Matched in order against torch.cuda.get_device_name: the SXM H100 reports "NVIDIA H100 80GB HBM3".
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "A100": 312.0,
    "L4": 121.0,
}


# ---------------------------------------------------------------------------------------------
# Providers: (q, k, v, causal) -> out, each in its own layout.


@dataclass(frozen=True)
class Provider:
    name: str
    call: Callable[[Tensor, Tensor, Tensor, bool], Tensor]
    layout: str = "bhtd"  # "bthd" for flash-attn's (B, T, H, D)
    fastgpt: bool = False  # one of ours (speed-ups are reported for these over the others)


def _fastgpt(backend: str) -> Callable:
    import fastgpt

    return lambda q, k, v, causal: fastgpt.attention(q, k, v, causal=causal, backend=backend)


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
            found[f"fastgpt-{name}"] = Provider(f"fastgpt-{name}", _fastgpt(name), fastgpt=True)
    found["reference"] = Provider("reference", _fastgpt("reference"))
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


# ---------------------------------------------------------------------------------------------
# Timing and memory.


def _sync(device: torch.device) -> None:
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


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Warm fn up; on CUDA return the peak memory one call allocates above what is held before.

    On CUDA fn runs twice: the first call (compilation, autotuning) is left out of the peak.
    """
    fn()
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
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


def _error_text(exc: BaseException) -> str:
    if _is_oom(exc):
        return "out of memory"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def _relative_error(p: Provider, out: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool):
    """||out - ref|| / ||ref|| on the first batch element, against fastgpt's reference in fp32."""
    from fastgpt.reference import reference_attention

    def bhtd(t):
        return (t if p.layout == "bhtd" else t.transpose(1, 2))[:1].detach().float()

    ref = reference_attention(bhtd(q), bhtd(k), bhtd(v), causal)
    diff = (bhtd(out) - ref).norm() / ref.norm().clamp_min(1e-30)
    return float(diff)


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
        record["peak_mib"] = _peak_mib(fn, device)  # also the untimed warm-up
        if check:
            with torch.no_grad():
                record["rel_err"] = _relative_error(p, p.call(q, k, v, causal), q, k, v, causal)
        record["ms"] = time_ms(fn, device, warmup_ms, rep_ms, grads)
    except Exception as exc:  # any provider may fail on any configuration: record why, go on
        record["error"] = _error_text(exc)
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
    return _fastgpt(name)


def _rss_mib() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    return {
        key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024
        for key in ("VmRSS", "VmHWM")
    }


def _rss_child(name: str, b: int, h: int, t: int, d: int, causal: bool) -> None:
    """Runs in a fresh process: print the peak-RSS rise (MiB) of one forward + backward."""
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
        f"from fastgpt.bench import _rss_child; _rss_child({name!r}, {b}, {h}, {t}, {d}, {causal})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory run of {name} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["rise_mib"]


# ---------------------------------------------------------------------------------------------
# Machine description.


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit() -> str | None:
    """HEAD of the checkout fastgpt runs from, '+dirty' when tracked files differ from it.

    A copy without .git (e.g. a working tree shipped to a GPU machine) is named by the
    environment variable FASTGPT_GIT_COMMIT when set, else None.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(
            a, cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        head = run("git", "rev-parse", "HEAD").stdout.strip()
        dirty = run("git", "status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("FASTGPT_GIT_COMMIT") or None
    return head + ("+dirty" if dirty else "")


def machine_info(device: torch.device) -> dict:
    import triton

    import fastgpt

    info = {
        "device": device.type,
        "name": device_name(device),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "fastgpt": getattr(fastgpt, "__version__", None),
        "fastgpt_backends": fastgpt.available_backends(device),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
        )
    with contextlib.suppress(Exception):
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    return info


def peak_bf16_tflops(name: str) -> float | None:
    """Datasheet dense bf16 peak for a GPU name, None when unknown."""
    for key, value in PEAK_BF16_TFLOPS.items():  # ordered: "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return value
    return None


def results_path(out_dir: Path, device: torch.device, suffix: str = "") -> Path:
    short = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return out_dir / f"{slug(short)}-{date}{suffix}.json"


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)  # atomic: a run killed mid-write leaves the previous complete file


# ---------------------------------------------------------------------------------------------
# Derived numbers: TFLOP/s, GB/s, speed-ups.


def speedups(records: list[dict], providers: dict[str, bool]) -> list[dict]:
    """Speed-up of each fastgpt provider over each other provider, per configuration and mode."""
    by_config: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["ms"] is not None:
            key = (r["dtype"], r["d"], r["tq"], r["causal"], r["mode"])
            by_config.setdefault(key, {})[r["provider"]] = r["ms"]
    rows = []
    for (dtype, d, t, causal, mode), times in by_config.items():
        for ours in (n for n in times if providers.get(n)):
            for peer in (n for n in times if n != ours and not providers.get(n)):
                config = dict(dtype=dtype, d=d, tq=t, causal=causal, mode=mode)
                rows.append(
                    dict(fastgpt=ours, peer=peer, **config, speedup=times[peer] / times[ours])
                )
    return rows


def _kernel_configs(args) -> list[tuple[str, int, bool]]:
    """(dtype, head dim, causal) groups, most important first (the run may stop on budget)."""
    causal = {"both": (True, False), "true": (True,), "false": (False,)}[args.causal]
    return [(dt, d, c) for dt in args.dtypes for c in causal for d in args.head_dims]


def run_kernels(args, provs, device, results, path, started) -> None:
    timing = (args.warmup_ms, args.rep_ms)
    for dtype_name, d, causal in _kernel_configs(args):
        h = args.hidden // d
        for t in args.seqlens:
            label = f"{dtype_name} D={d} causal={causal} T={t}"
            if time.perf_counter() - started > args.budget_s:
                results["skipped"].append(label)
                continue
            b = max(1, args.tokens // t)
            shape = dict(batch=b, heads=h, kv_heads=h, tq=t, tk=t, d=d)
            for p in provs.values():
                for mode in args.modes:
                    check = mode == "fwd" and t == args.seqlens[0]
                    dtype = DTYPES[dtype_name]
                    r = measure(p, shape, dtype, causal, mode, device, *timing, check=check)
                    if r["ms"] is not None:
                        flops = attention_flops(b, h, t, t, d, causal, mode)
                        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
                    results["kernel"].append({**r, "dtype": dtype_name, "causal": causal, **shape})
            print(f"  {label}: done ({time.perf_counter() - started:.0f} s)", flush=True)
            write_json(path, results)


def run_decode(args, provs, device, results, path, started) -> None:
    dtype = DTYPES[args.dtypes[0]]
    d = args.decode_head_dim
    h = args.hidden // d
    hkv = args.decode_kv_heads or h
    elem = torch.finfo(dtype).bits // 8
    timing = (args.warmup_ms, args.rep_ms)
    for tk in args.decode_lens:
        if time.perf_counter() - started > args.budget_s:
            results["skipped"].append(f"decode Tk={tk}")
            continue
        shape = dict(batch=args.decode_batch, heads=h, kv_heads=hkv, tq=1, tk=tk, d=d)
        nbytes = (2 * args.decode_batch * hkv * tk * d + 2 * args.decode_batch * h * d) * elem
        for p in provs.values():
            check = tk == args.decode_lens[0]
            r = measure(p, shape, dtype, True, "fwd", device, *timing, check=check)
            if r["ms"] is not None:
                r["gbps"] = nbytes / (r["ms"] * 1e-3) / 1e9
                r["copy_fraction"] = r["gbps"] / results["copy_gbps"]
            results["decode"].append({**r, "dtype": args.dtypes[0], "causal": True, **shape})
        write_json(path, results)
    print(f"  decode: done ({time.perf_counter() - started:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------------
# Reports: a short markdown table and PNG plots.


def format_number(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def markdown_table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def kernel_table(results: dict, dtype: str, d: int, causal: bool, mode: str) -> str | None:
    want = (dtype, d, causal, mode)
    recs = [r for r in results["kernel"] if (r["dtype"], r["d"], r["causal"], r["mode"]) == want]
    names = list(dict.fromkeys(r["provider"] for r in recs if r["ms"] is not None))
    if not names:
        return None
    seqlens = sorted({r["tq"] for r in recs})
    cell = {(r["provider"], r["tq"]): r for r in recs}
    ms = {key: r["ms"] for key, r in cell.items() if r["ms"] is not None}
    # Speed-up columns: each fastgpt provider against torch SDPA's flash backend, the target.
    ours = [n for n in names if n.startswith("fastgpt-")] if "sdpa-flash" in names else []
    rows = [["T", *names, *(f"{n.removeprefix('fastgpt-')} / sdpa-flash" for n in ours)]]
    for t in seqlens:
        row = [str(t)]
        for n in names:
            r = cell.get((n, t))
            row.append(format_number(r["tflops"]) if r and r["ms"] is not None else "-")
        for n in ours:
            ok = (n, t) in ms and ("sdpa-flash", t) in ms
            row.append(f"{ms['sdpa-flash', t] / ms[n, t]:.2f}x" if ok else "-")
        rows.append(row)
    title = f"{dtype}, D={d}, {'causal' if causal else 'non-causal'}, {mode}: TFLOP/s"
    return f"{title}\n\n{markdown_table(rows)}"


def memory_table(results: dict, dtype: str, d: int, causal: bool, mode: str) -> str | None:
    """Peak memory one call allocates (CUDA only), per provider and T."""
    want = (dtype, d, causal, mode)
    recs = [
        r
        for r in results["kernel"]
        if (r["dtype"], r["d"], r["causal"], r["mode"]) == want and r["peak_mib"] is not None
    ]
    if not recs:
        return None
    names = list(dict.fromkeys(r["provider"] for r in recs))
    cell = {(r["provider"], r["tq"]): r["peak_mib"] for r in recs}
    rows = [["T", *names]]
    for t in sorted({r["tq"] for r in recs}):
        rows.append([str(t), *(f"{cell[n, t]:.0f}" if (n, t) in cell else "-" for n in names)])
    title = f"{dtype}, D={d}, {'causal' if causal else 'non-causal'}, {mode}: peak MiB above inputs"
    return f"{title}\n\n{markdown_table(rows)}"


def decode_table(results: dict) -> str | None:
    recs = results["decode"]
    names = list(dict.fromkeys(r["provider"] for r in recs if r["ms"] is not None))
    if not names:
        return None
    cell = {(r["provider"], r["tk"]): r for r in recs}
    rows = [["Tk", *names]]
    for tk in sorted({r["tk"] for r in recs}):
        row = [str(tk)]
        for n in names:
            r = cell.get((n, tk))
            ok = r and r["ms"] is not None
            row.append(
                f"{format_number(r['gbps'])} ({100 * r['copy_fraction']:.0f}%)" if ok else "-"
            )
        rows.append(row)
    title = f"decode (Tq=1): GB/s (% of copy bandwidth {results['copy_gbps']:.0f} GB/s)"
    return f"{title}\n\n{markdown_table(rows)}"


def accuracy_warnings(results: dict, limit: float = 2e-2) -> list[str]:
    """Forward outputs further than `limit` (relative) from the fp32 reference."""
    return [
        f"WARNING: {r['provider']} {r['dtype']} D={r['d']} T={r['tq']} causal={r['causal']}: "
        f"relative error {r['rel_err']:.2e} against the reference"
        for r in results["kernel"] + results["decode"]
        if r.get("rel_err") is not None and not r["rel_err"] < limit  # NaN is caught too
    ]


def summary(results: dict, full: bool) -> str:
    """Markdown tables: every configuration when full, else the headline ones."""
    a = results["args"]
    m = results["machine"]
    parts = [f"{m['name']}, torch {m['torch']}, triton {m['triton']}, commit {m['git_commit']}"]
    parts += accuracy_warnings(results)
    modes = a["modes"] if full else [m for m in ("fwd", "fwd_bwd") if m in a["modes"]]
    for dtype_name in a["dtypes"] if full else a["dtypes"][:1]:
        for causal in (True, False) if full else (True,):
            for d in a["head_dims"]:
                tables = [kernel_table(results, dtype_name, d, causal, m) for m in modes]
                if full and "fwd_bwd" in modes:
                    tables.append(memory_table(results, dtype_name, d, causal, "fwd_bwd"))
                parts += filter(None, tables)
    parts.append(decode_table(results) or "")
    return "\n\n".join(p for p in parts if p)


def plot(results: dict, path: Path) -> list[Path]:
    """TFLOP/s vs T per provider (one panel per dtype, D, causal, mode) and decode GB/s vs Tk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    recs = [r for r in results["kernel"] if r["ms"] is not None]
    groups = sorted({(r["dtype"], r["d"]) for r in recs})
    cols = sorted(
        {(r["causal"], r["mode"]) for r in recs}, key=lambda c: (not c[0], MODES.index(c[1]))
    )
    names = list(dict.fromkeys(r["provider"] for r in recs))
    if groups and cols:
        size = (4 * len(cols), 3.2 * len(groups))
        fig, axes = plt.subplots(len(groups), len(cols), figsize=size, squeeze=False)
        panels = [(i, j, g, c) for i, g in enumerate(groups) for j, c in enumerate(cols)]
        for i, j, (dtype_name, d), (causal, mode) in panels:
            ax = axes[i][j]
            for name in names:
                want = (name, dtype_name, d, causal, mode)
                pts = sorted(
                    (r["tq"], r["tflops"])
                    for r in recs
                    if (r["provider"], r["dtype"], r["d"], r["causal"], r["mode"]) == want
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{dtype_name} D={d} {'causal' if causal else 'full'} {mode}", fontsize=9)
            ax.set_xlabel("T")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(results["machine"]["name"], fontsize=10)
        fig.tight_layout()
        written.append(path.with_name(path.stem + "-kernels.png"))
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    dec = [r for r in results["decode"] if r["ms"] is not None]
    if dec:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["provider"] for r in dec):
            pts = sorted((r["tk"], r["gbps"]) for r in dec if r["provider"] == name)
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.axhline(results["copy_gbps"], color="k", ls="--", lw=1, label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set(xlabel="keys (Tk)", ylabel="GB/s", title=f"decode, {results['machine']['name']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(path.with_name(path.stem + "-decode.png"))
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------
# Command line.


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


# Defaults per run: "gpu" is flash-attn's benchmark configuration (hidden 2048, 16k tokens a
# batch); "cpu" a size a laptop finishes in minutes; "tiny" the smoke test's.
PROFILES = {
    "gpu": dict(
        dtypes=["bf16", "fp16"],
        head_dims=[128, 64],
        hidden=2048,
        tokens=16384,
        seqlens=[512 << i for i in range(6)],  # 512 .. 16k
        decode_lens=[1024 << i for i in range(8)],  # 1k .. 128k
        decode_head_dim=128,
        warmup_ms=25,
        rep_ms=100,
    ),
    "cpu": dict(
        dtypes=["fp32"],
        head_dims=[64],
        hidden=512,
        tokens=1024,
        seqlens=[128, 256, 512],
        decode_lens=[16384, 65536],  # KV of 32 and 128 MiB: beyond the caches
        decode_head_dim=64,
        warmup_ms=25,
        rep_ms=100,
    ),
    "tiny": dict(
        dtypes=["fp32"],
        head_dims=[16],
        hidden=32,
        tokens=64,
        seqlens=[16, 32],
        decode_lens=[64, 128],
        decode_head_dim=16,
        warmup_ms=1,
        rep_ms=5,
    ),
}


def _jsonable(value):
    if isinstance(value, Path | torch.device):
        return str(value)
    return None if isinstance(value, float) and math.isinf(value) else value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fastgpt bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--dtypes", type=_names, default=None, help="comma list of bf16,fp16,fp32")
    ap.add_argument("--head-dims", type=_ints, default=None, help="default 128,64")
    ap.add_argument("--hidden", type=int, default=None, help="heads = hidden / D (default 2048)")
    ap.add_argument("--tokens", type=int, default=None, help="batch = tokens / T (default 16384)")
    ap.add_argument("--seqlens", type=_ints, default=None, help="default 512,...,16384")
    ap.add_argument("--modes", type=_names, default=list(MODES), help="fwd,bwd,fwd_bwd")
    ap.add_argument("--causal", choices=("both", "true", "false"), default="both")
    ap.add_argument("--providers", type=_names, default=None, help="default: all that import")
    ap.add_argument("--skip-providers", type=_names, default=[], help="leave these out")
    ap.add_argument("--decode-lens", type=_ints, default=None, help="KV lengths, default 1k..128k")
    ap.add_argument("--decode-head-dim", type=int, default=None, help="default 128")
    ap.add_argument("--decode-kv-heads", type=int, default=None, help="default: = heads (MHA)")
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--no-kernel", action="store_true", help="skip the prefill/training shapes")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode benchmark")
    ap.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up (default 25)")
    ap.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition (default 100)")
    ap.add_argument(
        "--budget-s", type=float, default=float("inf"), help="start no new shape after this long"
    )
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--full-table", action="store_true", help="print every configuration")
    ap.add_argument(
        "--from-json", type=Path, default=None, help="redraw the plots and tables of a results file"
    )
    args = ap.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.device = torch.device(args.device)
    profile = "tiny" if args.tiny else "cpu" if args.device.type == "cpu" else "gpu"
    out = Path("bench/results/tiny" if args.tiny else "bench/results")
    defaults = {**PROFILES[profile], "out": out}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in args.dtypes:
        if name not in DTYPES:
            ap.error(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    for mode in args.modes:
        if mode not in MODES:
            ap.error(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    for d in args.head_dims + [args.decode_head_dim]:
        if d <= 0 or args.hidden % d:
            ap.error(f"hidden size {args.hidden} is not a multiple of head dim {d}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        pngs = [] if args.no_plot else plot(results, args.from_json)
        print("\n".join(["", *map(str, pngs), "", summary(results, args.full_table)]))
        return 0
    device = args.device
    provs = available_providers(device)
    if args.providers is not None:
        unknown = [n for n in args.providers if n not in provs]
        if unknown:
            have = ", ".join(provs)
            print(f"not available here: {', '.join(unknown)} (have {have})", file=sys.stderr)
            return 2
        provs = {n: provs[n] for n in args.providers}
    provs = {n: p for n, p in provs.items() if n not in args.skip_providers}
    path = results_path(args.out, device, "-tiny" if args.tiny else "")
    started = time.perf_counter()
    results = {
        "schema": 1,
        "machine": machine_info(device),
        "args": {k: _jsonable(v) for k, v in vars(args).items()},
        "providers": list(provs),
        "flops": "4*B*H*Tq*Tk*D, x0.5 causal, x2.5 bwd, x3.5 fwd_bwd (flash-attn)",
        "copy_gbps": None,
        "kernel": [],
        "decode": [],
        "speedups": [],
        "skipped": [],
        "complete": False,
    }
    print(
        f"fastgpt bench on {results['machine']['name']}: {', '.join(provs)} -> {path}", flush=True
    )
    copy_bytes = 2**30 if device.type == "cuda" else 64 * MIB
    results["copy_gbps"] = copy_bandwidth_gbps(device, copy_bytes, args.warmup_ms, args.rep_ms)
    print(f"  copy bandwidth: {results['copy_gbps']:.0f} GB/s", flush=True)
    # Decode first: it is quick, and the run may stop on budget before the last kernel shapes.
    if not args.no_decode:
        run_decode(args, provs, device, results, path, started)
    if not args.no_kernel:
        run_kernels(args, provs, device, results, path, started)
    results["speedups"] = speedups(results["kernel"], {n: p.fastgpt for n, p in provs.items()})
    results["complete"] = not results["skipped"]
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_json(path, results)
    print(summary(results, full=True) if args.full_table else "")
    pngs = [] if args.no_plot else plot(results, path)
    print("\n".join(["", *map(str, [path, *pngs]), ""]))
    if results["skipped"]:
        print(f"skipped on budget: {', '.join(results['skipped'])}")
    print(summary(results, full=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
