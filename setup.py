"""Builds the optional C++/CUDA extension ``fastgpt._C``; everything else is in pyproject.toml.

Environment switches:
    FASTGPT_NO_EXTENSION=1  build no extension (fastgpt then runs on Triton / the reference path)
    FASTGPT_CUDA=1 / =0     force / skip the CUDA kernels (default: on when torch has CUDA and
                            nvcc is found)
    FASTGPT_CPU_VEC=0       build the CPU kernel without AVX2 (default: AVX2 when this machine
                            and torch support it; the build is then for machines like this one)
    MAX_JOBS=N              parallel compile jobs (ninja)
"""

import glob
import os
import platform

from setuptools import setup


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value in (None, "") else value


def _cpu_vector_flags() -> list[str]:
    """AVX2 + FMA for at::vec when torch itself runs its AVX2 kernels on this machine."""
    import torch

    if _flag("FASTGPT_CPU_VEC") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def _openmp_flags() -> list[str]:
    """at::parallel_for is inlined: it needs OpenMP when torch's parallel backend is OpenMP."""
    import torch

    if torch._C.has_openmp and platform.system() == "Linux":
        return ["-fopenmp"]
    return []


def _link_flags() -> list[str]:
    """csrc/cpu/blas.h calls torch's bundled BLAS through weak symbols; macOS must allow them."""
    if platform.system() == "Darwin":
        return ["-Wl,-U,_sgemm_", "-Wl,-U,_dgemm_"]
    return []


def _want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    choice = _flag("FASTGPT_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if choice == "1" and not available:
        raise RuntimeError(
            "FASTGPT_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME), "
            f"found torch {torch.__version__} and CUDA_HOME={CUDA_HOME}."
        )
    return available if choice is None else choice == "1"


def _extensions():
    if _flag("FASTGPT_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    omp = _openmp_flags()
    link = [*omp, *_link_flags()]
    cxx = ["-O3", "-g0", "-Wno-unknown-pragmas", *omp, *_cpu_vector_flags()]
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            "fastgpt._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "fastgpt._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
