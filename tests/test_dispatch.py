"""Validation and the one dispatch decision: clear one-sentence errors, env override, debug log."""

import logging

import pytest
import torch
from oracle import DEVICE

import fastgpt
from fastgpt.attention import select_backend


def qkv(q_shape=(2, 4, 8, 16), k_shape=(2, 2, 8, 16), dtype=torch.float32):
    return (
        torch.randn(q_shape, dtype=dtype),
        torch.randn(k_shape, dtype=dtype),
        torch.randn(k_shape, dtype=dtype),
    )


BAD_INPUTS = {
    "rank 3 q": (lambda: (torch.randn(4, 8, 16), *qkv()[1:]), ValueError, "4-d"),
    "batch mismatch": (lambda: qkv(k_shape=(3, 2, 8, 16)), ValueError, "batch"),
    "head dim mismatch": (lambda: qkv(k_shape=(2, 2, 8, 32)), ValueError, "head dim"),
    "heads not divisible": (lambda: qkv(k_shape=(2, 3, 8, 16)), ValueError, "multiple"),
    "k v length mismatch": (
        lambda: (*qkv()[:2], torch.randn(2, 2, 9, 16)),
        ValueError,
        "same shape",
    ),
    "mixed dtypes": (lambda: (*qkv()[:2], torch.randn(2, 2, 8, 16).double()), TypeError, "dtype"),
    "integer tensors": (
        lambda: [torch.randint(0, 9, (2, 4, 8, 16)) for _ in range(3)],
        TypeError,
        "floating-point",
    ),
    "not a tensor": (lambda: (qkv()[0], [1, 2], qkv()[2]), TypeError, "tensors"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_bad_input_raises_one_clear_sentence(backend, case):
    if backend not in fastgpt.available_backends("cpu"):
        pytest.skip(f"backend {backend} is not available on cpu")
    make, error, words = BAD_INPUTS[case]
    with pytest.raises(error, match=words) as info:
        fastgpt.attention(*make(), backend=backend)
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message
    if case != "not a tensor":
        assert "(" in message  # shapes or dtypes are named


def test_head_dim_over_256_is_rejected_by_kernels():
    q = torch.randn(1, 1, 4, 300)
    for backend in set(fastgpt.available_backends("cpu")) - {"reference"}:
        with pytest.raises(ValueError, match="head dims 1..256"):
            fastgpt.attention(q, q, q, backend=backend)


def test_float64_is_rejected_by_triton_with_a_clear_error():
    if "triton" not in fastgpt.available_backends("cpu"):
        pytest.skip("triton is not available")
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="triton backend supports"):
        fastgpt.attention(q, q, q, backend="triton")


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown attention backend 'cuda'"):
        fastgpt.attention(*qkv(), backend="cuda")


def test_tensors_on_different_devices():
    q, k, v = qkv()
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match="one device"):
        fastgpt.attention(q, k.to(other), v, backend="reference")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="Triton kernels need CUDA tensors"):
        fastgpt.attention(*qkv(), backend="triton")


def test_env_var_overrides_the_automatic_pick(monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "reference")
    assert select_backend(torch.device("cpu")) == ("reference", "FASTGPT_BACKEND")
    monkeypatch.setenv("FASTGPT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTGPT_BACKEND"):
        fastgpt.attention(*qkv())
    # an explicit argument wins over the environment
    monkeypatch.setenv("FASTGPT_BACKEND", "nonsense")
    assert fastgpt.attention(*qkv(), backend="reference").shape == (2, 4, 8, 16)


def test_auto_pick(monkeypatch):
    monkeypatch.delenv("FASTGPT_BACKEND", raising=False)
    name, why = select_backend(DEVICE)
    expected = (
        "triton"
        if DEVICE.type == "cuda"
        else ("cpp" if "cpp" in fastgpt.available_backends("cpu") else "reference")
    )
    assert name == expected, why
    assert "reference" in fastgpt.available_backends()


def test_debug_logs_the_decision(monkeypatch, caplog):
    monkeypatch.setenv("FASTGPT_DEBUG", "1")
    with caplog.at_level(logging.DEBUG, logger="fastgpt"):
        fastgpt.attention(*qkv(), backend="reference")
    assert "-> reference (requested)" in caplog.text
