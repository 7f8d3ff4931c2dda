"""Training on documents: each file of a --data folder (or each --doc-sep piece) is a document;
training windows pack several, attention never crosses a boundary and positions restart in each
(GPT.forward's cu_seqlens), and no target asks one document to predict the next.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import F64

from fastgpt import checkpoint, data
from fastgpt.cli import main
from fastgpt.model import GPT, preset_config
from fastgpt.tokenizer import build_tokenizer
from fastgpt.train import TrainConfig, train

SEP = "<|endoftext|>"
# Three documents, large enough for a held-out split of 8 windows of the tiny preset's 7 tokens.
DOCUMENTS = [data.RHYME * 2, data.POEM * 2, data.RHYME + data.POEM]


@pytest.fixture
def folder(tmp_path):
    """A folder of the three documents, one .txt file each."""
    path = tmp_path / "docs"
    path.mkdir()
    for i, text in enumerate(DOCUMENTS):
        (path / f"{i}.txt").write_text(text)
    return path


def run(tmp_path, name: str, **options) -> dict:
    common = dict(steps=6, eval_every=3, device="cpu", progress=False, sample_tokens=0)
    return train(TrainConfig(out=str(tmp_path / name), **{**common, **options}))


def test_documents_of_a_folder_and_of_a_separator(tmp_path, folder):
    assert data.read_documents(folder) == DOCUMENTS
    joined = tmp_path / "one.txt"
    joined.write_text(f"first doc{SEP}\nsecond\nlines\n{SEP}{SEP}  \n{SEP}third")
    assert data.read_documents(joined, SEP) == ["first doc\n", "second\nlines\n", "third\n"]
    assert data.read_documents(joined) == [joined.read_text() + "\n"]  # no separator: one
    with pytest.raises(ValueError, match="must not be empty"):
        data.read_documents(joined, "")
    tok = build_tokenizer("char", "".join(data.read_documents(joined, SEP)))
    ids, starts = data.encode_documents(tok, data.read_documents(joined, SEP))
    assert starts.tolist() == [0, 10, 23] and len(ids) == 29
    train_starts, val_starts = data.split_starts(starts, 15)  # the split cuts the second
    assert train_starts.tolist() == [0, 10] and val_starts.tolist() == [0, 8]


def test_document_batch_cuts_windows_and_ignores_cross_document_targets():
    ids = np.arange(20, dtype=np.uint16)
    starts = np.array([0, 3, 4, 11], dtype=np.int64)  # documents [0, 3) [3, 4) [4, 11) [11, 20)
    x, y, cu = data.get_document_batch(
        ids, starts, torch.tensor([1, 11, 6]), 6, torch.device("cpu")
    )
    assert x.tolist() == [[1, 2, 3, 4, 5, 6], [11, 12, 13, 14, 15, 16], [6, 7, 8, 9, 10, 11]]
    # Row 0 holds pieces 1-2 | 3 | 4-6; row 1 one document; row 2 pieces 6-10 | 11.
    assert cu.tolist() == [0, 2, 3, 6, 12, 17, 18] and cu.dtype == torch.int32
    assert y.tolist() == [
        [2, -100, -100, 5, 6, 7],  # 3 and 4 start documents: nothing predicts them
        [12, 13, 14, 15, 16, 17],
        [7, 8, 9, 10, -100, 12],
    ]
    assert data.count_targets(starts, torch.tensor([1, 11, 6]), 6) == int((y != -100).sum()) == 15


def test_packed_window_logits_loss_and_gradients_equal_each_document_alone():
    """A batch never attends across documents: the logits of packed windows are those of each
    document piece run alone (positions from 0), and the loss and gradients those of the pieces."""
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", vocab_size=50, block_size=12)).double()
    ids = np.random.default_rng(0).integers(0, 50, 40).astype(np.uint16)
    starts = np.array([0, 5, 6, 19, 30], dtype=np.int64)
    x, y, cu = data.get_document_batch(ids, starts, torch.tensor([2, 17]), 12, torch.device("cpu"))
    logits, loss = model(x, y, cu_seqlens=cu)
    loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    pieces = x.flatten().split(cu.diff().tolist())
    targets = y.flatten().split(cu.diff().tolist())
    alone = [model(piece[None])[0][0] for piece in pieces]  # (n, V) each
    torch.testing.assert_close(logits.flatten(0, 1), torch.cat(alone), **F64)
    assert len(pieces) == 5  # more than one document in a window: a real packing
    # GPT.forward takes the cross-entropy in float32: loss and gradients to float32's precision.
    sums = [
        F.cross_entropy(lg.float(), t, reduction="sum")
        for lg, t in zip(alone, targets, strict=True)
    ]
    want = sum(sums) / (y != -100).sum()
    torch.testing.assert_close(loss, want)
    want.backward()
    for got, p in zip(packed_grads, model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1.3e-6)


def test_a_run_on_documents_finishes_and_no_doc_mask_differs(tmp_path, folder, capsys):
    result = run(tmp_path, "docs", data=str(folder), batch_size=16, progress=True)
    printed = capsys.readouterr().out
    assert "documents: 3 start in the train tokens; attention stays within each" in printed
    assert len(result["losses"]) == 6 and all(math.isfinite(x) for x in result["losses"])
    assert result["val"] and all(math.isfinite(v) for _, v in result["val"])
    plain = run(tmp_path, "plain", data=str(folder), batch_size=16, doc_mask=False)
    # The same windows (some cross a boundary), attended and scored otherwise.
    assert plain["losses"] != result["losses"]
    assert all(math.isfinite(x) for x in plain["losses"])


def test_micro_steps_weigh_every_target_alike(tmp_path, folder):
    """Windows hold different numbers of counted targets: 2 micro-steps of 8 windows give the
    losses of one step of 16 (sums over the global batch's targets, not means of means)."""
    one = run(tmp_path, "one", data=str(folder), batch_size=16)
    two = run(tmp_path, "two", data=str(folder), batch_size=8, grad_accum=2)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert [v for _, v in two["val"]] == pytest.approx([v for _, v in one["val"]], rel=1e-6)


def test_one_stream_is_unchanged_by_doc_mask(tmp_path):
    """The embedded rhyme has no documents: the default run is what it was."""
    assert run(tmp_path, "a")["losses"] == run(tmp_path, "b", doc_mask=False)["losses"]


def test_resume_with_documents_gives_the_losses_of_an_uninterrupted_run(tmp_path, folder):
    options = dict(data=str(folder))
    full = run(tmp_path, "full", **options)
    run(tmp_path, "part", stop_after=3, **options)  # at an evaluation step
    resumed = run(tmp_path, "part", resume=True, **options)
    assert resumed["losses"] == full["losses"] and resumed["val"] == full["val"]


def test_cli_doc_sep_no_doc_mask_and_config_keys(tmp_path, capsys):
    corpus = tmp_path / "one.txt"
    corpus.write_text(SEP.join(DOCUMENTS))
    out = tmp_path / "out"
    argv = ["train", "--data", str(corpus), "--doc-sep", SEP, "--steps", "2", "--device", "cpu"]
    assert main([*argv, "--out", str(out), "--sample-tokens", "0"]) == 0
    assert "documents: 3 start" in capsys.readouterr().out
    saved = checkpoint.read_config(checkpoint.latest_checkpoint(out))["train"]
    assert saved["doc_sep"] == SEP and saved["doc_mask"] is True
    # --resume takes the run's own document settings; turning the mask off conflicts.
    assert main(["train", "--resume", "--out", str(out), "--steps", "3", "--no-doc-mask"]) == 2
    assert "--doc-mask False (the checkpoint has True)" in capsys.readouterr().err

    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{corpus}"\ndoc-sep = "{SEP}"\ndoc_mask = false\nsteps = 2\n')
    out2 = tmp_path / "out2"
    assert main(["train", "--config", str(toml), "--out", str(out2), "--device", "cpu"]) == 0
    assert "documents:" not in capsys.readouterr().out
    saved = checkpoint.read_config(checkpoint.latest_checkpoint(out2))["train"]
    assert saved["doc_sep"] == SEP and saved["doc_mask"] is False


def test_doc_sep_needs_data_files(capsys):
    assert main(["train", "--doc-sep", SEP, "--steps", "1"]) == 2
    assert "--doc-sep '<|endoftext|>' needs" in capsys.readouterr().err
