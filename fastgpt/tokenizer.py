"""Tokenizers: word-level (the seed notebook's), character-level, and byte-level BPE.

All three learn their vocabulary from the training text (nothing is downloaded) and are saved with
the checkpoint as one JSON file (`to_dict` / `tokenizer_from_dict`).

    tok = build_tokenizer("word", text)
    ids = tok.encode("mary had a little lamb")
    text = tok.decode(ids)
"""

import json
import re

END = "<END>"  # the word tokenizer's token closing each line
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")  # lowercase words, inner apostrophes kept

KINDS = ("word", "char", "bpe")


class _VocabTokenizer:
    """A tokenizer with an explicit list of tokens (words or characters) learned from the text."""

    kind = ""
    unit = ""  # what one token is, for error messages

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = list(vocab)
        self.index = {t: i for i, t in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def ids(self, tokens: list[str]) -> list[int]:
        """Ids of tokens; ValueError naming the ones the vocabulary does not have."""
        unknown = sorted({t for t in tokens if t not in self.index})
        if unknown:
            shown = ", ".join(repr(t) for t in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            plural = "s" if len(unknown) > 1 else ""
            raise ValueError(
                f"Unknown {self.unit}{plural} {shown}: the {self.kind}-level vocabulary has only "
                f"the {self.vocab_size} {self.unit}s of the training text."
            )
        return [self.index[t] for t in tokens]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab": self.vocab}


class WordTokenizer(_VocabTokenizer):
    """Lowercase words, punctuation dropped, and an <END> token closing each non-empty line."""

    kind, unit = "word", "word"

    @staticmethod
    def split(text: str) -> list[str]:
        words = []
        for line in text.lower().splitlines():
            line_words = _WORD.findall(line)
            if line_words:
                words += [*line_words, END]
        return words

    @classmethod
    def train(cls, text: str) -> "WordTokenizer":
        words = cls.split(text)
        if not words:
            raise ValueError("The training text has no words for the word-level tokenizer.")
        return cls([END] + sorted(set(words) - {END}))

    def encode(self, text: str, close_lines: bool = True) -> list[int]:
        """Token ids of text; close_lines=False leaves the last line open (a prompt to continue)."""
        words = self.split(text)
        if not close_lines and words and not text.rstrip(" \t").endswith("\n"):
            words = words[:-1]  # drop the <END> of the unfinished last line
        return self.ids(words)

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            word = self.vocab[i]
            out.append("\n" if word == END else (" " if out and out[-1] != "\n" else "") + word)
        return "".join(out)

    def start_id(self) -> int:
        """The token to start from with an empty prompt: the beginning of a line."""
        return self.index[END]


class CharTokenizer(_VocabTokenizer):
    """One token per character of the training text."""

    kind, unit = "char", "character"

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        if not text:
            raise ValueError("The training text is empty.")
        return cls(sorted(set(text)))

    def encode(self, text: str, close_lines: bool = True) -> list[int]:
        return self.ids(list(text))

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def start_id(self) -> int:
        return self.index.get("\n", 0)


class BPETokenizer:
    """Byte-level BPE (as GPT-2's) trained on the training text with Hugging Face `tokenizers`."""

    kind = "bpe"

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int = 1024) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not text:
            raise ValueError("The training text is empty.")
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown input
            show_progress=False,
        )
        hf.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, close_lines: bool = True) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, lines: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(lines)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids))

    def start_id(self) -> int:
        ids = self.hf.encode("\n").ids
        return ids[0] if ids else 0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "hf": json.loads(self.hf.to_str())}


Tokenizer = WordTokenizer | CharTokenizer | BPETokenizer


def build_tokenizer(kind: str, text: str, vocab_size: int = 1024) -> Tokenizer:
    """Learn a tokenizer of `kind` ("word", "char", "bpe") from text (vocab_size for BPE)."""
    if kind == "word":
        return WordTokenizer.train(text)
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    raise ValueError(f"Unknown tokenizer {kind!r}; expected one of {', '.join(KINDS)}.")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    kind = d.get("kind")
    if kind == "word":
        return WordTokenizer(d["vocab"])
    if kind == "char":
        return CharTokenizer(d["vocab"])
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(d["hf"])))
    raise ValueError(f"Unknown tokenizer kind {kind!r} in the saved tokenizer.")


def save_tokenizer(tok: Tokenizer, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tok.to_dict(), f, ensure_ascii=False)


def load_tokenizer(path) -> Tokenizer:
    with open(path, encoding="utf-8") as f:
        return tokenizer_from_dict(json.load(f))
