"""Test set-up shared by every test file.

Without a GPU the Triton kernels run under the Triton interpreter, which must be switched on before
triton is first imported; with a GPU they run compiled and the same tests cover bf16 too.
"""

import logging
import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """For tiny models: one thread runs them faster than several (and shares the CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def debug_log(caplog, monkeypatch):
    """The FASTGPT_DEBUG lines logged while a test runs: call it for the list so far."""
    monkeypatch.setenv("FASTGPT_DEBUG", "1")
    caplog.set_level(logging.DEBUG, logger="fastgpt")
    return lambda: [r.getMessage() for r in caplog.records]


@pytest.fixture
def hf_paths(debug_log):
    """The paths fastgpt's Hugging Face attention took while a test runs (FASTGPT_DEBUG's log):
    call it for the list so far."""
    return lambda: [m.split("-> ")[1] for m in debug_log() if m.startswith("hf_attention")]
