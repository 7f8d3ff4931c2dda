"""The one-pass Triton backward (kernels/flash_bwd_onepass.py), forced by
FASTGPT_TRITON_BACKWARD=onepass, against the float64 oracle, and its switch.

Under the interpreter the kernel runs with one config (BLOCK_M=16 query rows, BLOCK_N=32 keys), so
the lengths below put ragged tiles, the causal diagonal and the unmasked interior in different
tiles; each program walks every key tile of one KV head and adds ds k into the dq accumulator.
"""

import os

import pytest
import torch
from oracle import DEVICE, INTERPRETED, check_against_float64, random_qkv

import fastgpt

triton = pytest.importorskip("triton")
if DEVICE.type != "cuda" and not INTERPRETED:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastgpt.kernels import attention as ka  # noqa: E402

SWITCH = "FASTGPT_TRITON_BACKWARD"


@pytest.fixture(autouse=True)
def onepass(monkeypatch):
    """Every test here runs the one-pass backward, and fails if the two passes ran instead."""
    monkeypatch.setenv(SWITCH, "onepass")
    calls = []
    inner = ka.onepass_backward

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(ka, "onepass_backward", counted)
    return calls


def triton_attention(causal, **variants):
    def fn(q, k, v):
        return fastgpt.attention(q, k, v, causal=causal, backend="triton", **variants)

    return fn


# (B, H, Hkv, Tq, Tk, D): odd lengths 1, 17, 97 on both sides, Tq != Tk both ways, GQA and MQA.
CASES = {
    "one_query": (1, 2, 2, 1, 17, 16),
    "more_keys_gqa": (1, 4, 2, 17, 97, 16),
    "more_queries_mqa": (1, 3, 1, 97, 17, 16),
    "square_d40": (2, 2, 1, 33, 33, 40),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_onepass_gradients_match_float64(case, causal, dtype, onepass):
    *leaves, grad_out = random_qkv(*CASES[case], torch.float64, grad_out=True, seed=3)
    leaves = [t.to(dtype) for t in leaves]
    check_against_float64(triton_attention(causal), leaves, grad_out, causal, what=case)
    assert onepass, "the one-pass backward did not run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_onepass_extreme_scores_do_not_overflow(causal, dtype, onepass):
    """Scores near 1e3 (as test_attention.test_extreme_scores_do_not_overflow)."""
    *leaves, grad_out = random_qkv(1, 2, 2, 70, 70, 64, torch.float64, grad_out=True)
    q, k, v = leaves
    leaves = [(q * 14).to(dtype), (k * 14).to(dtype), v.to(dtype)]
    scores = (leaves[0].double() @ leaves[1].double().transpose(-2, -1)) / 8
    assert scores.abs().max() > 500  # the case really is extreme
    check_against_float64(triton_attention(causal), leaves, grad_out, causal, what="extreme")
    assert onepass


def test_onepass_is_bit_identical_across_runs(onepass):
    q, k, v = random_qkv(1, 8, 2, 45, 53, 32, seed=0)  # 4 query heads per kv head, ragged tiles
    out, lse = ka.attention_forward(q, k, v, True, 0.2)
    grad_out = torch.randn_like(out)
    first = ka.attention_backward(grad_out, q, k, v, out, lse, True, 0.2)
    second = ka.attention_backward(grad_out, q, k, v, out, lse, True, 0.2)
    assert len(onepass) == 2
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not INTERPRETED, reason="same tiles as the dK/dV pass only in the interpreter")
def test_onepass_dk_dv_are_the_dkdv_pass_bits(monkeypatch, onepass):
    """dk, dv are summed as the two-pass dK/dV kernel sums them (same tiles, same order)."""
    q, k, v = random_qkv(1, 4, 2, 37, 50, 16, seed=1)
    out, lse = ka.attention_forward(q, k, v, True, 0.3)
    grad_out = torch.randn_like(out)
    one = ka.attention_backward(grad_out, q, k, v, out, lse, True, 0.3)
    monkeypatch.setenv(SWITCH, "twopass")
    two = ka.attention_backward(grad_out, q, k, v, out, lse, True, 0.3, dkdv_split=1)
    assert len(onepass) == 1
    assert torch.equal(one[1], two[1]) and torch.equal(one[2], two[2])
    assert (one[0] - two[0]).abs().max() < 1e-5 * two[0].abs().max()  # dq: another key tiling


@pytest.mark.parametrize("value", ["", "auto", "twopass", " TwoPass "])
def test_auto_and_twopass_run_the_two_passes(monkeypatch, value, onepass):
    monkeypatch.setenv(SWITCH, value)
    assert ka.backward_mode() == "twopass"
    q, k, v = random_qkv(1, 2, 1, 5, 7, 16, seed=2)
    out, lse = ka.attention_forward(q, k, v, False, 0.25)
    ka.attention_backward(torch.ones_like(out), q, k, v, out, lse, False, 0.25)
    assert not onepass


def test_a_bad_switch_value_raises_one_sentence(monkeypatch):
    monkeypatch.setenv(SWITCH, "threepass")
    with pytest.raises(ValueError, match="FASTGPT_TRITON_BACKWARD='threepass' is not one of"):
        ka.backward_mode()


def test_onepass_leaves_its_one_spilling_case_to_the_two_passes():
    # sm_80-class GPUs at head dim 256 with a window: the one-pass kernel's only row spills there.
    assert not ka.onepass_compiles_clean((8, 0), 256, window=True)
    assert ka.onepass_compiles_clean((8, 0), 256, window=False)
    assert ka.onepass_compiles_clean((8, 0), 128, window=True)
    assert ka.onepass_compiles_clean((9, 0), 256, window=True)
    assert ka.onepass_compiles_clean(None, 256, window=True)  # the interpreter


# (window, causal, softcap, sinks, (B, H, Hkv, Tq, Tk, D)): each variant once, GQA and Tq != Tk.
VARIANT_CASES = [
    ((3, 5), False, 0.0, False, (1, 2, 1, 17, 40, 8)),
    ((20, -1), True, 0.0, True, (1, 4, 2, 45, 30, 8)),
    ((-1, -1), True, 1.5, False, (1, 2, 2, 33, 50, 8)),
    ((8, 0), False, 1.5, True, (1, 4, 1, 40, 40, 8)),
]


@pytest.mark.parametrize("window,causal,softcap,sinks,shape", VARIANT_CASES)
def test_onepass_variants_within_the_rule(window, causal, softcap, sinks, shape, onepass):
    from test_variants import check_triton_variants

    check_triton_variants(shape, causal, window, softcap, sinks, torch.float32)
    assert onepass


def test_the_onepass_bench_provider_switches_only_its_backward(monkeypatch, onepass):
    """bench's fastgpt-triton-onepass provider runs the one-pass backward and leaves the switch as
    it found it (unset here), so the providers timed after it keep the environment's choice."""
    from fastgpt.bench.providers import triton_backward

    monkeypatch.delenv(SWITCH)
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 1, 9, 12, 16, seed=4))
    out = triton_backward("onepass")(q, k, v, True)
    out.backward(torch.ones_like(out))
    assert len(onepass) == 1 and SWITCH not in os.environ
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = fastgpt.attention(*leaves, causal=True, backend="triton")  # the two passes
    ref.backward(torch.ones_like(ref))
    assert torch.equal(out, ref) and len(onepass) == 1
    for got, want in zip((q, k, v), leaves, strict=True):
        assert (got.grad - want.grad).abs().max() <= 1e-5 * want.grad.abs().max()
