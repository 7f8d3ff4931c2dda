"""Padded and packed Hugging Face batches on fastgpt.attention_varlen (fastgpt.hf_varlen).

Tiny GPT-2 and Llama (GQA) models from from_config (nothing downloaded), the same weights under
"eager", "sdpa" and fastgpt. Padded batches (left and right) are compared with eager on the real
tokens, packed rows (position_ids restarting, DataCollatorWithFlattening) with each sequence run
alone, generate() on a left-padded batch with eager's greedy tokens. FASTGPT_DEBUG's log and the
profiler show that fastgpt's varlen op ran, not torch's SDPA.
"""

import re

import pytest
import torch
from oracle import F64

import fastgpt
from fastgpt.hf_varlen import layout_from_mask, layout_from_positions

pytest.importorskip("transformers")
from hf_tiny import CONFIGS, PAD, build  # noqa: E402

NAME = fastgpt.register_hf_attention()
ARCHS = list(CONFIGS)
VARLEN_OP = re.compile(r"fastgpt::\w+_attention_varlen_forward")


def padded_batch(side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, attention_mask (3, 9): rows of 6, 9 and 8 real tokens padded on `side`."""
    ids = torch.randint(2, PAD, (3, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, n_pad in ((0, 3), (2, 1)):
        if side == "left":
            mask[row, :n_pad] = 0
        else:
            mask[row, 9 - n_pad :] = 0
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_match_eager_on_real_tokens(arch, side, hf_paths):
    """float32: Llama's eager softmax runs in float32 (and turns a float64 mask into NaN rows)."""
    ids, mask = padded_batch(side)
    real = mask.bool()
    with torch.no_grad():
        want = build(arch, "eager")(ids, attention_mask=mask).logits[real]
        got = build(arch, NAME)(ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(got, want)
    taken = hf_paths()
    assert taken and all(p.startswith("fastgpt varlen") for p in taken), taken


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_loss_and_gradients_match_sdpa_float64(arch, hf_paths):
    """Training on a padded batch (labels -100 at the pads): loss and every gradient as sdpa's."""
    ids, mask = padded_batch("right", seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for implementation in ("sdpa", NAME):
        model = build(arch, implementation, torch.float64)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in model.parameters())])
    for i, (got, want) in enumerate(zip(*reversed(results), strict=True)):
        torch.testing.assert_close(got, want, **F64, msg=lambda m, i=i: f"tensor {i}: {m}")
    assert hf_paths() and all(p.startswith("fastgpt varlen") for p in hf_paths()), hf_paths()


def alone_logits(model, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(1, T, V) logits of each sequence of the packed row ids (1, T) run alone, concatenated."""
    pieces = ids[0].split(lengths)
    return torch.cat([model(piece[None], use_cache=False).logits for piece in pieces], dim=1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("use_cache", [False, True], ids=["mask", "no-mask"])
def test_packed_position_ids_match_each_sequence_alone(arch, use_cache, hf_paths):
    """position_ids restarting per sequence. Without a cache transformers builds a packed mask;
    with one (use_cache=True, eval's default) it passes no mask, and fastgpt reads position_ids."""
    lengths = [4, 1, 7, 5]
    ids = torch.randint(2, PAD, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, T)
    model = build(arch, NAME, torch.float64)
    with torch.no_grad():
        got = model(ids, position_ids=position_ids, use_cache=use_cache).logits
        want = alone_logits(build(arch, "sdpa", torch.float64), ids, lengths)
    torch.testing.assert_close(got, want, **F64)
    assert hf_paths() and all(p.startswith("fastgpt varlen (4 sequences") for p in hf_paths()), (
        hf_paths()
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_flattening_collator_matches_each_sequence_alone(arch, hf_paths):
    """DataCollatorWithFlattening's cu_seq_lens_q/k kwargs, loss and gradients included."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DataCollatorWithFlattening"):
        pytest.skip("this transformers has no DataCollatorWithFlattening")
    lengths = [5, 2, 6]
    gen = torch.Generator().manual_seed(3)
    features = [{"input_ids": torch.randint(2, PAD, (n,), generator=gen).tolist()} for n in lengths]
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collate(features)
    model = build(arch, NAME, torch.float64)
    out = model(**batch)
    out.loss.backward()
    reference = build(arch, "sdpa", torch.float64)
    with torch.no_grad():
        want = alone_logits(reference, batch["input_ids"], lengths)
    torch.testing.assert_close(out.logits.detach(), want, **F64)
    # The loss of each sequence alone, weighted by its predicted tokens, is the packed loss.
    losses = [
        reference(torch.tensor([f["input_ids"]]), labels=torch.tensor([f["input_ids"]])).loss
        for f in features
    ]
    want_loss = sum(loss * (n - 1) for loss, n in zip(losses, lengths, strict=True)) / (
        sum(lengths) - len(lengths)
    )
    torch.testing.assert_close(out.loss, want_loss, **F64)
    want_loss.backward()
    for got_p, want_p in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got_p.grad, want_p.grad, **F64)
    assert hf_paths() and all(p.startswith("fastgpt varlen (3 sequences") for p in hf_paths()), (
        hf_paths()
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_left_padded_batch_matches_eager(arch, hf_paths):
    """A left-padded batch of prompts: the prefill and every decoding step against the padded
    cache run on the varlen kernels; greedy tokens as eager's."""
    ids, mask = padded_batch("left", seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    want = build(arch, "eager").generate(ids, **kwargs)
    got = build(arch, NAME).generate(ids, **kwargs)
    assert torch.equal(got, want), f"fastgpt {got.tolist()} != eager {want.tolist()}"
    taken = hf_paths()
    assert "fastgpt varlen (3 sequences of a (3, 9) batch, longest 9)" in taken, taken
    assert "fastgpt varlen (3 sequences of a (3, 1) batch, longest 1)" in taken, taken
    assert all(p.startswith("fastgpt varlen") for p in taken), taken


def test_profiler_shows_the_varlen_op_and_no_sdpa():
    ids, mask = padded_batch("left")
    model = build("llama", NAME)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    ops = {e.name for e in prof.events()}
    assert any(VARLEN_OP.fullmatch(name) for name in ops), sorted(ops)
    assert not any("scaled_dot_product" in name for name in ops), sorted(ops)


def test_other_masks_fall_back_and_say_why(hf_paths):
    """A 4-D mask that is not padding or packing (here a sliding window of 3) goes to sdpa."""
    ids = torch.randint(2, PAD, (2, 8), generator=torch.Generator().manual_seed(5))
    i = torch.arange(8)
    window = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)  # (T, T)
    mask = window.expand(2, 1, 8, 8)
    with torch.no_grad():
        got = build("gpt2", NAME, torch.float64)(ids, attention_mask=mask).logits
        want = build("gpt2", "sdpa", torch.float64)(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, **F64)
    taken = hf_paths()
    assert taken and all(p.startswith("transformers sdpa (a mask that is neither") for p in taken)


def causal(t_q: int, t_k: int) -> torch.Tensor:
    """(Tq, Tk) bool, bottom-right causal."""
    return torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)


def test_layout_of_left_padding_while_decoding():
    """Two new queries against a cache of 5, the first row padded by 3 on the left."""
    valid = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = (causal(2, 7) & valid[:, None, :])[:, None]  # (2, 1, 2, 7)
    layout = layout_from_mask(mask, 2)
    assert layout.cu_seqlens_q.tolist() == [0, 2, 4]
    assert layout.cu_seqlens_k.tolist() == [0, 4, 11]
    assert layout.k_index.tolist() == [3, 4, 5, 6, *range(7, 14)]
    assert layout.q_index is None and (layout.max_seqlen_q, layout.max_seqlen_k) == (2, 7)


def test_layout_of_right_padding_and_a_fully_padded_row():
    valid = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mask = (causal(4, 4) & valid[:, None, :])[:, None]
    layout = layout_from_mask(mask, 3)
    assert layout.q_index.tolist() == [0, 1, 8, 9, 10, 11]
    assert layout.cu_seqlens_q.tolist() == layout.cu_seqlens_k.tolist() == [0, 2, 6]


def test_layout_of_float_packing_mask_and_refusals():
    docs = torch.tensor([0, 0, 1, 1, 1, 2])
    packed = causal(6, 6) & (docs[:, None] == docs[None, :])
    as_float = torch.zeros(1, 1, 6, 6).masked_fill(~packed, float("-inf"))
    assert layout_from_mask(as_float, 1).cu_seqlens_q.tolist() == [0, 2, 5, 6]
    holed = causal(4, 4) & torch.tensor([1, 0, 1, 1], dtype=torch.bool)  # a hole in the padding
    assert "neither" in layout_from_mask(holed[None, None], 1)
    bias = torch.zeros(1, 1, 4, 4).masked_fill(~causal(4, 4), float("-inf"))
    bias[0, 0, 3, 0] = 0.5
    assert "bias" in layout_from_mask(bias, 1)
    assert "not (B, 1, Tq, Tk)" in layout_from_mask(causal(4, 4).expand(1, 2, 4, 4), 1)


def test_layout_from_positions():
    assert layout_from_positions(torch.arange(5)[None], 2) is None  # one sequence per row
    layout = layout_from_positions(torch.tensor([[0, 1, 0, 1, 2], [3, 4, 5, 0, 1]]), 2)
    assert layout.cu_seqlens_q.tolist() == [0, 2, 5, 8, 10] and layout.max_seqlen_q == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_a_static_cache_matches_eager(arch, hf_paths):
    """A static cache: its queries do not sit at the last Tq keys, so its masks are no padding
    layout; they go to transformers' sdpa and the tokens stay eager's."""
    ids, mask = padded_batch("left", seed=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    kwargs["cache_implementation"] = "static"
    want = build(arch, "eager").generate(ids, **kwargs)
    got = build(arch, NAME).generate(ids, **kwargs)
    assert torch.equal(got, want), f"fastgpt {got.tolist()} != eager {want.tolist()}"
    assert any(p.startswith("transformers sdpa") for p in hf_paths()), hf_paths()


def test_the_mask_is_read_once_per_forward(monkeypatch):
    """Every layer gets the same mask tensor: its layout is read for the first layer only."""
    import fastgpt.hf

    reads = []

    def counting(mask, batch):
        reads.append(mask.shape)
        return layout_from_mask(mask, batch)

    monkeypatch.setattr(fastgpt.hf, "layout_from_mask", counting)
    ids, mask = padded_batch("right")
    model = build("llama", NAME)  # 2 layers
    with torch.no_grad():
        model(ids, attention_mask=mask)
        assert reads == [(3, 1, 9, 9)]
        model(ids, attention_mask=mask)  # a new forward builds a new mask: read again
    assert len(reads) == 2
