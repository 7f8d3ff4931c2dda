"""Batched generation of prompts of different lengths (GPT.generate, fastgpt.generation) and the
per-sequence KV cache under it (fastgpt.nn.KVCache, dense and paged): batched greedy decoding
gives every prompt exactly the tokens it gets alone.

Prompt mixes hit: one token, the whole context (block_size 12), a prompt longer than the context
(recomputed on its last 12 tokens from the start), budgets that run past the context, a budget
of 0, and rows that stop at different steps.
"""

import io

import pytest
import torch
from oracle import F64, random_tensors

import fastgpt.nn as fnn
from fastgpt import checkpoint, data
from fastgpt.cli import main
from fastgpt.generation import decode_batch
from fastgpt.kvcache import attention_with_kvcache
from fastgpt.model import GPT, GPTConfig, preset_config
from fastgpt.sample import write_streams
from fastgpt.tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

BLOCK = 12
PROMPTS = [[3], [5, 1, 4, 1, 5, 9, 2], list(range(1, 13)), [7, 7], list(range(14, 0, -1))]
BUDGETS = [20, 6, 3, 0, 9]


def small_gpt(dtype=torch.float32, **overrides) -> GPT:
    """A tiny GPT whose greedy tokens depend on positions and context (GPT-2's initialisation
    with a tied head only repeats the last token): untied head, no biases, embeddings drawn
    N(0, 1), other weights N(0, 0.3)."""
    torch.manual_seed(0)
    config = dict(vocab_size=37, block_size=BLOCK, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    model = GPT(GPTConfig(**{**config, "tie_head": False, "bias": False, **overrides}))
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=1.0 if name.startswith(("wte", "wpe")) else 0.3)
    return model.eval().to(dtype)


def alone(model: GPT, prompt: list[int], n: int, **kwargs) -> list[int]:
    """The prompt generated on its own (B = 1, the tensor path), as a list."""
    return model.generate(torch.tensor([prompt]), n, temperature=0, **kwargs)[0].tolist()


@pytest.mark.parametrize("page_size", [None, 16], ids=["dense", "paged16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_greedy_equals_one_at_a_time(page_size, dtype):
    model = small_gpt(dtype)
    want = [alone(model, p, n) for p, n in zip(PROMPTS, BUDGETS, strict=True)]
    got = model.generate(PROMPTS, BUDGETS, temperature=0, page_size=page_size)
    assert got == want
    assert [len(g) - len(p) for g, p in zip(got, PROMPTS, strict=True)] == BUDGETS


def test_without_a_cache_and_from_a_padded_tensor_the_same():
    model = small_gpt()
    want = model.generate(PROMPTS, BUDGETS, temperature=0)
    assert model.generate(PROMPTS, BUDGETS, temperature=0, use_cache=False) == want
    padded = torch.zeros(len(PROMPTS), 14, dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        padded[b, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    assert model.generate(padded, BUDGETS, temperature=0, lengths=lengths) == want


def test_each_row_stops_after_its_end_token():
    model = small_gpt()
    free = [alone(model, p, 10)[len(p) :] for p in PROMPTS[:3]]
    end_id = free[0][3]  # row 0 draws it at its 4th step; others may or may not
    got = model.generate(PROMPTS[:3], 10, temperature=0, end_id=end_id)
    for prompt, new, row in zip(PROMPTS, free, got, strict=False):
        stop = new.index(end_id) + 1 if end_id in new else len(new)
        assert row == prompt + new[:stop]
    assert len(got[0]) <= len(PROMPTS[0]) + 4  # row 0 stopped early


def test_the_stream_names_the_rows_that_drew_a_token():
    model = small_gpt()
    steps = list(decode_batch(model, [[1, 2], [3]], [1, 3], temperature=0))
    assert [rows for rows, _ in steps] == [[0, 1], [1], [1]]
    assert all(tokens.shape == (len(rows),) for rows, tokens in steps)


def test_uniform_tensor_batches_keep_their_tensor_result_and_seeded_sampling():
    model = small_gpt()
    prompt = torch.randint(0, 37, (3, 4), generator=torch.Generator().manual_seed(1))
    out = model.generate(prompt, 5, temperature=0)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 9)
    assert out.tolist() == model.generate(prompt.tolist(), 5, temperature=0)

    def sampled(seed):
        gen = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 8, temperature=1.0, top_k=5, generator=gen, page_size=16)

    assert torch.equal(sampled(4), sampled(4))


@pytest.mark.parametrize(
    "args, message",
    [
        (([[1], []], 3), r"at least one token .* prompt lengths \[1, 0\]"),
        (([[1], [2]], [3]), r"one int >= 0 per prompt \(2\), got \[3\]"),
        (([[1], [2]], -1), r"one int >= 0 per prompt \(2\), got \[-1, -1\]"),
    ],
)
def test_bad_batches_are_one_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        small_gpt().generate(*args, temperature=0)
    with pytest.raises(ValueError, match=r"lengths must give one length in 0..2"):
        small_gpt().generate(torch.zeros(2, 2, dtype=torch.long), 1, lengths=[1, 3])
    with pytest.raises(ValueError, match="page size of 8 is not supported"):
        small_gpt().generate([[1]], 1, page_size=8)


# --- fastgpt.nn.KVCache: one length per row, dense or paged ---------------------------------------


def test_paged_cache_takes_pages_as_rows_grow_and_frees_them():
    cache = fnn.KVCache(64, page_size=16)
    q, k, v = random_tensors((3, 5, 4, 8), (3, 5, 2, 8), (3, 5, 2, 8), dtype=torch.float64)
    cache.attend(q, k, v)
    assert cache.lengths == [5, 5, 5] and cache.k.shape == (3, 16, 2, 8)  # one page each
    cache.rewind([1, 5, 3])
    for _ in range(12):  # row 1 reaches 17 positions: a second page; the others stay in one
        cache.attend(q[:, :1], k[:, :1], v[:, :1])
    assert cache.lengths == [13, 17, 15] and [len(p) for p in cache.pages] == [1, 2, 1]
    assert cache.k.shape[0] == 6 and len(cache.free) == 2  # the pool doubled
    second_page = cache.pages[1]
    cache.select([1])  # rows 0 and 2 finish: their pages return to the pool
    assert cache.lengths == [17] and cache.pages == [second_page]
    assert sorted(cache.free + second_page) == list(range(6))
    assert cache.block_table.tolist() == [second_page + [0, 0]]


def test_ragged_cache_rows_match_attention_on_each_row_alone():
    """attend() on a ragged batch gives each row what a one-row dense cache gives it."""
    q, k, v = random_tensors((2, 1, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8), dtype=torch.float64)
    for page_size in (None, 16):
        cache = fnn.KVCache(32, page_size)
        cache.attend(q.expand(2, 6, 4, 8), k, v)
        cache.rewind([6, 2])
        got = cache.attend(q, k[:, :1], v[:, :1])  # (2, 1, 4, 8)
        for b, n in enumerate((6, 2)):
            keys = torch.cat([k[b : b + 1, :n], k[b : b + 1, :1]], dim=1)  # (1, n + 1, 2, 8)
            values = torch.cat([v[b : b + 1, :n], v[b : b + 1, :1]], dim=1)
            want = attention_with_kvcache(q[b : b + 1], keys, values, cache_seqlens=n + 1)
            torch.testing.assert_close(got[b : b + 1], want, **F64)


def test_an_attention_fn_needs_a_dense_cache_of_one_length():
    cache = fnn.KVCache(8, page_size=16)
    with pytest.raises(NotImplementedError, match="dense KV cache whose rows are one length"):
        cache.append(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))


# --- fastgpt sample with several prompts --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint_dir(tmp_path_factory):
    tok = build_tokenizer("word", data.DEFAULT_CORPUS)
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", vocab_size=tok.vocab_size))
    out = tmp_path_factory.mktemp("sample") / "run"
    checkpoint.save_checkpoint(out, 0, model, tok, {"model": model.config.to_dict()}, {})
    return str(out)


def test_cli_samples_two_prompts_as_one_batch(tiny_checkpoint_dir, capsys, tmp_path):
    """Greedy: each labelled text is what the prompt gets alone (a paged cache, too)."""
    common = ["--ckpt", tiny_checkpoint_dir, "--tokens", "9", "--temperature", "0"]
    common += ["--device", "cpu"]
    alone = []
    for prompt in ("mary had", "the lamb was"):
        assert main(["sample", "--prompt", prompt, *common]) == 0
        alone.append(capsys.readouterr().out.rstrip("\n"))
    assert alone[0].startswith("mary had ") and alone[1].startswith("the lamb was")
    want = f"[1] {alone[0]}\n\n[2] {alone[1]}\n"
    argv = ["sample", "--prompt", "mary had", "--prompt", "the lamb was", *common]
    assert main(argv + ["--page-size", "16"]) == 0
    assert capsys.readouterr().out == want
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("mary had\n\nthe lamb was\n")
    assert main(["sample", "--prompts-file", str(prompts), *common]) == 0
    assert capsys.readouterr().out == want
    assert main(["sample", "--prompt", "mary had", *common, "--page-size", "8"]) == 2
    assert "A page size of 8 is not supported" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_streams_are_live_lines_on_a_terminal():
    out = Terminal()
    pieces = [(0, "mary had"), (1, "the lamb"), (0, " a"), (1, "\nwas"), (0, " lamb")]
    write_streams(iter(pieces), 2, out)
    text = out.getvalue()
    assert "\x1b[2K[1] mary had a\n\x1b[2K[2] the lamb / was\n" in text  # redrawn as they come
    assert text.endswith("[1] mary had a lamb\n\n[2] the lamb\nwas\n")


def test_an_attention_fn_still_decodes_from_a_dense_cache():
    """GPT(config, attention_fn=torch SDPA) generates with the cache's (B, Hkv, Tk, D) views."""

    def sdpa(q, k, v, *, causal, backend):
        tq, tk = q.shape[2], k.shape[2]
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)  # bottom-right causal
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True
        )

    model = small_gpt(torch.float64)
    with_fn = GPT(model.config, attention_fn=sdpa).double().eval()
    with_fn.load_state_dict(model.state_dict())
    prompt = torch.tensor([[5, 1, 4], [9, 2, 6]])
    assert torch.equal(with_fn.generate(prompt, 8, 0.0), model.generate(prompt, 8, 0.0))
