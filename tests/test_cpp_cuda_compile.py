"""The CUDA kernels of the C++ extension, checked without a GPU or a CUDA build of torch.

csrc/cuda/attention_kernels.cuh holds all device code without torch includes, so every kernel is
instantiated here for each dtype and compiled with nvcc for sm_80 (A100) and sm_90 (H100). A
host-only program checks that each kernel's shared memory at head dim 256 fits an A100 block
(163 KiB), so a kernel that could not launch fails here rather than on a user's GPU. Then
tests/cpp_cuda_emulator.cpp runs the kernels on the CPU, one thread per block, against float64
attention (outputs, lse and gradients), dense and packed (varlen, against the varlen oracle).
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
from oracle import check_against_float64
from varlen_oracle import check_varlen_against_float64, cu_seqlens, random_varlen, varlen_oracle

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


def run_emulator(emulator, folder: Path, q, k, v, grad_out, causal: bool, scale: float):
    """out, lse, dq, dk, dv of the emulated CUDA kernels (lse in fp32, fp64 for fp64 inputs)."""
    (folder / "in.bin").write_bytes(
        b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in (q, k, v, grad_out))
    )
    (B, H, Tq, D), (Hkv, Tk) = q.shape, k.shape[1:3]
    args = [CODES[q.dtype], *(str(x) for x in (B, H, Hkv, Tq, Tk, D, int(causal))), repr(scale)]
    subprocess.run(
        [str(emulator), *args, str(folder / "in.bin"), str(folder / "out.bin")],
        check=True,
        timeout=120,
    )
    raw = torch.from_numpy(np.fromfile(folder / "out.bin", dtype=np.uint8))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    shapes = [(q.shape, q.dtype), (q.shape[:3], lse_dtype), (q.shape, q.dtype)]
    shapes += [(k.shape, q.dtype), (k.shape, q.dtype)]
    tensors, offset = [], 0
    for shape, dtype in shapes:
        nbytes = torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
        tensors.append(raw[offset : offset + nbytes].clone().view(dtype).reshape(shape))
        offset += nbytes
    assert offset == raw.numel(), "the emulator wrote an unexpected number of bytes"
    return tensors


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

    class Emulated(torch.autograd.Function):
        """The emulator as an autograd op, so the shared float64 rule (tests/oracle.py) applies."""

        @staticmethod
        def forward(ctx, q, k, v):
            out, lse, *ctx.grads = run_emulator(
                emulator, tmp_path, q, k, v, grad_out.to(q.dtype), causal, scale
            )
            ref_lse = reference_attention_with_lse(q.double(), k.double(), v.double(), causal)[1]
            assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys"
            finite = torch.isfinite(ref_lse)
            tol = 1e-12 if dtype == torch.float64 else 1e-5  # lse is fp32 or fp64
            torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=tol, rtol=0)
            return out

        @staticmethod
        def backward(ctx, g):
            assert torch.equal(g, grad_out.to(g.dtype)), "emulated with another grad_out"
            return tuple(ctx.grads)

    leaves = [t.to(dtype) for t in (q, k, v)]
    if dtype != torch.float64:  # flash-attn's rule: at most 2x plain PyTorch's error in dtype
        check_against_float64(Emulated.apply, leaves, grad_out, causal, what=f"emulated {case}")
        return
    # float64 is the oracle's own dtype (plain PyTorch has no error there): absolute bound.
    leaves = [t.requires_grad_() for t in leaves]
    out = Emulated.apply(*leaves)
    ref_out = reference_attention_with_lse(*leaves, causal, scale)[0]
    for name, got, ref in zip(
        ["out", "dq", "dk", "dv"],
        [out, *torch.autograd.grad(out, leaves, grad_out)],
        [ref_out, *torch.autograd.grad(ref_out, leaves, grad_out)],
        strict=True,
    ):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def run_emulator_varlen(emulator, folder: Path, q, k, v, grad_out, lens_q, lens_k, causal, scale):
    """out, lse (H, total_q), dq, dk, dv of the emulated kernels on packed sequences."""
    (folder / "in.bin").write_bytes(
        b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in (q, k, v, grad_out))
    )
    cu = torch.cat([cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")])
    (folder / "cu.bin").write_bytes(cu.numpy().tobytes())
    (_, H, D), Hkv = q.shape, k.shape[1]
    sizes = (len(lens_q), H, Hkv, max(lens_q), max(lens_k), D, int(causal))
    args = [CODES[q.dtype], *(str(x) for x in sizes), repr(scale)]
    files = [str(folder / name) for name in ("in.bin", "out.bin", "cu.bin")]
    subprocess.run([str(emulator), *args, *files], check=True, timeout=120)
    raw = torch.from_numpy(np.fromfile(folder / "out.bin", dtype=np.uint8))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    shapes = [(q.shape, q.dtype), ((H, q.shape[0]), lse_dtype), (q.shape, q.dtype)]
    shapes += [(k.shape, q.dtype), (k.shape, q.dtype)]
    tensors, offset = [], 0
    for shape, dtype in shapes:
        nbytes = torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
        tensors.append(raw[offset : offset + nbytes].clone().view(dtype).reshape(shape))
        offset += nbytes
    assert offset == raw.numel(), "the emulator wrote an unexpected number of bytes"
    return tensors


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

    class Emulated(torch.autograd.Function):
        """The emulator as an autograd op, so the shared float64 rule applies."""

        @staticmethod
        def forward(ctx, q, k, v):
            out, lse, *ctx.grads = run_emulator_varlen(
                emulator, tmp_path, q, k, v, grad_out.to(q.dtype), lens_q, lens_k, causal, scale
            )
            ref_lse = varlen_oracle(q.double(), k.double(), v.double(), lens_q, lens_k, causal)[1]
            assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys"
            finite = torch.isfinite(ref_lse)
            tol = 1e-12 if dtype == torch.float64 else 1e-5  # lse is fp32 or fp64
            torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=tol, rtol=0)
            return out

        @staticmethod
        def backward(ctx, g):
            assert torch.equal(g, grad_out.to(g.dtype)), "emulated with another grad_out"
            return tuple(ctx.grads)

    leaves = [t.to(dtype) for t in (q, k, v)]
    if dtype != torch.float64:
        check_varlen_against_float64(
            Emulated.apply, leaves, grad_out, lens_q, lens_k, causal, what=f"emulated {case}"
        )
        return
    leaves = [t.requires_grad_() for t in leaves]
    out = Emulated.apply(*leaves)
    ref_out = varlen_oracle(*leaves, lens_q, lens_k, causal, scale)[0]
    for name, got, ref in zip(
        ["out", "dq", "dk", "dv"],
        [out, *torch.autograd.grad(out, leaves, grad_out)],
        [ref_out, *torch.autograd.grad(ref_out, leaves, grad_out)],
        strict=True,
    ):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
