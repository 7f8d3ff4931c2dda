"""Ahead-of-time compile of every kernel and autotune config, and what ptxas says about each.

    python -m fastgpt.kernels.compile_check --arch 90 --arch 80 --dtype bf16   # JSON lines
    python -m fastgpt.kernels.compile_check --arch 90 --arch 80 --dtype bf16 \\
        --markdown bench/NOTES_triton.md                      # also rewrite the table there

One JSON line per (kernel, arch, dtype, head_dim, config): shared memory, registers, spill bytes,
whether wgmma is serialized, the tensor-core instruction kind (wgmma / mma.sync) and whether TMA
is used (see aot.ptxas_report). Exits 1 when a config the autotuner may choose fails to compile,
does not fit the shared memory, or, for 16-bit inputs, spills or serializes wgmma.

Results are cached per case under $FASTGPT_CACHE_DIR (default ~/.cache/fastgpt)/compile_check,
keyed by a hash of the kernel sources, the case and the Triton / ptxas versions, so a warm run
takes seconds. Cases run in parallel (--jobs, default the CPU count).
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import triton

from . import aot, configs
from .decode import decode_combine_kernel, decode_split_kernel, kvcache_split_kernel
from .flash_bwd import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel
from .flash_bwd_onepass import bwd_onepass_kernel
from .flash_fwd import attn_fwd_kernel

# Tuned kernels: (kind in configs.TABLES, jit function).
TUNED = {
    "fwd": attn_fwd_kernel,
    "dkdv": bwd_dkdv_kernel,
    "dq": bwd_dq_kernel,
    "decode": decode_split_kernel,
    "kvcache": kvcache_split_kernel,
    "onepass": bwd_onepass_kernel,
}
FUNCTIONS = {**TUNED, "preprocess": bwd_preprocess_kernel, "combine": decode_combine_kernel}
HEAD_DIMS = (16, 32, 64, 128, 256)  # BLOCK_D buckets: every padded head dim a launch can have
# What a compile depends on: the shared sources, plus a kind's own file where it has one (so a
# kernel added or changed in its own file leaves the other kinds' cached results valid).
_SOURCES = ("flash_fwd.py", "flash_bwd.py", "decode.py", "aot.py")
_OWN_SOURCES = {"onepass": ("flash_bwd_onepass.py",)}

# A case: (arch, kind, dtype, head_dim, (BLOCK_M, BLOCK_N, warps, stages), overrides or None).
TMA = {"USE_TMA": True}  # the sm_90 path of fwd, dK/dV and dQ: tiles through tensor descriptors
# Other load paths of a tuned kernel, each checked with every config like the table's own: the
# KV-cache kernel compiles paged with 16-key pages (a page per key) and is checked dense and
# with pages holding whole tiles too.
PATHS = {"kvcache": [{"PAGED": False, "PAGE_SIZE": 1}, {"PAGE_SIZE": 256}]}
VARLEN = {"IS_VARLEN": True}  # packed sequences (cu_seqlens): the same configs autotune over
VARLEN_KINDS = ("fwd", "dkdv", "dq")


def cases(arch: int, dtypes=("bf16", "fp32"), peak: bool = False):
    """Every (kernel, config) the autotuner of sm_<arch> may launch, dense and, for 16-bit inputs,
    the varlen twin of each fwd / dK/dV / dQ case and the attention variants at every config they
    may run with (table_variant_cases). 16-bit inputs: at every head-dim bucket. fp32 (one small
    config, slow full-precision dots; its varlen and variant twins are left out to keep the cold
    run short), and 16-bit inputs with `peak`: at the largest head dim of each table row group,
    where shared memory and registers peak (`peak` also leaves the varlen twins out)."""
    capability = (arch // 10, arch % 10)
    limit = configs.SMEM_LIMIT[capability]
    for case in dense_cases(arch, dtypes, peak):
        yield case
        arch, kind, dtype, block_d, row, override = case
        elem = aot.ELEMENT_SIZE[dtype]
        if kind not in VARLEN_KINDS or elem != 2 or peak:
            continue
        if row in configs.select_rows(kind, capability, block_d, elem, limit, varlen=True):
            yield arch, kind, dtype, block_d, row, {**(override or {}), **VARLEN}
    yield from table_variant_cases(arch, dtypes, peak)


def dense_cases(arch: int, dtypes=("bf16", "fp32"), peak: bool = False):
    """cases() without the varlen kernels."""
    capability = (arch // 10, arch % 10)
    limit = configs.SMEM_LIMIT[capability]
    for kind in TUNED:
        groups = configs.TABLES[kind][configs.family(capability)]
        for dtype in dtypes:
            elem = aot.ELEMENT_SIZE[dtype]
            dims = HEAD_DIMS if elem == 2 and not peak else tuple(max(g) for g in groups)
            for block_d in dims:
                for row in configs.select_rows(kind, capability, block_d, elem, limit):
                    yield arch, kind, dtype, block_d, row, None
                    for path in PATHS.get(kind, []):
                        yield arch, kind, dtype, block_d, row, path
                    tma_max = configs.TMA_MAX_BLOCK_D.get(kind, 0)
                    if arch >= 90 and elem == 2 and block_d <= tma_max:  # descriptor path
                        yield arch, kind, dtype, block_d, row, TMA
    for dtype in dtypes:  # untuned helpers: one fixed config each
        yield arch, "preprocess", dtype, 256, (128, 0, 4, 1), None
        yield arch, "combine", dtype, 256, (0, 0, 4, 1), None


# Code paths the table runs do not take (they compile causal, even head dims, positive scale,
# unspecialised lengths, group and dK/dV split; Triton specialises an int argument equal to 1):
# kernel -> constexpr overrides, each compiled with one small config.
# The attention variants: WINDOW and SOFTCAP constexprs, SINKS (not a kernel parameter: it makes
# Sinks, and in the preprocess pass Lse / DSinks, real pointers instead of None).
WINDOW, SOFTCAP, SINKS = {"WINDOW": True}, {"SOFTCAP": True}, {"SINKS": True}
ALL_VARIANTS = {**WINDOW, **SOFTCAP, **SINKS}
VARIANTS = {
    "fwd": [{"CAUSAL": False}, {"HEAD_DIM": 40}, {"SCALE_NEG": True}, {"Tq": 1, "Tk": 1}],
    "dkdv": [{"CAUSAL": False}, {"HEAD_DIM": 40}, {"Tq": 1, "GROUP": 1, "SPLITS": 1}],
    "dq": [{"CAUSAL": False}, {"HEAD_DIM": 40}, {"Tk": 1, "GROUP": 1}],
    "decode": [{"HEAD_DIM": 40}, {"SCALE_NEG": True}, {"GROUP": 1}],
    "kvcache": [{"HEAD_DIM": 40}, {"SCALE_NEG": True}, {"CAUSAL": False}, {"GROUP": 1, "Tq": 1}],
    "preprocess": [SINKS],
    "combine": [SINKS],
    "onepass": [{"CAUSAL": False}, {"HEAD_DIM": 40}, {"Tq": 1, "GROUP": 1}],
}
VARIANTS["kvcache"] += [
    {**WINDOW, **SOFTCAP},
    {**WINDOW, **SOFTCAP, "PAGED": False, "PAGE_SIZE": 1},
]
VARIANTS["fwd"] += [WINDOW, SOFTCAP, SINKS, ALL_VARIANTS, {**ALL_VARIANTS, "CAUSAL": False}]
for _kind in ("dkdv", "dq", "onepass"):
    VARIANTS[_kind] += [WINDOW, SOFTCAP, {**WINDOW, **SOFTCAP, "CAUSAL": False}]
for _kind in VARLEN_KINDS:  # varlen: non-causal and a padded head dim
    VARIANTS[_kind] += [{**VARLEN, "CAUSAL": False}, {**VARLEN, "HEAD_DIM": 40}]
    VARIANTS[_kind] += [{**VARLEN, **WINDOW, **SOFTCAP}]


# The attention variants at every autotune config they may run with (configs.select_rows(...,
# variants=True)), 16-bit: the combination with the most code, window + softcap (+ sinks in the
# forward), at every head-dim bucket on every load path; at the largest head dim of each table row
# group also its varlen twin and, on sm_90, window alone (its masked left-edge loop runs before
# the pipelined one: where ptxas serialized wgmma, which only sm_90 has).
WINDOW_SOFTCAP = {**WINDOW, **SOFTCAP}
TABLE_VARIANTS = {"fwd": ALL_VARIANTS, "dkdv": WINDOW_SOFTCAP, "dq": WINDOW_SOFTCAP}
TABLE_VARIANTS["kvcache"] = WINDOW_SOFTCAP  # on its default (paged) path


def variant_combos(kind: str, arch: int) -> list[dict]:
    """The variant overrides checked at every config of `kind` on sm_<arch>."""
    return [TABLE_VARIANTS[kind]] + [WINDOW] * (arch >= 90)


def variant_head_dims(kind: str, arch: int) -> list[int]:
    """The largest head dim of each of `kind`'s row groups on sm_<arch>."""
    groups = configs.TABLES[kind][configs.family((arch // 10, arch % 10))]
    return sorted(max(dims) for dims in groups)


def table_variant_cases(arch: int, dtypes=("bf16",), peak_only: bool = False):
    """The TABLE_VARIANTS cases of sm_<arch> for the 16-bit dtypes among `dtypes` (`peak_only`:
    at the largest head dim of each row group, without the varlen twins)."""
    capability = (arch // 10, arch % 10)
    limit = configs.SMEM_LIMIT[capability]
    for dtype in (d for d in dtypes if aot.ELEMENT_SIZE[d] == 2):
        for kind in TABLE_VARIANTS:
            tma_max = configs.TMA_MAX_BLOCK_D.get(kind, 0)
            for block_d in variant_head_dims(kind, arch) if peak_only else HEAD_DIMS:
                peak = block_d in variant_head_dims(kind, arch)
                combos = variant_combos(kind, arch) if peak else [TABLE_VARIANTS[kind]]
                for path in [{}] + [TMA] * (arch >= 90 and block_d <= tma_max):
                    select = (kind, capability, block_d, 2, limit)
                    rows = configs.select_rows(*select, False, True, bool(path))
                    twins = configs.select_rows(*select, True, True, bool(path))
                    twins = twins if peak and not peak_only and kind in VARLEN_KINDS else []
                    for row in rows:
                        for i, combo in enumerate(combos):
                            yield arch, kind, dtype, block_d, row, {**path, **combo}
                            if i == 0 and row in twins:
                                yield arch, kind, dtype, block_d, row, {**path, **combo, **VARLEN}


def variant_cases(arch: int, dtypes=("fp16",)):
    for kind, overrides in VARIANTS.items():
        row = (16, 64, 4, 2) if kind in ("decode", "kvcache") else (64, 64, 4, 2)
        for dtype in dtypes:
            for override in overrides:
                yield arch, kind, dtype, 64, row, override


def constexprs_of(kind: str, block_d: int, row: tuple[int, int, int, int], dtype: str) -> dict:
    """The constexprs of a dense case (overrides go on top; IS_VARLEN takes CuQ / CuK out)."""
    block_m, block_n, _, _ = row
    base = {"HEAD_DIM": block_d, "BLOCK_D": block_d}
    if kind in VARLEN_KINDS:  # the attention variants off: compiled out, pointers None
        base |= {"WINDOW": False, "SOFTCAP": False, **({"Sinks": None} if kind == "fwd" else {})}
    precision = {"DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    if kind in VARLEN_KINDS:
        tiles = {"CAUSAL": True, "BLOCK_M": block_m, "BLOCK_N": block_n, "IS_VARLEN": False}
        tiles |= {"CuQ": None, "CuK": None}  # dense launches pass None: no parameter at all
        extra = {"fwd": {"SCALE_NEG": False, "USE_TMA": False}}
        extra |= {"dkdv": {"SCORES_AS_FORWARD": False, "USE_TMA": False}, "dq": {"USE_TMA": False}}
        return {**base, **precision, **tiles, **extra[kind]}
    if kind == "decode":
        return {**base, **precision, "BLOCK_G": 16, "BLOCK_N": block_n, "SCALE_NEG": False}
    if kind == "kvcache":
        paths = {"CAUSAL": True, "SCALE_NEG": False, "PAGED": True, "PAGE_SIZE": 16}
        paths |= {"WINDOW": False, "SOFTCAP": False}
        return {**base, **precision, **paths, "BLOCK_M": block_m, "BLOCK_N": block_n}
    if kind == "onepass":  # pointer loads only; the variants off
        tiles = {"CAUSAL": True, "BLOCK_M": block_m, "BLOCK_N": block_n}
        tiles |= {"SCORES_AS_FORWARD": False, "WINDOW": False, "SOFTCAP": False}
        return {**base, **precision, **tiles}
    if kind == "preprocess":
        return {**base, "BLOCK_M": block_m, "Lse": None, "Sinks": None, "DSinks": None}
    return {**base, "BLOCK_S": 64, "Sinks": None}  # combine, at attention.DECODE_MAX_SPLITS


def _sources_digest(names: tuple[str, ...]) -> str:
    """Hash of the code a compile depends on, read once at import (as the kernels were)."""
    digest = hashlib.sha256(triton.__version__.encode())
    for name in names:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


_SOURCES_DIGEST = {
    kind: _sources_digest(_SOURCES + _OWN_SOURCES.get(kind, ())) for kind in FUNCTIONS
}


def _cache_key(case) -> str:
    text = json.dumps([_SOURCES_DIGEST[case[1]], aot.ptxas_version(case[0]), list(case)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_dir() -> Path:
    root = os.environ.get("FASTGPT_CACHE_DIR") or Path.home() / ".cache" / "fastgpt"
    return Path(root) / "compile_check"


def _compile_case(arch, kind, dtype, block_d, row, override) -> dict:
    record = {}
    try:
        constexprs = {**constexprs_of(kind, block_d, row, dtype), **(override or {})}
        if constexprs.get("IS_VARLEN"):  # cu_seqlens are real int32 pointers then
            del constexprs["CuQ"], constexprs["CuK"]
        if constexprs.pop("SINKS", False):  # sinks (and the preprocess pass's lse, dsinks) too
            for name in ("Sinks", "Lse", "DSinks"):
                constexprs.pop(name, None)
        fn = FUNCTIONS[kind]
        compiled, log = aot.compile_with_log(fn, arch, dtype, constexprs, row[2], row[3])
        record["shared"] = compiled.metadata.shared
        record.update(aot.ptxas_report(compiled.asm["ptx"], arch, log))
        record["loops"] = aot.loop_ops(compiled.asm["ttgir"])
    except Exception as e:  # reported per case; the caller decides
        record["error"] = f"{type(e).__name__}: {str(e)[-800:]}"
    return record


def run_case(case, use_cache: bool = True) -> dict:
    """Compile one case (or read it from the cache) and return its JSON record."""
    arch, kind, dtype, block_d, row, override = case
    start = time.perf_counter()
    record = {"kernel": kind, "arch": arch, "dtype": dtype, "head_dim": block_d}
    record["config"] = list(row)  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    if override:
        record["override"] = override
    path = cache_dir() / f"{_cache_key(case)}.json"
    cached = use_cache and path.is_file()
    result = json.loads(path.read_text()) if cached else _compile_case(*case)
    if use_cache and not cached and "error" not in result:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    record.update(result)
    record["limit"] = configs.SMEM_LIMIT[(arch // 10, arch % 10)]
    record["cached"] = cached
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def problems(record: dict, strict: bool) -> list[str]:
    """What is wrong with one record: errors and overflows always; spills and serialized wgmma
    when `strict` (a 16-bit config the autotuner may pick)."""
    if "error" in record:
        return [record["error"]]
    found = []
    if record["shared"] > record["limit"]:
        found.append(f"shared memory {record['shared']} > {record['limit']}")
    if strict and record["spill_bytes"]:
        found.append(f"spills {record['spill_bytes']} bytes")
    if strict and record["wgmma_serialized"]:
        found.append(f"wgmma serialized ({', '.join(record['ptxas_warnings'])})")
    return found


def run_all(all_cases: list, jobs: int, use_cache: bool = True):
    """Yield the records of `all_cases` in order, compiling up to `jobs` at a time."""
    if jobs <= 1:
        yield from (run_case(c, use_cache) for c in all_cases)
        return
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(run_case, all_cases, [use_cache] * len(all_cases))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=[80, 90], required=True)
    parser.add_argument("--dtype", action="append", choices=sorted(aot.ELEMENT_SIZE))
    parser.add_argument("--variants", action="store_true", help="the VARIANTS code paths instead")
    peak = "16-bit: only the largest head dim of each row group, no varlen twins"
    parser.add_argument("--peak-dims", action="store_true", help=peak)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-cache", action="store_true", help="compile every case again")
    parser.add_argument("--markdown", type=Path, help="rewrite the table in this markdown file")
    args = parser.parse_args(argv)
    dtypes = tuple(args.dtype or ("bf16", "fp32"))
    if args.variants:
        all_cases = [c for arch in args.arch for c in variant_cases(arch, dtypes)]
    else:
        all_cases = [c for arch in args.arch for c in cases(arch, dtypes, args.peak_dims)]
    failed, records = False, []
    for record in run_all(all_cases, args.jobs, not args.no_cache):
        strict = not args.variants and record["dtype"] != "fp32" and record["kernel"] in TUNED
        found = problems(record, strict)
        failed |= bool(found)
        if found:
            record["problems"] = found
        records.append(record)
        print(json.dumps(record), flush=True)
    if args.markdown:
        from .compile_table import write_table

        write_table(args.markdown, records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
