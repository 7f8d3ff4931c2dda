"""Test set-up shared by every test file.

Without a GPU the Triton kernels run under the Triton interpreter, which must be switched on before
triton is first imported; with a GPU they run compiled and the same tests cover bf16 too.
"""

import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
