"""Training text: the embedded default corpus, or UTF-8 .txt files; token arrays and batches.

A corpus from --data is tokenized once into uint16 (uint32 past 65,535 tokens) memmaps beside the
checkpoint (OUT/data/train.bin, val.bin), reused while the files and the tokenizer are unchanged.

Documents: each file of a --data folder is one, and --doc-sep splits a file into several. The
token stream stays one array; the token offsets where documents start go beside it (OUT/data/
train_docs.bin, val_docs.bin, int64). get_document_batch cuts each training window at those
offsets: cu_seqlens for GPT.forward (attention within a document, positions restarting), and no
target asks a document's last token to predict the next document's first. The embedded corpus is
one stream without documents.
"""

import hashlib
import json
import os
from dataclasses import dataclass
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


def _read_file(file: Path) -> str:
    """UTF-8 text of one file; clear errors for binary or non-UTF-8 bytes."""
    raw = file.read_bytes()
    if b"\x00" in raw[:65536]:
        raise ValueError(f"{file} looks binary (it has NUL bytes); --data needs UTF-8 text.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{file} is not UTF-8 text (invalid byte at offset {e.start}); --data needs UTF-8 text."
        ) from None


def read_documents(path: str | os.PathLike, doc_sep: str | None = None) -> list[str]:
    """The documents at path: each .txt file one, split on doc_sep when given (the separator is
    dropped); each ends with a newline, empty or whitespace-only ones are left out."""
    if doc_sep == "":
        raise ValueError("--doc-sep must not be empty.")
    documents = []
    for file in text_files(path):
        text = _read_file(file)
        for piece in text.split(doc_sep) if doc_sep else [text]:
            if doc_sep:
                piece = piece.lstrip("\r\n")  # the line break that followed the separator
            if piece.strip():
                documents.append(piece if piece.endswith("\n") else piece + "\n")
    if not documents:
        raise ValueError(f"{path} holds no text (empty or whitespace only).")
    return documents


def read_text(path: str | os.PathLike) -> str:
    """UTF-8 text of a file, or of a folder's .txt files joined; clear errors for bad input."""
    return "".join(read_documents(path))


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


def encode_documents(tok, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids of the documents one after another, int64 (N,) offset where each starts).

    Documents that encode to no token are left out."""
    pieces = [ids for ids in (encode(tok, text) for text in documents) if len(ids)]
    if not pieces:
        raise ValueError("The documents hold no token of this tokenizer.")
    lengths = np.array([len(ids) for ids in pieces], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.concatenate(pieces), starts


def split_starts(starts: np.ndarray, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """Document starts of the train tokens [0, n_train) and of the val tokens after them (a
    document cut by the split continues as the first of val, starting at 0)."""
    val = starts[starts >= n_train] - n_train
    if not len(val) or val[0] != 0:
        val = np.concatenate([[0], val]).astype(np.int64)
    return starts[starts < n_train], val


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


@dataclass
class Corpus:
    """Train and val token ids, and the offsets where their documents start (int64, 0 first);
    the starts are None for one stream without documents (the embedded texts)."""

    train: np.ndarray
    val: np.ndarray
    train_starts: np.ndarray | None = None
    val_starts: np.ndarray | None = None

    @property
    def has_documents(self) -> bool:
        """More than one document (one stream, or one file, has nothing to keep apart)."""
        return any(s is not None and len(s) > 1 for s in (self.train_starts, self.val_starts))


def cached_split(
    path: str | os.PathLike, tok, block_size: int, cache_dir: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """split() of the corpus at path, memory-mapped from cache_dir (tokenized on first use)."""
    corpus = cached_corpus(path, tok, block_size, cache_dir)
    return corpus.train, corpus.val


def cached_corpus(
    path: str | os.PathLike,
    tok,
    block_size: int,
    cache_dir: str | os.PathLike,
    doc_sep: str | None = None,
) -> Corpus:
    """The documents at path (read_documents) tokenized, split() and memory-mapped from cache_dir
    (tokenized on first use, again when the files, tokenizer or separator change)."""
    cache_dir = Path(cache_dir)
    tok_hash = hashlib.sha256(json.dumps(tok.to_dict(), sort_keys=True).encode()).hexdigest()
    key = {"source": fingerprint(path), "tokenizer": tok_hash, "block_size": block_size}
    key["doc_sep"] = doc_sep
    meta_path = cache_dir / "meta.json"
    if cache_dir.is_symlink():
        raise FastGPTError(f"{cache_dir} is a link; the token cache must be a real folder.")
    if _cached_key(meta_path) != key:
        ids, starts = encode_documents(tok, read_documents(path, doc_sep))
        train, val = split(ids, block_size)
        arrays = dict(zip(("train", "val"), (train, val), strict=True))
        arrays |= dict(
            zip(("train_docs", "val_docs"), split_starts(starts, len(train)), strict=True)
        )
        cache_dir.mkdir(parents=True, exist_ok=True)
        for name, arr in arrays.items():
            with replacing(cache_dir / f"{name}.bin") as f:  # exclusive temp file, renamed
                arr.tofile(f)
        meta = {"key": key, "dtype": train.dtype.name, **{k: len(a) for k, a in arrays.items()}}
        write_atomic(meta_path, json.dumps(meta))
    meta = json.loads(meta_path.read_text())
    train, val = (_mapped(cache_dir, name, meta) for name in ("train", "val"))
    starts = (_mapped(cache_dir, name, meta, np.int64) for name in ("train_docs", "val_docs"))
    return Corpus(train, val, *starts)


def _mapped(cache_dir: Path, name: str, meta: dict, dtype=None) -> np.ndarray:
    """The cached array `name` (memory-mapped; an empty array when it has no element)."""
    dtype = dtype or meta["dtype"]
    if not meta[name]:
        return np.empty(0, dtype=dtype)  # e.g. no validation split: nothing to map
    return np.memmap(cache_dir / f"{name}.bin", dtype=dtype, mode="r", shape=(meta[name],))


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


def count_targets(starts: np.ndarray, offsets: Tensor, block_size: int) -> int:
    """How many targets of the windows at offsets (N,) count: block_size each, less those that are
    a document's first token (get_document_batch ignores them); at least 1."""
    first = offsets.numpy().astype(np.int64) + 1  # (N,) each window's first target
    ignored = np.searchsorted(starts, first + block_size) - np.searchsorted(starts, first)
    return max(int(len(first) * block_size - ignored.sum()), 1)


def get_document_batch(
    ids: np.ndarray, starts: np.ndarray, offsets: Tensor, block_size: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """get_batch for a corpus of documents starting at `starts` (int64, sorted): (x, y, cu_seqlens).

    x, y: (N, T). cu_seqlens: int32 (S + 1,) prefix sums of the pieces of documents the N windows
    hold, over x.flatten() (a window is cut where a document starts). A target that is the first
    token of a document is -100 (ignored by the loss): no document predicts the next one.
    """
    x, y = get_batch(ids, offsets, block_size, device)
    lengths, ignored = [], []
    for row, start in enumerate(offsets.tolist()):
        lo, hi = np.searchsorted(starts, [start + 1, start + block_size + 1])
        cuts = starts[lo:hi] - start  # (k,) document starts inside (start, start + T]
        ignored += [row * block_size + c - 1 for c in cuts.tolist()]  # targets at c - 1
        edges = [0, *cuts[cuts < block_size].tolist(), block_size]
        lengths += [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    if ignored:
        y = y.flatten().index_fill(0, torch.tensor(ignored, device=device), -100).view(y.shape)
    cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32).to(device, non_blocking=True)
    return x, y, cu
