"""Ahead-of-time compile of one kernel for a GPU this machine may not have, and what ptxas says.

    compiled = compile_kernel(fn, arch=90, dtype="bf16", constexprs={...}, num_warps=8,
                              num_stages=2)
    report = ptxas_report(compiled.asm["ptx"], arch=90)   # registers, spills, wgmma, TMA

Triton builds a cubin for any target without a GPU, through the same ptxas a GPU machine would use
(the wheel ships it). `compile_with_log` keeps the `ptxas -v` log Triton prints with its
dump_ptxas_log knob; where there is none (a hit in Triton's cache), `ptxas_report` assembles the
PTX once more with `-v` and Triton's flags. Either way it reads registers, spills and the "wgmma
serialized" warnings (C7510-C7519) off the log. Must run without TRITON_INTERPRET (the
interpreter replaces @triton.jit functions).
"""

import contextlib
import io
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

FP32_ARGS = {"Lse", "Delta", "Acc", "M", "L", "DKp", "DVp", "Sinks", "DSinks"}
INT32_ARGS = {"CuQ", "CuK"}  # cu_seqlens of the varlen kernels (None constexprs when dense)
TENSOR_ARGS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", *FP32_ARGS, *INT32_ARGS}
FLOAT_ARGS = {"qk_scale", "scale", "lse_scale", "softcap", "cap_in", "cap_out"}
INT32_TENSOR_ARGS = {"Seqlens", "Table"}  # the KV-cache kernel's lengths and block table
ELEMENT_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Triton signature {name: type} and divisibility attrs, as a launch with aligned tensors."""
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr or name in constexprs:
            signature[name] = "constexpr"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name in INT32_TENSOR_ARGS:
            signature[name] = "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in TENSOR_ARGS:
            kind = "fp32" if name in FP32_ARGS else "i32" if name in INT32_ARGS else dtype
            signature[name] = f"*{kind}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and constexprs["HEAD_DIM"] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_kernel(fn, arch: int, dtype: str, constexprs: dict, num_warps: int, num_stages: int):
    """Compile one kernel for sm_<arch>; the result's metadata.shared is its shared memory and
    .asm["ptx"] / .asm["ttgir"] its code."""
    return compile_with_log(fn, arch, dtype, constexprs, num_warps, num_stages)[0]


def compile_with_log(
    fn, arch: int, dtype: str, constexprs: dict, num_warps: int, num_stages: int
) -> tuple[object, str]:
    """compile_kernel, plus the `ptxas -v` log Triton printed if it ran ptxas ("" on a hit in
    Triton's cache, or on a Triton without the dump_ptxas_log knob)."""
    signature, attrs = _signature(fn, dtype, constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if nvidia is None or not hasattr(nvidia, "dump_ptxas_log"):
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options), ""
    printed, before = io.StringIO(), nvidia.dump_ptxas_log
    try:
        nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(printed):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        nvidia.dump_ptxas_log = before
    return compiled, printed.getvalue()


def ptxas_version(arch: int) -> str:
    return str(get_ptxas(arch).version)


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v on `ptx` with Triton's own flags for this target (see make_cubin)."""
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        cmd += [f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr[-800:]}")
    return proc.stdout + proc.stderr


def _one(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    return int(found.group(1)) if found else 0


def ptxas_report(ptx: str, arch: int, log: str = "") -> dict:
    """Registers, spill bytes, serialized wgmma and instruction kinds of one compiled kernel.

    wgmma_serialized: ptxas inserted a wait after tensor-core instructions (warnings C7510-C7519:
    accumulator defined by non-wgmma code inside a pipeline stage, register shortage, ...).
    mma: "wgmma" (Hopper warpgroup MMA), "mma.sync" (Ampere-style) or "none" (FMA dots).
    tma: the kernel moves tiles with TMA (cp.async.bulk.tensor) rather than pointer loads.
    """
    if "registers" not in log:  # no log from the compile (Triton's cache hit): run ptxas here
        log = _ptxas_log(ptx, arch)
    return parse_ptxas_log(log, ptx)


def parse_ptxas_log(log: str, ptx: str) -> dict:
    """ptxas_report's fields from a `ptxas -v` log and the PTX it assembled."""
    stores = _one(r"(\d+) bytes spill stores", log)
    loads = _one(r"(\d+) bytes spill loads", log)
    codes = sorted(set(re.findall(r"\((C75\d\d)\)[^\n]*wgmma", log)))
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    return {
        "registers": _one(r"Used (\d+) registers", log),
        "spill_bytes": stores + loads,
        "spill_stores": stores,
        "stack_frame": _one(r"(\d+) bytes stack frame", log),
        "wgmma_serialized": bool(codes),
        "ptxas_warnings": codes,
        "mma": mma,
        "tma": "cp.async.bulk.tensor" in ptx,
    }


def loop_ops(ttgir: str) -> list[dict]:
    """Matrix multiplies and exp2 per iteration of each innermost loop of a kernel's TTGIR.

    Returns one {"dots", "exp2"} per innermost `scf.for`, in source order. A dot is tt.dot
    (mma.sync) or ttng.warp_group_dot (wgmma); exp2 counts elementwise exp2 ops (one per
    element of the tile).
    """
    loops, depth, stack = [], 0, []
    for line in ttgir.splitlines():
        if "scf.for" in line and line.rstrip().endswith("{"):
            stack.append({"dots": 0, "exp2": 0, "inner": False, "depth": depth})
        if stack:
            top = stack[-1]
            if re.search(r"\btt\.dot\b|ttng\.warp_group_dot\b", line) and "_wait" not in line:
                top["dots"] += 1
            if re.search(r"math\.exp2\b", line):
                top["exp2"] += 1
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1]["depth"]:
            done = stack.pop()
            if stack:
                stack[-1]["inner"] = True
            if not done["inner"]:
                loops.append({"dots": done["dots"], "exp2": done["exp2"]})
    return loops
