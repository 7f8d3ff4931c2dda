"""Tokenizers (word, char, byte-level BPE) and the data layer (corpus files, splits, memmaps)."""

import numpy as np
import pytest
import torch

from fastgpt import data
from fastgpt.cli import main
from fastgpt.tokenizer import (
    END,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_stats,
)

CORPUS = data.DEFAULT_CORPUS


def test_embedded_corpus_is_the_notebooks_rhyme():
    lines = CORPUS.splitlines()
    assert len(lines) == 16 and lines[0] == "mary had a little lamb"
    assert len(set(CORPUS.split())) == 34
    assert data.EMBEDDED["poem"].splitlines()[0] == "Mary had a little lamb,"


def test_word_tokenizer_lowercases_and_closes_lines():
    tok = build_tokenizer("word", CORPUS)
    ids = tok.encode("Mary had a little lamb,\nIts fleece was white as snow;\n")
    words = [tok.vocab[i] for i in ids]
    assert " ".join(words) == "mary had a little lamb <END> its fleece was white as snow <END>"
    assert tok.decode(ids) == "mary had a little lamb\nits fleece was white as snow\n"
    assert tok.vocab[0] == END and tok.start_id() == 0
    assert tok.vocab_size == len(set(tok.vocab)) == 35  # the notebook's: 34 words + <END>
    assert len(tok.encode(CORPUS)) == 106 and tok.encode(CORPUS).count(0) == 16
    # A prompt leaves its last line open, so the model continues it.
    prompt = tok.encode("Mary had a", close_lines=False)
    assert [tok.vocab[i] for i in prompt] == ["mary", "had", "a"]


def test_word_tokenizer_unknown_words_are_a_clear_error():
    tok = build_tokenizer("word", CORPUS)
    with pytest.raises(ValueError, match=r"Unknown words 'dog', 'zebra'.* has only the 35 words"):
        tok.encode("mary had a zebra and a dog")
    with pytest.raises(ValueError, match="no words"):
        build_tokenizer("word", "!!! ...\n")


def test_char_tokenizer_round_trip_and_unknown_character():
    tok = build_tokenizer("char", CORPUS)
    assert tok.decode(tok.encode(CORPUS)) == CORPUS
    assert tok.vocab_size == len(set(CORPUS))
    with pytest.raises(ValueError, match=r"Unknown characters 'Z', 'x': the char-level vocab"):
        tok.encode("Zx")


def test_bpe_tokenizer_trains_locally_and_round_trips_any_text():
    tok = build_tokenizer("bpe", CORPUS * 3, vocab_size=300)
    assert 256 < tok.vocab_size <= 300  # every byte, plus merges learned from the corpus
    ids = tok.encode(CORPUS)
    assert len(ids) < 0.7 * len(CORPUS.encode())  # 44 merges already compress their corpus
    assert tok.decode(ids) == CORPUS
    unseen = "Zebras, naïve café 😀\n"
    assert tok.decode(tok.encode(unseen)) == unseen  # byte-level: nothing is unknown


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
@pytest.mark.parametrize("text", [CORPUS, data.EMBEDDED["poem"]], ids=["rhyme", "poem"])
def test_subword_tokenizers_round_trip_their_text(kind, text):
    """WordPiece and Unigram (through Hugging Face tokenizers) give back the text exactly:
    spaces travel as "▁", newlines and punctuation as pieces of their own."""
    tok = build_tokenizer(kind, text, vocab_size=150)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size <= 150 and len(ids) < len(text)  # pieces longer than one character
    pieces = [tok.hf.id_to_token(i) for i in ids]
    assert "\n" in pieces and all(p.strip("\n") == p or p == "\n" for p in pieces)
    # Characters the training text lacks are the unknown token: lossy, never an error. WordPiece
    # gives up on the whole word ("▁Zq", its space too), Unigram on the unknown run of characters.
    expected = {"wordpiece": "mary[UNK]\n", "unigram": "mary <unk>\n"}[kind]
    assert tok.decode(tok.encode("mary Zq\n")) == expected


def test_wordpiece_marks_continuations_and_unigram_segments():
    wp = build_tokenizer("wordpiece", CORPUS, vocab_size=60)
    pieces = [wp.hf.id_to_token(i) for i in wp.encode("everywhere that mary went")]
    assert any(p.startswith("##") for p in pieces)  # 60 pieces: long words split
    assert wp.decode(wp.encode("everywhere that mary went")) == "everywhere that mary went"
    big = build_tokenizer("wordpiece", CORPUS, vocab_size=1000)
    assert len(big.encode(CORPUS)) < len(wp.encode(CORPUS))  # the trade-off: vocab vs length
    uni = build_tokenizer("unigram", CORPUS, vocab_size=40)
    assert uni.vocab_size == 40 and uni.decode(uni.encode(CORPUS)) == CORPUS


def test_tokenizer_stats_and_round_trip_report():
    stats = tokenizer_stats("char", CORPUS)
    assert stats["vocab_size"] == len(set(CORPUS)) and stats["tokens"] == len(CORPUS)
    assert stats["tokens_per_word"] == pytest.approx(len(CORPUS) / 90)
    assert stats["round_trip"] == "exact"
    poem = data.EMBEDDED["poem"]
    word = tokenizer_stats("word", poem)
    assert word["round_trip"] == "lossy: 'Mary had' came back as 'mary had' (character 0)"
    assert word["tokens"] == 89 + 16  # words and one <END> per line


@pytest.mark.parametrize("kind", ["word", "char", "bpe", "wordpiece", "unigram"])
def test_save_and_load(tmp_path, kind):
    tok = build_tokenizer(kind, CORPUS, vocab_size=300)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(CORPUS) == tok.encode(CORPUS)
    assert loaded.decode(tok.encode(CORPUS)) == tok.decode(tok.encode(CORPUS))


def test_unknown_tokenizer_kind():
    with pytest.raises(ValueError, match="Unknown tokenizer 'sentencepiece'"):
        build_tokenizer("sentencepiece", CORPUS)


def test_cli_tokenize_prints_the_trade_off(tmp_path, capsys):
    assert main(["tokenize", "--data", "embedded:poem", "--vocab-size", "300"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("embedded:poem: 463 characters, 89 words")
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == ["word", "char", "bpe", "wordpiece", "unigram"]
    assert rows["char"][1:3] == ["35", "463"] and rows["word"][1:3] == ["58", "105"]
    assert rows["bpe"][1] == "300" and rows["bpe"][-1] == "exact"
    assert all(rows[k][-1] == "exact" for k in ("char", "bpe", "wordpiece", "unigram"))
    (tmp_path / "t.txt").write_text("to be or not to be\n")
    assert main(["tokenize", "--data", str(tmp_path / "t.txt"), "--tokenizer", "unigram"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[2].split()[0] == "unigram" and out[2].endswith("exact")
    assert main(["tokenize", "--data", str(tmp_path / "missing.txt")]) == 2
    assert "No file or folder at" in capsys.readouterr().err


def test_read_text_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("first\n")
    (tmp_path / "skip.md").write_text("not a .txt file")
    assert data.read_text(tmp_path / "b.txt") == "second file\n"
    assert data.read_text(tmp_path) == "second file\nfirst\n"  # sorted by path: b.txt < sub/a.txt


def test_read_text_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No file or folder at"):
        data.read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="holds no text"):
        data.read_text(tmp_path / "empty.txt")
    (tmp_path / "model.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    with pytest.raises(ValueError, match="looks binary"):
        data.read_text(tmp_path / "model.bin")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        data.read_text(tmp_path / "latin1.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="has no .txt files"):
        data.read_text(tmp_path / "folder")


def test_split_keeps_a_context_for_validation():
    ids = np.arange(1000, dtype=np.uint16)
    train, val = data.split(ids, block_size=6)
    assert len(val) == 100 and len(train) == 900 and val[0] == 900


def test_split_of_a_small_corpus_is_all_training():
    """10% of 105 tokens is 10: fewer than 8 windows of 7, so no validation split at all."""
    ids = np.arange(105, dtype=np.uint16)
    assert data.too_small_for_validation(105, block_size=6)
    train, val = data.split(ids, block_size=6)
    assert len(train) == 105 and len(val) == 0
    assert not data.too_small_for_validation(560, block_size=6)  # 56 = 8 x 7: just enough
    with pytest.raises(ValueError, match="105 tokens, too few for a context of 128 tokens"):
        data.split(ids, block_size=128)


def test_cached_split_memmap_is_written_once(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS * 4)
    tok = build_tokenizer("char", CORPUS)
    cache = tmp_path / "out" / "data"
    train, val = data.cached_split(corpus, tok, 8, cache)
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    ids = tok.encode(CORPUS * 4)
    assert train.tolist() + val.tolist() == ids
    stamp = (cache / "train.bin").stat().st_mtime_ns
    data.cached_split(corpus, tok, 8, cache)  # unchanged corpus and tokenizer: reused
    assert (cache / "train.bin").stat().st_mtime_ns == stamp
    corpus.write_text(CORPUS * 5)  # changed corpus: tokenized again
    train, val = data.cached_split(corpus, tok, 8, cache)
    assert len(train) + len(val) == len(CORPUS) * 5


def test_get_batch_targets_are_inputs_shifted():
    ids = np.arange(50, dtype=np.uint16)
    x, y = data.get_batch(ids, torch.tensor([0, 10, 43]), 6, torch.device("cpu"))
    assert x.shape == y.shape == (3, 6) and x.dtype == torch.long
    assert x[1].tolist() == list(range(10, 16)) and y[1].tolist() == list(range(11, 17))
    assert y[2, -1] == 49
