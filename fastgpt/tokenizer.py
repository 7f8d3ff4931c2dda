"""Tokenizers: word-level (the seed notebook's), character-level, and three subword tokenizers
trained with Hugging Face `tokenizers`: byte-level BPE (GPT-2's), WordPiece (BERT's) and Unigram
(SentencePiece's algorithm).

All of them learn their vocabulary from the training text (nothing is downloaded) and are saved with
the checkpoint as one JSON file (`to_dict` / `tokenizer_from_dict`).

    tok = build_tokenizer("word", text)
    ids = tok.encode("mary had a little lamb")
    text = tok.decode(ids)
"""

import json
import re

END = "<END>"  # the word tokenizer's token closing each line
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")  # lowercase words, inner apostrophes kept

KINDS = ("word", "char", "bpe", "wordpiece", "unigram")


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


class HFTokenizer:
    """A subword tokenizer trained on the training text with Hugging Face `tokenizers`."""

    kind = ""

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer

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


class BPETokenizer(HFTokenizer):
    """Byte-level BPE (as GPT-2's): merges the likeliest pair of symbols, starting from the 256
    bytes, until the vocabulary is full. Every text encodes: nothing is unknown."""

    kind = "bpe"

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


SPACE = "\u2581"  # "▁": SentencePiece's visible space; words keep their leading space as it


class _MetaspaceTokenizer(HFTokenizer):
    """Spaces become "▁" and start a new word (SentencePiece's convention, no space prepended);
    punctuation, newlines and other whitespace are pieces of their own. So decoding is joining
    the pieces and turning "▁" back into spaces: exact for any text of known characters.
    Characters the training text lacks decode as the unknown token."""

    continuation = ""  # prefix of a piece that continues a word (WordPiece's "##")

    @classmethod
    def new_hf(cls, model):
        from tokenizers import Regex, Tokenizer, pre_tokenizers

        hf = Tokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never"),
                # Newlines, other whitespace and punctuation stand alone, as the words do.
                pre_tokenizers.Split(Regex(rf"[^\w{SPACE}]"), behavior="isolated"),
            ]
        )
        return hf

    def decode(self, ids: list[int]) -> str:
        pieces = (self.hf.id_to_token(i) for i in ids)
        n = len(self.continuation)
        text = "".join(p[n:] if n and p.startswith(self.continuation) else p for p in pieces)
        return text.replace(SPACE, " ")


class WordPieceTokenizer(_MetaspaceTokenizer):
    """WordPiece (BERT's): from the characters up, merges the pair with the highest
    count(ab) / (count(a) count(b)); a word is encoded greedily by its longest known prefix, and
    pieces after the first carry "##"."""

    kind, continuation = "wordpiece", "##"
    unknown = "[UNK]"

    @classmethod
    def train(cls, text: str, vocab_size: int = 1024) -> "WordPieceTokenizer":
        from tokenizers import models, trainers

        if not text:
            raise ValueError("The training text is empty.")
        hf = cls.new_hf(models.WordPiece(unk_token=cls.unknown, max_input_chars_per_word=1000))
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=[cls.unknown], show_progress=False
        )
        hf.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(hf)


class UnigramTokenizer(_MetaspaceTokenizer):
    """Unigram language model (SentencePiece's default): starts from many candidate pieces and
    drops those whose removal costs the corpus likelihood least; a text is encoded as its most
    likely segmentation (Viterbi)."""

    kind = "unigram"
    unknown = "<unk>"

    @classmethod
    def train(cls, text: str, vocab_size: int = 1024) -> "UnigramTokenizer":
        from tokenizers import models, trainers

        if not text:
            raise ValueError("The training text is empty.")
        hf = cls.new_hf(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=[cls.unknown],
            unk_token=cls.unknown,
            show_progress=False,
        )
        hf.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(hf)


SUBWORD = {"bpe": BPETokenizer, "wordpiece": WordPieceTokenizer, "unigram": UnigramTokenizer}
Tokenizer = WordTokenizer | CharTokenizer | BPETokenizer | WordPieceTokenizer | UnigramTokenizer


def build_tokenizer(kind: str, text: str, vocab_size: int = 1024) -> Tokenizer:
    """Learn a tokenizer of `kind` (one of KINDS) from text (vocab_size for the subword ones)."""
    if kind == "word":
        return WordTokenizer.train(text)
    if kind == "char":
        return CharTokenizer.train(text)
    if kind in SUBWORD:
        if vocab_size <= 0:
            raise ValueError(f"The vocabulary size must be positive, got {vocab_size}.")
        return SUBWORD[kind].train(text, vocab_size)
    raise ValueError(f"Unknown tokenizer {kind!r}; expected one of {', '.join(KINDS)}.")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    kind = d.get("kind")
    if kind == "word":
        return WordTokenizer(d["vocab"])
    if kind == "char":
        return CharTokenizer(d["vocab"])
    if kind in SUBWORD:
        from tokenizers import Tokenizer as HFTokenizerModel

        return SUBWORD[kind](HFTokenizerModel.from_str(json.dumps(d["hf"])))
    raise ValueError(f"Unknown tokenizer kind {kind!r} in the saved tokenizer.")


def save_tokenizer(tok: Tokenizer, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tok.to_dict(), f, ensure_ascii=False)


def load_tokenizer(path) -> Tokenizer:
    with open(path, encoding="utf-8") as f:
        return tokenizer_from_dict(json.load(f))


def round_trip(tok: Tokenizer, text: str) -> str:
    """ "exact" when decode(encode(text)) == text, else where and how the two first differ."""
    decoded = tok.decode(tok.encode(text))
    if decoded == text:
        return "exact"
    i = next((i for i, (a, b) in enumerate(zip(text, decoded, strict=False)) if a != b), None)
    i = min(len(text), len(decoded)) if i is None else i
    return f"lossy: {text[i : i + 8]!r} came back as {decoded[i : i + 8]!r} (character {i})"


def tokenizer_stats(kind: str, text: str, vocab_size: int = 1024) -> dict:
    """Train a `kind` tokenizer on text and measure it on the same text: vocabulary size,
    tokens, tokens per word (whitespace-separated), characters per token, round trip."""
    tok = build_tokenizer(kind, text, vocab_size)
    n_tokens, n_words = len(tok.encode(text)), max(len(text.split()), 1)
    return {
        "tokenizer": kind,
        "vocab_size": tok.vocab_size,
        "tokens": n_tokens,
        "tokens_per_word": n_tokens / n_words,
        "chars_per_token": len(text) / max(n_tokens, 1),
        "round_trip": round_trip(tok, text),
    }


def stats_table(rows: list[dict]) -> str:
    """tokenizer_stats rows as an aligned text table."""
    head = ("tokenizer", "vocabulary", "tokens", "tokens/word", "chars/token")
    lines = ["{:<10} {:>10} {:>7} {:>11} {:>11}  round trip".format(*head)]
    for r in rows:
        lines.append(
            f"{r['tokenizer']:<10} {r['vocab_size']:>10,} {r['tokens']:>7,} "
            f"{r['tokens_per_word']:>11.2f} {r['chars_per_token']:>11.2f}  {r['round_trip']}"
        )
    return "\n".join(lines)


def tokenize_report(data: str | None, tokenizer: str = "all", vocab_size: int = 1024) -> str:
    """`fastgpt tokenize`: train tokenizers on a text (a file, a folder, embedded:NAME; None =
    the rhyme) and report on the same text; tokenizer "all" gives one row per kind."""
    from fastgpt import data as corpus

    text = corpus.embedded_text(data) or corpus.read_text(data)
    kinds = KINDS if tokenizer == "all" else (tokenizer,)
    if tokenizer != "all" and tokenizer not in KINDS:
        raise ValueError(f"Unknown tokenizer {tokenizer!r}; expected one of {', '.join(KINDS)}.")
    rows = [tokenizer_stats(kind, text, vocab_size) for kind in kinds]
    name = data or "embedded:rhyme"
    title = (
        f"{name}: {len(text):,} characters, {len(text.split()):,} words; subword vocabularies "
        f"asked for {vocab_size:,} (trained on this text, measured on it)"
    )
    return title + "\n" + stats_table(rows)
