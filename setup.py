"""Builds the optional C++/CUDA extension ``fastgpt._C``; everything else is in pyproject.toml."""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
if sources and os.environ.get("FASTGPT_NO_EXTENSION", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "fastgpt._C",
            sources,
            extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
