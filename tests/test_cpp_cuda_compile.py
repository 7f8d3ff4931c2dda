"""The CUDA kernels of the C++ extension, checked without a GPU or a CUDA build of torch.

csrc/cuda/attention_kernels.cuh holds all device code without torch includes, so every kernel is
instantiated here for each dtype and compiled with nvcc for sm_80 (A100) and sm_90 (H100). A
host-only program checks that each kernel's shared memory at head dim 256 fits an A100 block
(163 KiB), so a kernel that could not launch fails here rather than on a user's GPU. Then
tests/cpp_cuda_emulator.cpp runs the kernels on the CPU, one thread per block, against float64
attention (outputs, lse and gradients). Races need a real GPU: tests/test_cpp_extension.py runs
the same checks through the extension when one is present.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgpt.reference import reference_attention_with_lse

KERNELS = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
EMULATOR = Path(__file__).resolve().parent / "cpp_cuda_emulator.cpp"
A100_SHARED_BYTES = 163 * 1024
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
    cmd = [NVCC, "-std=c++17", "-O2", f"-I{KERNELS}", *args]
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(EMULATED_CASES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_kernels_emulated_on_cpu_match_float64(emulator, tmp_path, dtype, case, causal):
    B, H, Hkv, Tq, Tk, D = EMULATED_CASES[case]
    g = torch.Generator().manual_seed(Tq * 100 + Tk)
    q, k, v, grad_out = (
        torch.randn(*shape, generator=g, dtype=dtype)
        for shape in ((B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, Tq, D))
    )
    (tmp_path / "in.bin").write_bytes(b"".join(t.numpy().tobytes() for t in (q, k, v, grad_out)))
    scale = D**-0.5
    args = [str(x) for x in ("d" if dtype == torch.float64 else "f", B, H, Hkv, Tq, Tk, D)]
    args += [str(int(causal)), repr(scale), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")]
    subprocess.run([str(emulator), *args], check=True, timeout=120)

    raw = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=q.numpy().dtype))
    out, lse, dq, dk, dv = raw.split([q.numel(), B * H * Tq, q.numel(), k.numel(), k.numel()])
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention_with_lse(*leaves, causal, scale)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad_out.double())
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    got = {"out": out, "dq": dq, "dk": dk, "dv": dv}
    for (name, value), ref in zip(got.items(), (ref_out, *ref_grads), strict=True):
        torch.testing.assert_close(value.double(), ref.flatten(), atol=atol, rtol=0, msg=name)
    lse, ref_lse = lse.double(), ref_lse.flatten()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=atol, rtol=0)
