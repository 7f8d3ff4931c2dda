"""Sampling: `fastgpt sample --ckpt OUT [--prompt TEXT] [--tokens N] ...`.

from fastgpt.sample import sample
print(sample("out", prompt="mary had a", tokens=20, seed=0))
for piece in stream_text(model, tok, "mary had a", 20): print(piece, end="", flush=True)
"""

import math
from collections.abc import Iterator

import torch

from fastgpt.devices import pick_device
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT

# A byte-level BPE token can end inside a UTF-8 character; hold at most this many tokens back
# until the text they decode to is whole again.
MAX_HELD_TOKENS = 8


def _prompt_ids(model: GPT, tok, prompt: str, tokens: int, temperature: float, top_k) -> list:
    """The prompt's token ids, after checking every sampling argument (FastGPTError if bad)."""
    if tokens < 0:
        raise FastGPTError(f"--tokens must be >= 0, got {tokens}.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise FastGPTError(f"--temperature must be a finite number >= 0, got {temperature}.")
    if top_k is not None and top_k <= 0:
        raise FastGPTError(f"--top-k must be positive, got {top_k}.")
    ids = tok.encode(prompt, close_lines=False) if prompt else []
    if prompt and not ids:
        raise FastGPTError(
            f"The prompt {prompt[:40]!r} has no tokens for the {tok.kind} tokenizer (it keeps "
            "no punctuation-only text); give a prompt with words of the training text."
        )
    block = model.config.block_size
    if len(ids) > block:
        raise FastGPTError(
            f"The prompt is {len(ids)} tokens long but the model's context is {block} tokens; "
            f"give a prompt of at most {block} tokens."
        )
    return ids


def stream_text(
    model: GPT,
    tok,
    prompt: str = "",
    tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> Iterator[str]:
    """The prompt, then the text of each sampled token as soon as it is drawn.

    The pieces joined are generate_text's result. An empty prompt starts at the beginning of a
    line. A prompt longer than the model's context, or one that tokenizes to nothing, is an error
    (FastGPTError): it is not cropped or dropped silently.
    """
    ids = _prompt_ids(model, tok, prompt, tokens, temperature, top_k)
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if ids:
        yield tok.decode(ids)
    before = ids[-1:] or [tok.start_id()]  # decoded context of the next piece (spaces, lines)
    held: list[int] = []
    was_training = model.training
    model.eval()
    try:
        idx = torch.tensor([ids or before], dtype=torch.long, device=device)  # (1, T)
        new = model.generate_tokens(idx, tokens, temperature, top_k, generator)
        for next_id in new:
            held.append(int(next_id))
            text, head = tok.decode(before + held), tok.decode(before)
            if text.endswith("\ufffd") and len(held) < MAX_HELD_TOKENS:
                continue  # the middle of a UTF-8 character: wait for its other bytes
            yield text[len(head) :] if text.startswith(head) else text
            before, held = held[-1:], []
        if held:
            text, head = tok.decode(before + held), tok.decode(before)
            yield text[len(head) :] if text.startswith(head) else text
    finally:
        model.train(was_training)


def generate_text(
    model: GPT,
    tok,
    prompt: str = "",
    tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> str:
    """The prompt continued by `tokens` sampled tokens, as text (stream_text's pieces joined)."""
    return "".join(stream_text(model, tok, prompt, tokens, temperature, top_k, seed))


def sample(
    ckpt: str,
    prompt: str = "",
    tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    backend: str | None = None,
) -> str:
    """Load a checkpoint (a training output folder or a checkpoint folder) and sample from it."""
    return "".join(stream(ckpt, prompt, tokens, temperature, top_k, seed, device, backend))


def stream(
    ckpt: str,
    prompt: str = "",
    tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    backend: str | None = None,
) -> Iterator[str]:
    """sample() piece by piece, as stream_text yields them (what `fastgpt sample` prints)."""
    from fastgpt.checkpoint import load_model

    model, tok, _ = load_model(ckpt, pick_device(device), backend)
    yield from stream_text(model, tok, prompt, tokens, temperature, top_k, seed)
