"""Sampling: `fastgpt sample --ckpt OUT [--prompt TEXT ...] [--tokens N] ...`.

from fastgpt.sample import sample
print(sample("out", prompt="mary had a", tokens=20, seed=0))
for piece in stream_text(model, tok, "mary had a", 20): print(piece, end="", flush=True)
for i, piece in stream_batch(model, tok, ["mary had", "the lamb"], 20): ...  # one batch
"""

import math
import shutil
from collections.abc import Iterator
from typing import TextIO

import torch

from fastgpt.devices import pick_device
from fastgpt.errors import FastGPTError
from fastgpt.kvcache import check_page_size
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


class TokenText:
    """The text of one sequence's new tokens, piece by piece: a byte-level BPE token can end
    inside a UTF-8 character, so up to MAX_HELD_TOKENS are held back until the text is whole."""

    def __init__(self, tok, before: list[int]) -> None:
        self.tok = tok
        self.before = before  # decoded context of the next piece (spaces, line starts)
        self.held: list[int] = []

    def add(self, token: int) -> str | None:
        """The text the token completes, or None while it is held back."""
        self.held.append(token)
        text = self.tok.decode(self.before + self.held)
        if text.endswith("\ufffd") and len(self.held) < MAX_HELD_TOKENS:
            return None  # the middle of a UTF-8 character: wait for its other bytes
        return self.flush()

    def flush(self) -> str | None:
        """The text of the tokens held back (None if none)."""
        if not self.held:
            return None
        text, head = self.tok.decode(self.before + self.held), self.tok.decode(self.before)
        self.before, self.held = self.held[-1:], []
        return text[len(head) :] if text.startswith(head) else text


def stream_batch(
    model: GPT,
    tok,
    prompts: list[str],
    tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    page_size: int | None = None,
) -> Iterator[tuple[int, str]]:
    """Several prompts sampled as one batch: yields (prompt index, text) pieces, each prompt's
    own text first, then the text of each token as soon as it is drawn (GPT.generate_stream:
    one KV-cache row per prompt; page_size: a paged cache). The pieces of one index joined are
    what stream_text gives for that prompt alone when decoding greedily.
    """
    ids = [_prompt_ids(model, tok, p, tokens, temperature, top_k) for p in prompts]
    if page_size is not None:
        check_page_size(page_size)
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    starts = [row or [tok.start_id()] for row in ids]  # an empty prompt starts a new line
    texts = [TokenText(tok, row[-1:]) for row in starts]
    for b, row in enumerate(ids):
        if row:
            yield b, tok.decode(row)
    was_training = model.training
    model.eval()
    try:
        steps = model.generate_stream(
            starts, tokens, temperature, top_k, generator, page_size=page_size
        )
        for rows, new in steps:
            for b, token in zip(rows, new.tolist(), strict=True):
                piece = texts[b].add(token)
                if piece is not None:
                    yield b, piece
        for b, text in enumerate(texts):
            piece = text.flush()
            if piece is not None:
                yield b, piece
    finally:
        model.train(was_training)


def stream_text(
    model: GPT,
    tok,
    prompt: str = "",
    tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    page_size: int | None = None,
) -> Iterator[str]:
    """The prompt, then the text of each sampled token as soon as it is drawn.

    The pieces joined are generate_text's result. An empty prompt starts at the beginning of a
    line. A prompt longer than the model's context, or one that tokenizes to nothing, is an error
    (FastGPTError): it is not cropped or dropped silently.
    """
    for _, piece in stream_batch(model, tok, [prompt], tokens, temperature, top_k, seed, page_size):
        yield piece


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
    page_size: int | None = None,
) -> Iterator[str]:
    """sample() piece by piece, as stream_text yields them (what `fastgpt sample` prints)."""
    for _, piece in stream_prompts(
        ckpt, [prompt], tokens, temperature, top_k, seed, device, backend, page_size
    ):
        yield piece


def stream_prompts(
    ckpt: str,
    prompts: list[str],
    tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    backend: str | None = None,
    page_size: int | None = None,
) -> Iterator[tuple[int, str]]:
    """Load a checkpoint and sample several prompts as one batch: stream_batch's pieces."""
    from fastgpt.checkpoint import load_model

    model, tok, _ = load_model(ckpt, pick_device(device), backend)
    yield from stream_batch(model, tok, prompts, tokens, temperature, top_k, seed, page_size)


def read_prompts_file(path: str) -> list[str]:
    """The prompts of a UTF-8 file, one per line (blank lines skipped); FastGPTError if none."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\r\n") for line in f if line.strip()]
    except OSError as e:
        raise FastGPTError(f"--prompts-file {path}: cannot read it ({e.strerror}).") from None
    except UnicodeDecodeError:
        raise FastGPTError(f"--prompts-file {path} is not UTF-8 text.") from None
    if not prompts:
        raise FastGPTError(f"--prompts-file {path} holds no prompt (one per line).")
    return prompts


def write_streams(pieces: Iterator[tuple[int, str]], count: int, out: TextIO) -> None:
    """Print several streams readably. On a terminal: one live line per prompt, labelled [1],
    [2], ... and redrawn as tokens arrive (the tail that fits the width, newlines shown as " / "),
    then each full text. Elsewhere (a pipe, a file): each full text once all are done.
    """
    texts = [""] * count
    live = out.isatty()
    width = shutil.get_terminal_size().columns - 1
    if live:
        out.write("\n" * count)
    for b, piece in pieces:
        texts[b] += piece
        if live:  # cursor up `count` lines, rewrite every line
            lines = (_live_line(b, t, width) for b, t in enumerate(texts))
            out.write(f"\x1b[{count}F" + "".join(f"\x1b[2K{line}\n" for line in lines))
            out.flush()
    if live:
        out.write(f"\x1b[{count}F\x1b[J")  # the live lines give way to the full texts
    out.write("\n\n".join(f"[{b + 1}] {text}" for b, text in enumerate(texts)) + "\n")
    out.flush()


def _live_line(b: int, text: str, width: int) -> str:
    label, flat = f"[{b + 1}] ", text.replace("\n", " / ")
    room = max(1, width - len(label))
    return label + (flat if len(flat) <= room else "..." + flat[-max(1, room - 3) :])
