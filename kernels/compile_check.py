"""Ahead-of-time compile of every kernel and autotune config for a GPU this machine may not have.

    python -m fastgpt.kernels.compile_check --arch 90 [--arch 80]   # one JSON line per kernel

Triton builds a cubin for any target without a GPU; its metadata says how much shared memory a
block needs, which must fit the architecture or the launch fails on a real device. Must run
without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""

import argparse
import json
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import configs
from .decode import decode_combine_kernel, decode_split_kernel
from .flash_bwd import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel
from .flash_fwd import attn_fwd_kernel

_FP32_ARGS = {"Lse", "Delta", "Acc", "M", "L"}
_TENSOR_ARGS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", *_FP32_ARGS}
_FLOAT_ARGS = {"qk_scale", "scale"}
_DTYPES = {"fp16": 2, "bf16": 2, "fp32": 4}

# Tuned kernels: (kind in configs.TABLES, jit function).
TUNED = {
    "fwd": attn_fwd_kernel,
    "dkdv": bwd_dkdv_kernel,
    "dq": bwd_dq_kernel,
    "decode": decode_split_kernel,
}


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Triton signature {name: type} and divisibility attrs, as a launch with aligned tensors."""
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr or name in constexprs:
            signature[name] = "constexpr"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        elif name in _TENSOR_ARGS:
            signature[name] = "*fp32" if name in _FP32_ARGS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and constexprs["HEAD_DIM"] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_kernel(fn, arch: int, dtype: str, constexprs: dict, num_warps: int, num_stages: int):
    """Compile one kernel for sm_<arch>; the result's metadata.shared is its shared memory."""
    signature, attrs = _signature(fn, dtype, constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def cases(arch: int, dtypes=("bf16", "fp32")):
    """Every (kernel, config) the autotuner of sm_<arch> may launch, at the largest head dim of
    each table row group (shared memory grows with it), for each element size."""
    capability = (arch // 10, arch % 10)
    limit = configs.SMEM_LIMIT[capability]
    for kind in TUNED:
        for dims in configs.TABLES[kind][configs.family(capability)]:
            block_d = max(dims)
            for dtype in dtypes:
                for row in configs.select_rows(kind, capability, block_d, _DTYPES[dtype], limit):
                    yield kind, dtype, block_d, row
    for dtype in dtypes:  # untuned helpers: one fixed config each
        yield "preprocess", dtype, 256, (128, 0, 4, 1)
        yield "combine", dtype, 256, (0, 0, 4, 1)


# Code paths the table runs do not take (they compile causal, even head dims, positive scale,
# unspecialised lengths): kernel -> constexpr overrides, each compiled with one small config.
VARIANTS = {
    "fwd": [{"CAUSAL": False}, {"HEAD_DIM": 40}, {"SCALE_NEG": True}, {"Tq": 1, "Tk": 1}],
    "dkdv": [{"CAUSAL": False}, {"HEAD_DIM": 40}, {"Tq": 1, "GROUP": 1}],
    "dq": [{"CAUSAL": False}, {"HEAD_DIM": 40}, {"Tk": 1, "GROUP": 1}],
    "decode": [{"HEAD_DIM": 40}, {"SCALE_NEG": True}, {"GROUP": 1}],
}


def variant_cases(dtypes=("fp16",)):
    for kind, overrides in VARIANTS.items():
        row = (16, 64, 4, 2) if kind == "decode" else (64, 64, 4, 2)
        for dtype in dtypes:
            for override in overrides:
                yield kind, dtype, 64, row, override


def _constexprs(kind: str, block_d: int, row: tuple[int, int, int, int], dtype: str) -> dict:
    block_m, block_n, _, _ = row
    base = {"HEAD_DIM": block_d, "BLOCK_D": block_d}
    precision = {"DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    if kind in ("fwd", "dkdv", "dq"):
        tiles = {"CAUSAL": True, "BLOCK_M": block_m, "BLOCK_N": block_n}
        extra = {"fwd": {"SCALE_NEG": False}, "dkdv": {"SCORES_AS_FORWARD": False}, "dq": {}}
        return {**base, **precision, **tiles, **extra[kind]}
    if kind == "decode":
        return {**base, **precision, "BLOCK_G": 16, "BLOCK_N": block_n, "SCALE_NEG": False}
    if kind == "preprocess":
        return {**base, "BLOCK_M": block_m}
    return {**base, "BLOCK_S": 64}  # combine, at attention.DECODE_MAX_SPLITS


_FUNCTIONS = {**TUNED, "preprocess": bwd_preprocess_kernel, "combine": decode_combine_kernel}


def run_case(arch: int, kind: str, dtype: str, block_d: int, row, override=None) -> dict:
    start = time.perf_counter()
    record = {"arch": arch, "kernel": kind, "dtype": dtype, "block_d": block_d, "row": list(row)}
    if override:
        record["override"] = override
    try:
        constexprs = {**_constexprs(kind, block_d, row, dtype), **(override or {})}
        compiled = compile_kernel(_FUNCTIONS[kind], arch, dtype, constexprs, row[2], row[3])
        record["shared"] = compiled.metadata.shared
    except Exception as e:  # reported per case; the caller decides
        record["error"] = f"{type(e).__name__}: {str(e)[-800:]}"
    record["limit"] = configs.SMEM_LIMIT[(arch // 10, arch % 10)]
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=[80, 90], required=True)
    parser.add_argument("--dtype", action="append", choices=sorted(_DTYPES))
    parser.add_argument("--variants", action="store_true", help="the VARIANTS code paths instead")
    args = parser.parse_args(argv)
    failed = False
    dtypes = tuple(args.dtype or ("bf16", "fp32"))
    for arch in args.arch:
        for case in variant_cases(dtypes) if args.variants else cases(arch, dtypes):
            record = run_case(arch, *case)
            failed |= "error" in record or record["shared"] > record["limit"]
            print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
