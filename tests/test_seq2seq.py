"""Encoder-decoder: CrossAttention and the blocks vs plain PyTorch in float64, Seq2Seq decoding with
and without caches, and the toy translation task end to end (`fastgpt train --task seq2seq`)."""

import copy
import math
from dataclasses import replace

import pytest
import torch
from oracle import CPU_BACKENDS, rounding_floor

import fastgpt
import fastgpt.nn as fnn
from fastgpt.cli import main
from fastgpt.seq2seq import Seq2Seq, Seq2SeqConfig
from fastgpt.translation import TranslationConfig, reverse_pairs, task_tokenizer, train_translation

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)
HEADS = [(4, None), (4, 2), (4, 1)]  # MHA, GQA, MQA


def plain_attention(q_in, kv_in, q_proj, kv_proj, c_proj, H, Hkv, causal=False):
    """Multi-head attention in plain PyTorch: separate projections, repeated kv heads, softmax."""
    B, Tq, C = q_in.shape
    Tk, D = kv_in.shape[1], C // H
    q = q_proj(q_in).reshape(B, Tq, H, D).transpose(1, 2)  # (B, H, Tq, D)
    k, v = kv_proj(kv_in).split([Hkv * D, Hkv * D], dim=-1)
    k = k.reshape(B, Tk, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)  # (B, H, Tk, D)
    v = v.reshape(B, Tk, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)  # (B, H, Tk, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, Tq, Tk)
    if causal:
        mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
        scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1) @ v  # (B, H, Tq, D)
    return c_proj(y.transpose(1, 2).reshape(B, Tq, C))


def plain_cross(m: fnn.CrossAttention, x, context):
    return plain_attention(x, context, m.q_proj, m.kv_proj, m.c_proj, m.n_head, m.n_kv_head)


def plain_self(m: fnn.CausalSelfAttention, x):
    C = x.shape[-1]
    Hkv_D = m.n_kv_head * m.head_dim

    def q_proj(t):
        return m.c_attn(t)[..., :C]

    def kv_proj(t):
        return m.c_attn(t)[..., C : C + 2 * Hkv_D]

    return plain_attention(x, x, q_proj, kv_proj, m.c_proj, m.n_head, m.n_kv_head, causal=True)


def assert_same_outputs_and_grads(fn, ref_fn, inputs, params):
    """fn and ref_fn agree (float64) on outputs and on gradients of inputs and parameters."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out.square().sum(), [*inputs, *params])
    ref = ref_fn(*inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), [*inputs, *params])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_head,n_kv_head", HEADS)
def test_cross_attention_matches_plain_pytorch(backend, n_head, n_kv_head):
    """Tq = 5 queries on Tk = 11 keys from a context of another width (24): no mask at all."""
    torch.manual_seed(0)
    m = fnn.CrossAttention(32, n_head, n_kv_head, context_dim=24, backend=backend).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 11, 24, dtype=torch.float64, requires_grad=True)
    ref = lambda x, c: plain_cross(m, x, c)  # noqa: E731
    assert_same_outputs_and_grads(m, ref, [x, context], list(m.parameters()))
    assert m(x, context).shape == (2, 5, 32)
    # Keys and values projected once (as decoding does) give the same output.
    torch.testing.assert_close(m(x, kv=m.project_kv(context)), m(x, context), atol=0, rtol=0)


@pytest.mark.skipif(
    "triton" not in fastgpt.available_backends(), reason="Triton cannot run here, not interpreted"
)
def test_cross_attention_on_the_triton_kernels():
    """float32 on the Triton kernels (interpreted on CPU): within twice plain PyTorch's float32
    error of the float64 computation, outputs and gradients (tests/oracle.py's rule)."""
    torch.manual_seed(3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = fnn.CrossAttention(32, 4, 2, context_dim=24, backend="triton").to(device)
    x = torch.randn(2, 5, 32, device=device, requires_grad=True)
    context = torch.randn(2, 11, 24, device=device, requires_grad=True)

    def run(module, fn, dtype):
        module = copy.deepcopy(module).to(dtype)
        xs = [t.detach().to(dtype).requires_grad_() for t in (x, context)]
        out = fn(module, *xs)
        return [out, *torch.autograd.grad(out.square().sum(), [*xs, *module.parameters()])]

    got = run(m, lambda mod, a, c: mod(a, c), torch.float32)
    plain32 = run(m, plain_cross, torch.float32)
    exact = run(m, plain_cross, torch.float64)
    for g, p, e in zip(got, plain32, exact, strict=True):
        bound = 2 * (p.double() - e).abs().max().item() + rounding_floor(e, torch.float32)
        assert (g.double() - e).abs().max().item() <= bound


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_head,n_kv_head", HEADS)
def test_encoder_block_matches_plain_pytorch(backend, n_head, n_kv_head):
    torch.manual_seed(1)
    block = fnn.EncoderBlock(32, n_head, n_kv_head, backend=backend).double()

    def ref(x):
        h = block.ln_1(x)
        x = x + plain_cross(block.attn, h, h)  # bidirectional: every position sees every other
        return x + block.mlp.c_proj(torch.relu(block.mlp.c_fc(block.ln_2(x))))

    x = torch.randn(3, 9, 32, dtype=torch.float64, requires_grad=True)
    assert_same_outputs_and_grads(block, ref, [x], list(block.parameters()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_head,n_kv_head", HEADS)
def test_decoder_block_matches_plain_pytorch(backend, n_head, n_kv_head):
    torch.manual_seed(2)
    block = fnn.DecoderBlock(32, n_head, n_kv_head, backend=backend).double()

    def ref(x, memory):
        x = x + plain_self(block.self_attn, block.ln_1(x))  # masked self-attention
        x = x + plain_cross(block.cross_attn, block.ln_2(x), memory)  # q: decoder, k/v: encoder
        return x + block.mlp.c_proj(torch.relu(block.mlp.c_fc(block.ln_3(x))))

    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 10, 32, dtype=torch.float64, requires_grad=True)
    assert_same_outputs_and_grads(block, ref, [x, memory], list(block.parameters()))


def test_cross_attention_clear_errors():
    m = fnn.CrossAttention(16, 2)
    x, context = torch.randn(1, 3, 16), torch.randn(1, 4, 16)
    with pytest.raises(NotImplementedError, match="no key padding yet"):
        m(x, context, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"context of width 16, got context \(1, 4, 8\)"):
        m(x, torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="same batch size"):
        m(x, torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="exactly one of context or kv"):
        m(x)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        fnn.CrossAttention(16, 4, 3)


def test_sinusoidal_positions():
    pe = fnn.sinusoidal_positions(50, 7, start=3)  # odd width on purpose
    assert pe.shape == (50, 7)
    p, i = 10, 2  # row 10 is position 13
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(13 / 10000 ** (2 * i / 7)), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(13 / 10000 ** (2 * i / 7)), abs=1e-6)
    assert torch.equal(fnn.sinusoidal_positions(53, 7)[3:], pe)


def small_seq2seq(**overrides) -> Seq2Seq:
    torch.manual_seed(0)
    cfg = dict(vocab_size=20, block_size=12, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    return Seq2Seq(Seq2SeqConfig(**{**cfg, **overrides})).eval()


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_cached_decoding_equals_uncached(positions):
    model = small_seq2seq(positions=positions)
    src = torch.randint(2, 20, (3, 7))
    # Logits: the cached decoder, one position at a time, against the whole target at once.
    tgt = torch.randint(2, 20, (3, 9))
    full = model.decode(tgt, memory=model.encode(src))  # (3, 9, V)
    kvs = model.memory_kvs(model.encode(src))
    caches = [fnn.KVCache(12) for _ in model.decoder]
    steps = [model.decode(tgt[:, t : t + 1], memory_kvs=kvs, kv_caches=caches) for t in range(9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # Tokens: greedy and sampled decoding give the same ids either way.
    for temperature in (0.0, 1.0):
        outs = [
            model.generate(
                src,
                12,
                sos_id=1,
                end_id=0,
                temperature=temperature,
                generator=torch.Generator().manual_seed(5),
                use_cache=use_cache,
            )
            for use_cache in (True, False)
        ]
        assert outs[0].shape[0] == 3 and torch.equal(outs[0], outs[1])


def test_seq2seq_runs_every_attention_through_fastgpt(monkeypatch):
    calls = []
    real = fnn.attention

    def spy(q, k, v, *, causal, backend):
        calls.append((causal, q.shape[2], k.shape[2]))
        return real(q, k, v, causal=causal, backend=backend)

    monkeypatch.setattr(fnn, "attention", spy)
    model = small_seq2seq()
    src, tgt = torch.randint(2, 20, (2, 7)), torch.randint(2, 20, (2, 5))
    _, loss = model(src, tgt, tgt)
    assert loss.item() == pytest.approx(math.log(20), rel=0.1)  # init: close to ln(vocab)
    # 2 encoder self-attentions (7 x 7), per decoder layer a causal 5 x 5 and a cross 5 x 7.
    assert calls == [(False, 7, 7)] * 2 + [(True, 5, 5), (False, 5, 7)] * 2


def test_seq2seq_clear_errors():
    assert fastgpt.Seq2Seq is Seq2Seq and fastgpt.Seq2SeqConfig is Seq2SeqConfig
    model = small_seq2seq()
    with pytest.raises(ValueError, match="source of 13 positions: the model's block_size is 12"):
        model.encode(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="same batch size"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="positions must be 'sinusoidal' or 'learned'"):
        Seq2SeqConfig(positions="rotary")


def test_reverse_task():
    pairs = reverse_pairs()
    assert len(pairs) == 13  # the rhyme's 16 lines, 3 of them repeated
    assert pairs[0] == ("mary had a little lamb", "lamb little a had mary")
    tok = task_tokenizer()
    assert tok.vocab[:2] == ["<END>", "<SOS>"] and tok.vocab_size == 36


def test_translation_training_reaches_exact_match(tmp_path, capsys):
    """`fastgpt train --task seq2seq` then `fastgpt sample` on its checkpoint (about 10 s)."""
    out = str(tmp_path / "s2s")
    assert main(["train", "--task", "seq2seq", "--out", out, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "exact match 13/13 lines" in printed
    argv = ["sample", "--ckpt", out, "--prompt", "Mary had a little lamb", "--device", "cpu"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "lamb little a had mary\n"
    argv[4] = "to see a lamb at school\nwhich was against the rules"
    assert main(argv) == 0
    assert capsys.readouterr().out == "school at lamb a see to\nrules the against was which\n"
    assert main([*argv[:4], "mary had a zebra", "--device", "cpu"]) == 2
    assert "Unknown word 'zebra'" in capsys.readouterr().err


def test_translation_training_returns_its_metrics(tmp_path):
    result = train_translation(
        TranslationConfig(out=str(tmp_path), steps=3, device="cpu", progress=False)
    )
    assert len(result["losses"]) == 3 and result["lines"] == 13
    assert result["losses"][0] == pytest.approx(math.log(36), rel=0.15)
    # A second run into the same folder is refused; --overwrite replaces the run.
    again = TranslationConfig(out=str(tmp_path), steps=2, device="cpu", progress=False)
    with pytest.raises(ValueError, match="holds a run at step 3; use --resume"):
        train_translation(again)
    assert len(train_translation(replace(again, overwrite=True))["losses"]) == 2


def test_train_task_seq2seq_refuses_data(tmp_path, capsys):
    argv = ["train", "--task", "seq2seq", "--data", "x.txt", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--data does not apply to --task seq2seq" in capsys.readouterr().err
