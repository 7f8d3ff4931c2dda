"""The CUDA kernels of the C++ extension, checked without a GPU or a CUDA build of torch.

csrc/cuda/attention_kernels.cuh holds all device code without torch includes, so every kernel is
instantiated here for each dtype and compiled with nvcc for sm_80 (A100) and sm_90 (H100). A
host-only program checks that each kernel's shared memory at head dim 256 fits an A100 block
(163 KiB), so a kernel that could not launch fails here rather than on a user's GPU. Then
tests/cpp_cuda_emulator.cpp runs the kernels on the CPU, one thread per block, against float64
attention (outputs, lse and gradients), dense and packed (varlen, against the varlen oracle), and
with the attention variants (window, softcap, sinks and the sinks' gradient) against the
independent float64 oracle of tests/variant_oracle.py.
Races need a real GPU: tests/test_cpp_extension.py runs
the same checks through the extension when one is present.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import (
    F64,
    assert_within_bounds,
    check_against_float64,
    random_tensors,
    rounding_floor,
)
from test_variants import variant_floors
from variant_oracle import oracle
from varlen_oracle import check_varlen_against_float64, cu_seqlens, random_varlen, varlen_oracle

import fastgpt
from fastgpt import _extension
from fastgpt.reference import reference_attention_with_lse

KERNELS = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
EMULATOR = Path(__file__).resolve().parent / "cpp_cuda_emulator.cpp"
A100_SHARED_BYTES = 163 * 1024
# What torch.utils.cpp_extension.CUDAExtension passes to nvcc: no implicit half conversions.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
TYPES = [("float", "float"), ("double", "double"), ("__half", "float"), ("__nv_bfloat16", "float")]


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def instantiations() -> str:
    lines = ['#include "attention_kernels.cuh"', "namespace fastgpt::cuda {"]
    for t, a in TYPES:
        for fn in ("attention_forward", "attention_backward"):
            lines.append(
                f"template cudaError_t {fn}<{t}, {a}>(const Params<{t}, {a}>&, cudaStream_t);"
            )
    lines.append("}")
    return "\n".join(lines) + "\n"


def nvcc(args: list[str], cwd: Path) -> None:
    cmd = [NVCC, "-std=c++17", "-O2", *TORCH_NVCC_DEFINES, f"-I{KERNELS}", *args]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_for(arch, tmp_path):
    source = tmp_path / "kernels.cu"
    source.write_text(instantiations())
    nvcc([f"-arch={arch}", "-c", str(source), "-o", str(tmp_path / "kernels.o")], tmp_path)
    assert (tmp_path / "kernels.o").stat().st_size > 0


def test_shared_memory_fits_an_a100_block(tmp_path):
    source = tmp_path / "smem.cu"
    source.write_text(
        '#include <cstdio>\n#include "attention_kernels.cuh"\n'
        "using namespace fastgpt::cuda;\n"
        "template <typename A> void show(const char* name) {\n"
        '  std::printf("%s %zu %zu %zu\\n", name, SharedBytes<A>::forward(256),\n'
        "              SharedBytes<A>::dkdv(256), SharedBytes<A>::dq(256));\n"
        "}\n"
        'int main() { show<float>("float"); show<double>("double"); return 0; }\n'
    )
    nvcc([str(source), "-o", str(tmp_path / "smem")], tmp_path)
    out = subprocess.run([str(tmp_path / "smem")], capture_output=True, text=True, check=True)
    sizes = {
        line.split()[0]: [int(x) for x in line.split()[1:]] for line in out.stdout.splitlines()
    }
    assert set(sizes) == {"float", "double"}
    for name, per_kernel in sizes.items():
        for kernel, size in zip(("forward", "dkdv", "dq"), per_kernel, strict=True):
            assert 0 < size <= A100_SHARED_BYTES, f"{name} {kernel}: {size} bytes at D=256"


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include folder (cuda_runtime.h) of the nvcc that runs."""
    # nvcc's dry run names its toolkit root ("#$ TOP=/usr/local/cuda-13.0/bin/..").
    dry = subprocess.run(
        [NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
        check=False,
    )
    tops = [
        line[len("#$ TOP=") :] for line in dry.stderr.splitlines() if line.startswith("#$ TOP=")
    ]
    for root in [
        *tops,
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        "/usr/local/cuda",
    ]:
        if root and (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    include, cxx = cuda_include_dir(), shutil.which("c++") or shutil.which("g++")
    if include is None or cxx is None:
        pytest.skip("no CUDA headers or host C++ compiler to build the CPU emulator")
    exe = tmp_path_factory.mktemp("emulator") / "cpp_cuda_emulator"
    cmd = [cxx, "-std=c++17", "-O1", f"-I{include}", f"-I{KERNELS}", str(EMULATOR), "-o", str(exe)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"
    return exe


# (B, H, Hkv, Tq, Tk, D): ragged tiles, GQA, rows that see no key, the widest head dim.
EMULATED_CASES = {
    "Tq_lt_Tk_mqa": (1, 2, 1, 37, 53, 24),
    "Tq_gt_Tk": (2, 2, 2, 53, 37, 16),
    "gqa": (1, 4, 2, 33, 33, 40),
    "one_key": (1, 1, 1, 1, 1, 1),
    "D256": (1, 2, 1, 20, 20, 256),
}


CODES = {torch.float64: "d", torch.float32: "f", torch.float16: "h", torch.bfloat16: "b"}
NO_VARIANTS = {"window": (-1, -1), "softcap": 0.0, "sinks": None}


def call_emulator(emulator, folder: Path, q, k, v, grad_out, sizes, causal, scale, variants, cu):
    """Runs the emulator on q, k, v, grad_out (dense or packed; cu: int32 cu_seqlens_q then
    cu_seqlens_k, or None) with sizes (B, H, Hkv, Tq, Tk, D) and the variants (NO_VARIANTS' keys).
    Returns out, lse (fp32, fp64 for fp64 inputs; dense (B, H, Tq), packed (H, total_q)), dq, dk,
    dv, and with sinks dsinks (H,) in lse's dtype."""
    sinks = variants["sinks"]
    tensors = [q, k, v, grad_out] + ([] if sinks is None else [sinks.detach().double()])
    (folder / "in.bin").write_bytes(
        b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)
    )
    left, right = variants["window"]
    args = [CODES[q.dtype], *(str(x) for x in (*sizes, int(causal))), repr(scale)]
    args += [str(left), str(right), repr(float(variants["softcap"])), str(int(sinks is not None))]
    files = [folder / "in.bin", folder / "out.bin"]
    if cu is not None:
        (folder / "cu.bin").write_bytes(cu.numpy().tobytes())
        files.append(folder / "cu.bin")
    subprocess.run([str(emulator), *args, *map(str, files)], check=True, timeout=120)
    raw = torch.from_numpy(np.fromfile(folder / "out.bin", dtype=np.uint8))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    H = sizes[1]
    lse_shape = q.shape[:3] if cu is None else (H, q.shape[0])
    shapes = [(q.shape, q.dtype), (lse_shape, lse_dtype), (q.shape, q.dtype)]
    shapes += [(k.shape, q.dtype), (k.shape, q.dtype)] + [((H,), lse_dtype)] * (sinks is not None)
    out, offset = [], 0
    for shape, dtype in shapes:
        nbytes = torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
        out.append(raw[offset : offset + nbytes].clone().view(dtype).reshape(shape))
        offset += nbytes
    assert offset == raw.numel(), "the emulator wrote an unexpected number of bytes"
    return out


def run_emulator(emulator, folder: Path, q, k, v, grad_out, causal, scale, variants=NO_VARIANTS):
    """out, lse (B, H, Tq), dq, dk, dv [, dsinks] of the emulated CUDA kernels, dense."""
    (B, H, Tq, D), (Hkv, Tk) = q.shape, k.shape[1:3]
    sizes = (B, H, Hkv, Tq, Tk, D)
    return call_emulator(emulator, folder, q, k, v, grad_out, sizes, causal, scale, variants, None)


def emulated_plain(run, lse_of, grad_out, dtype):
    """emulated_op without the variants: (q, k, v) -> out, so the shared float64 rule
    (tests/oracle.py) applies. run(q, k, v, grad_out) gives out, lse, dq, dk, dv; lse is checked
    against lse_of(q, k, v) in float64 (assert_lse)."""

    def check(q, k, v, sinks, lse):
        assert_lse(lse, lse_of(q.double(), k.double(), v.double()), dtype)

    op = emulated_op(lambda q, k, v, do, sinks: run(q, k, v, do), check, grad_out)
    return lambda q, k, v: op(q, k, v, None)


def assert_float64_close(kernel, plain, leaves, grad_out) -> None:
    """kernel(q, k, v) -> out and its gradients against plain's, on float64 leaves: within 1e-12
    (float64 is the oracle's own dtype, plain PyTorch has no error there: an absolute bound)."""
    leaves = [t.requires_grad_() for t in leaves]
    out, ref_out = kernel(*leaves), plain(*leaves)
    for name, got, ref in zip(
        ["out", "dq", "dk", "dv"],
        [out, *torch.autograd.grad(out, leaves, grad_out)],
        [ref_out, *torch.autograd.grad(ref_out, leaves, grad_out)],
        strict=True,
    ):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", list(CODES), ids=str)
@pytest.mark.parametrize("case", list(EMULATED_CASES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_kernels_emulated_on_cpu_match_float64(emulator, tmp_path, dtype, case, causal):
    B, H, Hkv, Tq, Tk, D = EMULATED_CASES[case]
    g = torch.Generator().manual_seed(Tq * 100 + Tk)
    q, k, v, grad_out = (
        torch.randn(*shape, generator=g, dtype=torch.float64)
        for shape in ((B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, Tq, D))
    )
    scale = D**-0.5
    run = lambda q, k, v, do: run_emulator(emulator, tmp_path, q, k, v, do, causal, scale)
    lse_of = lambda q, k, v: reference_attention_with_lse(q, k, v, causal)[1]
    kernel = emulated_plain(run, lse_of, grad_out, dtype)
    leaves = [t.to(dtype) for t in (q, k, v)]
    if dtype != torch.float64:  # flash-attn's rule: at most 2x plain PyTorch's error in dtype
        check_against_float64(kernel, leaves, grad_out, causal, what=f"emulated {case}")
        return
    out_of = lambda q, k, v: reference_attention_with_lse(q, k, v, causal, scale)[0]
    assert_float64_close(kernel, out_of, leaves, grad_out)


def run_emulator_varlen(
    emulator, folder: Path, q, k, v, grad_out, lens_q, lens_k, causal, scale, variants=NO_VARIANTS
):
    """out, lse (H, total_q), dq, dk, dv [, dsinks] of the emulated kernels on packed sequences."""
    cu = torch.cat([cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")])
    (_, H, D), Hkv = q.shape, k.shape[1]
    sizes = (len(lens_q), H, Hkv, max(lens_q), max(lens_k), D)
    return call_emulator(emulator, folder, q, k, v, grad_out, sizes, causal, scale, variants, cu)


# (query lengths, key lengths, H, Hkv, D): empty sequences, one token, ragged tiles, Tq != Tk.
EMULATED_VARLEN = {
    "ragged_gqa": ([0, 1, 17, 37, 5], [3, 1, 17, 20, 0], 4, 2, 24),
    "equal_mqa": ([0, 1, 17, 40], [0, 1, 17, 40], 2, 1, 16),
}


@pytest.mark.parametrize("dtype", list(CODES), ids=str)
@pytest.mark.parametrize("case", list(EMULATED_VARLEN))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_varlen_kernels_emulated_on_cpu_match_float64(emulator, tmp_path, dtype, case, causal):
    lens_q, lens_k, H, Hkv, D = EMULATED_VARLEN[case]
    q, k, v, grad_out = random_varlen(lens_q, lens_k, H, Hkv, D, torch.float64, device="cpu")
    scale = D**-0.5
    run = lambda q, k, v, do: run_emulator_varlen(
        emulator, tmp_path, q, k, v, do, lens_q, lens_k, causal, scale
    )
    lse_of = lambda q, k, v: varlen_oracle(q, k, v, lens_q, lens_k, causal)[1]
    kernel = emulated_plain(run, lse_of, grad_out, dtype)
    leaves = [t.to(dtype) for t in (q, k, v)]
    if dtype != torch.float64:
        check_varlen_against_float64(
            kernel, leaves, grad_out, lens_q, lens_k, causal, what=f"emulated {case}"
        )
        return
    out_of = lambda q, k, v: varlen_oracle(q, k, v, lens_q, lens_k, causal, scale)[0]
    assert_float64_close(kernel, out_of, leaves, grad_out)


# --- The attention variants (window, softcap, sinks) ----------------------------------------------

# (B, H, Hkv, Tq, Tk, D), causal, window, softcap, sinks (the scale of their normal draws, 0: none).
# Tiles are 16 x 16 (8 x 8 for float64): windows narrower than the sequence skip whole key blocks
# in the forward and dQ and whole query blocks in dK/dV; rows that see no key (with and without a
# sink); sinks up to ~150 from the scores (exp(score - sink) overflows fp32); GQA, MQA, odd sizes.
EMULATED_VARIANTS = {
    "causal_window_skips_blocks_mqa": ((1, 2, 1, 70, 70, 16), True, (20, 0), 0.0, True),
    "left_right_softcap_gqa_Tq_gt_Tk": ((2, 4, 2, 53, 37, 24), False, (13, 9), 1.5, False),
    "causal_left_right_Tq_lt_Tk": ((2, 2, 2, 37, 61, 8), True, (7, 5), 2.0, True),
    "right_only_sinks": ((1, 4, 2, 45, 70, 8), False, (-1, 3), 0.0, True),
    "causal_softcap_sinks": ((1, 2, 1, 33, 33, 40), True, (-1, -1), 1.0, True),
    "one_key_each_and_sink_only_rows": ((1, 2, 1, 20, 9, 16), False, (0, 0), 0.0, True),
    "softcap_odd_heads": ((1, 3, 1, 19, 29, 12), False, (-1, -1), 2.5, False),
    "window_rows_without_keys": ((1, 2, 2, 40, 25, 16), True, (4, -1), 0.0, False),
    "D256": ((1, 2, 1, 20, 20, 256), True, (5, 0), 1.5, True),
    "sinks_far_from_the_scores": ((1, 4, 2, 17, 23, 8), True, (-1, -1), 0.0, 150.0),
}


def sink_dtype(dtype: torch.dtype) -> torch.dtype:
    """The sinks' dtype in the kernels: fp32, fp64 for fp64 inputs (the lse's dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def emulated_op(run, check_lse, grad_out):
    """The emulator as an autograd op (q, k, v, sinks or None) -> out: run(q, k, v, grad_out,
    variants-sinks) gives out, lse, dq, dk, dv [, dsinks]; check_lse(q, k, v, sinks, lse) checks
    lse against the float64 oracle."""

    class Emulated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, sinks):
            out, lse, *ctx.grads = run(q, k, v, grad_out.to(q.dtype), sinks)
            check_lse(q, k, v, sinks, lse)
            return out

        @staticmethod
        def backward(ctx, g):
            assert torch.equal(g, grad_out.to(g.dtype)), "emulated with another grad_out"
            return (*ctx.grads, None) if len(ctx.grads) == 3 else tuple(ctx.grads)

    return Emulated.apply


def assert_lse(lse, ref_lse, dtype) -> None:
    """lse (fp32, fp64 for fp64) against the float64 oracle's: +inf in the same rows."""
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys"
    finite = torch.isfinite(ref_lse)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=tol, rtol=0)


def check_variant_rule(kernel, plain, tensors, sinks, dtype, floors_of, what) -> None:
    """kernel(q, k, v, sinks) -> out against plain (the oracle) in float64: fp64 within 1e-12;
    otherwise out, dq, dk, dv within tests/oracle.py's rule (2x plain's error in dtype plus
    floors_of(q, k, v, do, sinks) -> (fq, fk, fv, fsinks)) and dsinks likewise."""
    q, k, v, do = tensors

    def run(fn, dt, sinks_dt):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        sk = None if sinks is None else sinks.detach().to(sinks_dt).requires_grad_()
        out = fn(*leaves, sk)
        grads = torch.autograd.grad(out, leaves + ([sk] if sk is not None else []), do.to(dt))
        return out.detach(), [g.detach() for g in grads]

    got_out, got = run(kernel, dtype, sink_dtype(dtype))
    exact_out, exact = run(plain, torch.float64, torch.float64)
    if dtype == torch.float64:
        names = ["out", "dq", "dk", "dv", "dsinks"]
        for name, g, w in zip(names, [got_out, *got], [exact_out, *exact], strict=False):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        return
    plain_out, plain_grads = run(plain, dtype, dtype)
    *floors, fs = floors_of(q, k, v, do, sinks)
    assert_within_bounds(
        what, dtype, [got_out, *got[:3]], [plain_out, *plain_grads[:3]],
        [exact_out, *exact[:3]], [torch.zeros_like(exact_out), *floors],
    )  # fmt: skip
    if sinks is not None:
        assert got[3].dtype == torch.float32 and got[3].shape == sinks.shape
        err = (got[3].double() - exact[3]).abs()
        plain_err = (plain_grads[3].double() - exact[3]).abs().max().item()
        bound = 2 * plain_err + rounding_floor(exact[3], dtype) + fs
        assert (err <= bound).all(), f"{what} dsinks: error {err.tolist()} over {bound.tolist()}"


@pytest.mark.parametrize("dtype", list(CODES), ids=str)
@pytest.mark.parametrize("case", list(EMULATED_VARIANTS))
def test_variant_kernels_emulated_on_cpu_match_the_oracle(emulator, tmp_path, dtype, case):
    (B, H, Hkv, Tq, Tk, D), causal, window, softcap, sink_scale = EMULATED_VARIANTS[case]
    q, k, v, do, sinks = random_tensors(
        (B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, Tq, D), (H,),
        dtype=torch.float64, device="cpu", seed=Tq * 100 + Tk,
    )  # fmt: skip
    sinks = sinks * sink_scale if sink_scale else None
    scale = D**-0.5
    variants = dict(window=window, softcap=softcap)

    def run(q, k, v, grad_out, s):
        args = (q, k, v, grad_out, causal, scale, {**variants, "sinks": s})
        return run_emulator(emulator, tmp_path, *args)

    def check_lse(q, k, v, s, lse):
        s64 = None if s is None else s.double()
        ref = oracle(q.double(), k.double(), v.double(), causal, sinks=s64, **variants)[1]
        assert_lse(lse, ref, dtype)

    def plain(q, k, v, s):
        return oracle(q, k, v, causal, window, softcap, s, scale)[0]

    def floors_of(q, k, v, do, s):
        return variant_floors(q, k, v, do, causal, window, softcap, s, dtype)

    kernel = emulated_op(run, check_lse, do)
    what = f"emulated {case} {dtype}"
    check_variant_rule(kernel, plain, (q, k, v, do), sinks, dtype, floors_of, what)


def per_sequence(lens_q, lens_k):
    """(rows, cols) slices of each packed sequence's queries and keys."""
    row = col = 0
    for tq, tk in zip(lens_q, lens_k, strict=True):
        yield slice(row, row + tq), slice(col, col + tk)
        row, col = row + tq, col + tk


def varlen_variant_oracle(q, k, v, lens_q, lens_k, causal, window, softcap, sinks, scale=None):
    """tests/variant_oracle.py's oracle on each packed sequence: (out (total_q, H, D),
    lse (H, total_q)); q (total_q, H, D), k, v (total_k, Hkv, D)."""
    outs, lses = [], []
    for rows, cols in per_sequence(lens_q, lens_k):
        dense = [t.transpose(0, 1)[None] for t in (q[rows], k[cols], v[cols])]  # (1, heads, T, D)
        out, lse = oracle(*dense, causal, window, softcap, sinks, scale)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def varlen_variant_floors(q, k, v, do, lens_q, lens_k, causal, window, softcap, sinks, dtype):
    """test_variants.variant_floors per packed sequence: (fq, fk, fv) shaped like q, k, v and
    fsinks (H,) summed over the sequences (None without sinks)."""
    floors, fs = [torch.zeros_like(t) for t in (q, k, v)], None
    for rows, cols in per_sequence(lens_q, lens_k):
        dense = [t.transpose(0, 1)[None] for t in (q[rows], k[cols], v[cols], do[rows])]
        *seq_floors, seq_fs = variant_floors(*dense, causal, window, softcap, sinks, dtype)
        for floor, f, where in zip(floors, seq_floors, (rows, cols, cols), strict=True):
            floor[where] = f[0].transpose(0, 1)
        if seq_fs is not None:
            fs = seq_fs if fs is None else fs + seq_fs
    return (*floors, fs)


# (query lengths, key lengths, H, Hkv, D), causal, window, softcap, sinks: empty sequences, one
# token, windows that skip blocks, Tq > Tk and Tq < Tk per sequence.
EMULATED_VARLEN_VARIANTS = {
    "ragged_gqa": (([0, 1, 17, 37, 5], [3, 1, 17, 20, 0], 4, 2, 24), True, (6, 0), 1.5, True),
    "long_windows_mqa": (([45, 3, 70], [70, 9, 70], 2, 1, 16), False, (10, 12), 0.0, True),
    "right_only_softcap": (([33, 20, 1], [20, 33, 40], 2, 2, 8), False, (-1, 4), 2.0, False),
}


@pytest.mark.parametrize("dtype", list(CODES), ids=str)
@pytest.mark.parametrize("case", list(EMULATED_VARLEN_VARIANTS))
def test_varlen_variant_kernels_emulated_on_cpu_match_the_oracle(emulator, tmp_path, dtype, case):
    (lens_q, lens_k, H, Hkv, D), causal, window, softcap, with_sinks = EMULATED_VARLEN_VARIANTS[
        case
    ]
    q, k, v, do = random_varlen(lens_q, lens_k, H, Hkv, D, torch.float64, device="cpu", seed=7)
    sinks = torch.randn(H, generator=torch.Generator().manual_seed(H), dtype=torch.float64)
    sinks = sinks if with_sinks else None
    scale = D**-0.5
    variants = dict(window=window, softcap=softcap)

    def run(q, k, v, grad_out, s):
        args = (lens_q, lens_k, causal, scale, {**variants, "sinks": s})
        return run_emulator_varlen(emulator, tmp_path, q, k, v, grad_out, *args)

    def check_lse(q, k, v, s, lse):
        s64 = None if s is None else s.double()
        qkv = (q.double(), k.double(), v.double())
        ref = varlen_variant_oracle(*qkv, lens_q, lens_k, causal, window, softcap, s64)[1]
        assert_lse(lse, ref, dtype)

    def plain(q, k, v, s):
        return varlen_variant_oracle(q, k, v, lens_q, lens_k, causal, window, softcap, s, scale)[0]

    def floors_of(q, k, v, do, s):
        args = (lens_q, lens_k, causal, window, softcap, s, dtype)
        return varlen_variant_floors(q, k, v, do, *args)

    kernel = emulated_op(run, check_lse, do)
    what = f"emulated varlen {case} {dtype}"
    check_variant_rule(kernel, plain, (q, k, v, do), sinks, dtype, floors_of, what)


# --- Through the extension: the same ops on CUDA tensors where a GPU and a CUDA build exist -------

# The C++ CPU kernel always (it checks this test itself); the CUDA kernel where it was built.
EXTENSION_DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and _extension.cpp_supports("cuda") else []
)


def run_leaves(fn, device, *tensors):
    """(out, lse, leaves): fn(*leaves) -> (out, lse) on detached copies of tensors on device."""
    leaves = [t.detach().to(device).requires_grad_() for t in tensors]
    return (*fn(*leaves), leaves)


def assert_runs_match(got, want, grad_out) -> None:
    """(out, lse, leaves) of a kernel against the oracle's (float64, on the CPU): out, lse and
    the leaves' gradients (dq, dk, dv, dsinks) within float64 rounding."""
    (out, lse, leaves), (want_out, want_lse, want_leaves) = got, want
    torch.testing.assert_close(lse.cpu(), want_lse.detach(), **F64)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.device))
    want_grads = torch.autograd.grad(want_out, want_leaves, grad_out)
    names = ["out", "dq", "dk", "dv", "dsinks"]
    for name, g, w in zip(names, [out, *grads], [want_out, *want_grads], strict=True):
        torch.testing.assert_close(
            g.detach().cpu(), w.detach(), **F64, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.skipif(not _extension.cpp_available(), reason="fastgpt._C is not built")
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_cpp_ops_take_the_variants_on_their_device(device):
    """fastgpt.attention / attention_varlen with backend="cpp" and every variant, float64,
    against the oracle on the CPU: out, lse, dq, dk, dv and dsinks, dense and packed."""
    variants = dict(causal=True, window=(9, 3), softcap=1.5)
    q, k, v, do, s = random_tensors(
        (2, 4, 37, 16), (2, 2, 45, 16), (2, 2, 45, 16), (2, 4, 37, 16), (4,),
        dtype=torch.float64, device="cpu", seed=3,
    )  # fmt: skip

    def dense(q, k, v, s):
        return fastgpt.attention(q, k, v, sinks=s, backend="cpp", return_lse=True, **variants)

    def dense_oracle(q, k, v, s):
        return oracle(q, k, v, sinks=s, **variants)

    got, want = run_leaves(dense, device, q, k, v, s), run_leaves(dense_oracle, "cpu", q, k, v, s)
    assert_runs_match(got, want, do)

    lens_q, lens_k = [5, 0, 32], [20, 3, 22]  # packed: three sequences, one without queries
    pq, pk, pv, pdo = random_varlen(lens_q, lens_k, 4, 2, 16, torch.float64, device="cpu", seed=5)
    cu = [cu_seqlens(lens, device) for lens in (lens_q, lens_k)]

    def packed(q, k, v, s):
        sizes = (max(lens_q), max(lens_k))
        args = dict(sinks=s, backend="cpp", return_lse=True, **variants)
        return fastgpt.attention_varlen(q, k, v, *cu, *sizes, **args)

    def packed_oracle(q, k, v, s):
        window, softcap = variants["window"], variants["softcap"]
        return varlen_variant_oracle(q, k, v, lens_q, lens_k, True, window, softcap, s)

    got = run_leaves(packed, device, pq, pk, pv, s)
    assert_runs_match(got, run_leaves(packed_oracle, "cpu", pq, pk, pv, s), pdo)


@pytest.mark.skipif(not _extension.cpp_available(), reason="fastgpt._C is not built")
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_cpp_variant_ops_pass_opcheck_on_their_device(device):
    """The four cpp ops with every variant on the device's kernels: schema, fake and real agree."""
    q, k, v, do, s = random_tensors(
        (2, 4, 19, 16), (2, 2, 23, 16), (2, 2, 23, 16), (2, 4, 19, 16), (4,),
        device=device, seed=11,
    )  # fmt: skip
    variants = dict(window=[3, 2], softcap=1.5, sinks=s)
    ops = torch.ops.fastgpt
    torch.library.opcheck(ops.cpp_attention_forward, (q, k, v, True, 0.25), variants)
    out, lse = ops.cpp_attention_forward(q, k, v, True, 0.25, **variants)
    args = (do, q, k, v, out, lse, True, 0.25)
    torch.library.opcheck(ops.cpp_attention_backward, args, variants)

    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v, do)]  # (T, heads, D)
    cu_q, cu_k = cu_seqlens([7, 12], device), cu_seqlens([20, 3], device)
    args = (*packed[:3], cu_q, cu_k, 12, 20, False, 0.25)
    torch.library.opcheck(ops.cpp_attention_varlen_forward, args, variants)
    out, lse = ops.cpp_attention_varlen_forward(*args, **variants)
    args = (packed[3], *packed[:3], out, lse, cu_q, cu_k, 12, 20, False, 0.25)
    torch.library.opcheck(ops.cpp_attention_varlen_backward, args, variants)
