"""The CUDA kernels of the C++ extension compile with plain nvcc, no GPU or CUDA torch needed.

csrc/cuda/attention_kernels.cuh holds all device code without torch includes, so every kernel is
instantiated here for each dtype and compiled for sm_80 (A100) and sm_90 (H100). A host-only
program then checks that each kernel's shared memory at head dim 256 fits an A100 block
(163 KiB), so a kernel that could not launch fails here rather than on a user's GPU. Correctness
on a GPU is checked by tests/test_cpp_extension.py when one is present.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
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
