"""Validation and the one dispatch decision: clear one-sentence errors, env override, debug log."""

import logging

import pytest
import torch
from oracle import DEVICE, random_qkv, random_tensors

import fastgpt
from fastgpt.attention import last_dim_contiguous, select_backend, unsupported_reason
from fastgpt.envflags import env_flag

QKV = random_qkv(2, 4, 2, 8, 8, 16, device="cpu")  # q (2, 4, 8, 16), k, v (2, 2, 8, 16): valid


def with_kv_shape(shape: tuple[int, ...]) -> list[torch.Tensor]:
    """QKV's q with k and v of another shape."""
    return [QKV[0], *random_tensors(shape, shape, device="cpu")]


BAD_INPUTS = {
    "rank 3 q": (lambda: (torch.randn(4, 8, 16), *QKV[1:]), ValueError, "4-d"),
    "batch mismatch": (lambda: with_kv_shape((3, 2, 8, 16)), ValueError, "batch"),
    "head dim mismatch": (lambda: with_kv_shape((2, 2, 8, 32)), ValueError, "head dim"),
    "heads not divisible": (lambda: with_kv_shape((2, 3, 8, 16)), ValueError, "multiple"),
    "k v length mismatch": (
        lambda: (*QKV[:2], torch.randn(2, 2, 9, 16)),
        ValueError,
        "same shape",
    ),
    "mixed dtypes": (lambda: (*QKV[:2], torch.randn(2, 2, 8, 16).double()), TypeError, "dtype"),
    "integer tensors": (
        lambda: [torch.randint(0, 9, (2, 4, 8, 16)) for _ in range(3)],
        TypeError,
        "floating-point",
    ),
    "not a tensor": (lambda: (QKV[0], [1, 2], QKV[2]), TypeError, "tensors"),
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


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_is_a_clear_error(backend, scale):
    if backend not in fastgpt.available_backends("cpu"):
        pytest.skip(f"backend {backend} is not available on cpu")
    with pytest.raises(ValueError, match=r"scale must be a finite number, got (nan|inf|-inf) \("):
        fastgpt.attention(*QKV, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_head_dim_zero_is_a_clear_error(backend):
    if backend not in fastgpt.available_backends("cpu"):
        pytest.skip(f"backend {backend} is not available on cpu")
    with pytest.raises(ValueError, match=r"head dim.*got 0 \(q \(2, 4, 8, 0\)"):
        fastgpt.attention(*random_qkv(2, 4, 2, 8, 8, 0, device="cpu"), backend=backend)


def test_zero_kv_heads_is_a_clear_error():
    with pytest.raises(ValueError, match=r"key/value heads \(0\)"):
        fastgpt.attention(*with_kv_shape((2, 0, 8, 16)), backend="reference")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_unsupported_reason_is_the_sentence_attention_raises(case):
    make, error, _ = BAD_INPUTS[case]
    tensors = make()
    with pytest.raises(error) as info:
        fastgpt.attention(*tensors, backend="reference")
    assert unsupported_reason(*tensors, "reference") == str(info.value)
    assert unsupported_reason(*QKV, "reference") is None


def test_last_dim_contiguous_copies_only_what_kernels_cannot_read():
    t = torch.randn(2, 3, 5, 4)
    assert last_dim_contiguous(t) is t
    outer = t.transpose(1, 2)  # any outer strides: no copy
    assert last_dim_contiguous(outer) is outer
    strided = t.transpose(2, 3)  # (2, 3, 4, 5), last-dim stride 4
    copy = last_dim_contiguous(strided)
    assert copy.is_contiguous() and torch.equal(copy, strided)
    d1 = torch.randn(2, 3, 1, 5).transpose(2, 3)  # (2, 3, 5, 1): head dim 1, stride never used
    assert d1.stride(-1) != 1 and last_dim_contiguous(d1) is d1


@pytest.mark.parametrize(
    "value,on",
    [("1", True), ("true", True), ("Yes", True), (" on ", True), ("y", True)]
    + [("", False), ("0", False), ("false", False), ("off", False), ("2", False)],
)
def test_env_flag_follows_tritons_rule(monkeypatch, value, on):
    monkeypatch.setenv("FASTGPT_SOME_FLAG", value)
    assert env_flag("FASTGPT_SOME_FLAG") is on
    monkeypatch.delenv("FASTGPT_SOME_FLAG")
    assert env_flag("FASTGPT_SOME_FLAG") is False


def test_float64_is_rejected_by_triton_with_a_clear_error():
    if "triton" not in fastgpt.available_backends("cpu"):
        pytest.skip("triton is not available")
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="triton backend supports"):
        fastgpt.attention(q, q, q, backend="triton")


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown attention backend 'cuda'"):
        fastgpt.attention(*QKV, backend="cuda")


def test_tensors_on_different_devices():
    q, k, v = QKV
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match="one device"):
        fastgpt.attention(q, k.to(other), v, backend="reference")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="Triton kernels need CUDA tensors"):
        fastgpt.attention(*QKV, backend="triton")


def test_env_var_overrides_the_automatic_pick(monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "reference")
    assert select_backend(torch.device("cpu")) == ("reference", "FASTGPT_BACKEND")
    monkeypatch.setenv("FASTGPT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTGPT_BACKEND"):
        fastgpt.attention(*QKV)
    # an explicit argument wins over the environment
    monkeypatch.setenv("FASTGPT_BACKEND", "nonsense")
    assert fastgpt.attention(*QKV, backend="reference").shape == (2, 4, 8, 16)


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
        fastgpt.attention(*QKV, backend="reference")
    assert "-> reference (requested)" in caplog.text
