"""Training text: the embedded default corpus, or UTF-8 .txt files; token arrays and batches.

A corpus from --data is tokenized once into uint16 (uint32 past 65,535 tokens) memmaps beside the
checkpoint (OUT/data/train.bin, val.bin), reused while the files and the tokenizer are unchanged.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastgpt.errors import FastGPTError
from fastgpt.files import replacing, write_atomic

# The seed notebook's corpus: "Mary Had a Little Lamb" as sung, 16 lines, 34 distinct words.
RHYME = """\
mary had a little lamb
little lamb little lamb
mary had a little lamb
its fleece was white as snow
and everywhere that mary went
mary went mary went
everywhere that mary went
the lamb was sure to go
it followed her to school one day
school one day school one day
it followed her to school one day
which was against the rules
it made the children laugh and play
laugh and play laugh and play
it made the children laugh and play
to see a lamb at school
"""

# The poem as printed (Sarah Josepha Hale, 1830; public domain): `--data embedded:poem`.
POEM = """\
Mary had a little lamb,
Its fleece was white as snow;
And everywhere that Mary went
The lamb was sure to go.
It followed her to school one day,
Which was against the rule;
It made the children laugh and play
To see a lamb at school.
And so the teacher turned it out,
But still it lingered near,
And waited patiently about
Till Mary did appear.
"Why does the lamb love Mary so?"
The eager children cry;
"Why, Mary loves the lamb, you know,"
The teacher did reply.
"""

EMBEDDED = {"rhyme": RHYME, "poem": POEM}  # --data embedded:NAME
DEFAULT_CORPUS = RHYME

VAL_FRACTION = 0.1
# A held-out split needs this many windows of block_size + 1 tokens to estimate a loss at all.
MIN_VAL_WINDOWS = 8


def text_files(path: str | os.PathLike) -> list[Path]:
    """The file at path, or the .txt files under the folder at path (sorted, recursive)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"The folder {path} has no .txt files.")
        return files
    raise FileNotFoundError(f"No file or folder at {path}.")


def read_text(path: str | os.PathLike) -> str:
    """UTF-8 text of a file, or of a folder's .txt files joined; clear errors for bad input."""
    parts = []
    for file in text_files(path):
        raw = file.read_bytes()
        if b"\x00" in raw[:65536]:
            raise ValueError(f"{file} looks binary (it has NUL bytes); --data needs UTF-8 text.")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{file} is not UTF-8 text (invalid byte at offset {e.start}); --data needs "
                "UTF-8 text."
            ) from None
        if text.strip():
            parts.append(text if text.endswith("\n") else text + "\n")
    if not parts:
        raise ValueError(f"{path} holds no text (empty or whitespace only).")
    return "".join(parts)


def fingerprint(path: str | os.PathLike) -> str:
    """Changes when any input file changes (path, size, modification time)."""
    h = hashlib.sha256()
    for file in text_files(path):
        st = file.stat()
        h.update(f"{file.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def encode(tok, text: str) -> np.ndarray:
    """Token ids of text as the smallest unsigned array that holds them (uint16 or uint32)."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    if hasattr(tok, "encode_batch"):  # BPE: encode lines in parallel
        ids = [i for line in tok.encode_batch(text.splitlines(keepends=True)) for i in line]
    else:
        ids = tok.encode(text)
    return np.asarray(ids, dtype=dtype)


def embedded_text(data: str | None) -> str | None:
    """The embedded text that --data names (None: the rhyme; "embedded:NAME"), else None."""
    if data is None:
        return DEFAULT_CORPUS
    if not data.startswith("embedded:"):
        return None
    name = data.removeprefix("embedded:")
    if name not in EMBEDDED:
        raise ValueError(
            f"No embedded text {name!r}; expected embedded:{' or embedded:'.join(EMBEDDED)}."
        )
    return EMBEDDED[name]


def too_small_for_validation(n_tokens: int, block_size: int) -> bool:
    """True when VAL_FRACTION of n_tokens holds fewer than MIN_VAL_WINDOWS windows of context."""
    return int(n_tokens * VAL_FRACTION) < MIN_VAL_WINDOWS * (block_size + 1)


def no_validation_note(n_tokens: int, block_size: int) -> str:
    """The one line `fastgpt train` prints when it trains on every token and reports no val loss."""
    return (
        f"no validation: {VAL_FRACTION:.0%} of {n_tokens} tokens holds fewer than "
        f"{MIN_VAL_WINDOWS} windows of {block_size + 1} tokens, too few to estimate a held-out "
        "loss (a model this size memorises the text); every token trains, training loss only"
    )


def split(ids: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last VAL_FRACTION of the tokens is validation.

    A corpus too small for a held-out estimate (too_small_for_validation) is all training: val is
    empty, and the trainer reports training loss only.
    """
    if len(ids) < block_size + 1:
        raise ValueError(
            f"The corpus has {len(ids)} tokens, too few for a context of {block_size} tokens "
            f"(need {block_size + 1})."
        )
    if too_small_for_validation(len(ids), block_size):
        return ids, ids[:0]
    n_val = int(len(ids) * VAL_FRACTION)
    return ids[:-n_val], ids[-n_val:]


def cached_split(
    path: str | os.PathLike, tok, block_size: int, cache_dir: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """split() of the corpus at path, memory-mapped from cache_dir (tokenized on first use)."""
    cache_dir = Path(cache_dir)
    tok_hash = hashlib.sha256(json.dumps(tok.to_dict(), sort_keys=True).encode()).hexdigest()
    key = {"source": fingerprint(path), "tokenizer": tok_hash, "block_size": block_size}
    meta_path = cache_dir / "meta.json"
    if cache_dir.is_symlink():
        raise FastGPTError(f"{cache_dir} is a link; the token cache must be a real folder.")
    if _cached_key(meta_path) != key:
        train, val = split(encode(tok, read_text(path)), block_size)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for name, arr in (("train", train), ("val", val)):
            with replacing(cache_dir / f"{name}.bin") as f:  # exclusive temp file, renamed
                arr.tofile(f)
        meta = {"key": key, "dtype": train.dtype.name, "train": len(train), "val": len(val)}
        write_atomic(meta_path, json.dumps(meta))
    meta = json.loads(meta_path.read_text())
    return tuple(
        np.memmap(cache_dir / f"{name}.bin", dtype=meta["dtype"], mode="r", shape=(meta[name],))
        if meta[name]
        else np.empty(0, dtype=meta["dtype"])  # no validation split: nothing to map
        for name in ("train", "val")
    )


def _cached_key(meta_path: Path) -> dict | None:
    """The key the token cache was written for; None when there is no readable cache."""
    try:
        return json.loads(meta_path.read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def get_batch(
    ids: np.ndarray, offsets: Tensor, block_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Windows of ids starting at offsets (N,) -> inputs x and next-token targets y, (N, T) each."""
    rows = np.stack([ids[i : i + block_size + 1] for i in offsets.tolist()]).astype(np.int64)
    xy = torch.from_numpy(rows)  # (N, T + 1)
    if device.type == "cuda":  # from pinned memory the copy overlaps with the GPU's work
        xy = xy.pin_memory()
    xy = xy.to(device, non_blocking=True)
    return xy[:, :-1], xy[:, 1:]  # (N, T) each
