"""Never lose a run, never trust a path from disk, one-line errors (issue 11's trainer cases).

Each test names the case it covers. CLI cases run `fastgpt` in-process through `main` (the
console script's entry point) or, where a second process is the point, the console script itself.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastgpt.train
from fastgpt import checkpoint, data
from fastgpt.cli import main
from fastgpt.errors import FastGPTError
from fastgpt.files import FolderLock
from fastgpt.model import GPT, preset_config
from fastgpt.sample import generate_text, stream_text
from fastgpt.tokenizer import build_tokenizer
from fastgpt.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--sample-tokens", "0"]


def tiny_run(out: Path, steps: int = 2, **kw) -> dict:
    """A finished tiny run of `steps` steps in out (a checkpoint at every other step)."""
    cfg = dict(steps=steps, eval_every=2, device="cpu", progress=False, sample_tokens=0)
    return train(TrainConfig(out=str(out), **{**cfg, **kw}))


def cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `fastgpt argv...`."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line_error(err: str, *fragments: str) -> None:
    """stderr ends with a single `fastgpt: error:` line holding each fragment; no traceback."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("fastgpt: error: "), err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in last, last


def env() -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "FASTGPT_DEBUG": "0"}


def console(*argv, cwd: Path) -> subprocess.CompletedProcess:
    """The `fastgpt` console script (python -m fastgpt where the script is not beside python)."""
    script = Path(sys.executable).with_name("fastgpt")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "fastgpt"]
    argv = [str(a) for a in argv]
    return subprocess.run(cmd + argv, cwd=cwd, env=env(), capture_output=True, text=True)


# 1. A second run into a folder holding a run refuses; --overwrite replaces it.
def test_second_run_into_a_run_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    tiny_run(out)
    weights = (out / "ckpt-000002" / "model.safetensors").read_bytes()
    rc, _, err = cli(capsys, "train", "--out", out, "--steps", "4", *TINY)
    assert rc == 2
    one_line_error(err, f"{out} holds a run at step 2", "--resume", "--overwrite")
    assert (out / "ckpt-000002" / "model.safetensors").read_bytes() == weights
    assert (out / "latest").read_text() == "ckpt-000002"

    rc, _, err = cli(capsys, "train", "--out", out, "--resume", "--overwrite", *TINY)
    assert rc == 2 and "contradict" in err
    # A replacement that cannot start (missing data) leaves the old run as it was.
    missing = tmp_path / "missing.txt"
    rc, _, err = cli(capsys, "train", "--out", out, "--overwrite", "--data", missing, *TINY)
    assert rc == 2 and "No file or folder" in err
    assert (out / "ckpt-000002" / "model.safetensors").read_bytes() == weights
    assert (out / "latest").read_text() == "ckpt-000002"

    argv = ["train", "--out", out, "--steps", "3", "--eval-every", "2", "--overwrite", *TINY]
    rc, _, _ = cli(capsys, *argv)
    assert rc == 0
    assert (out / "latest").read_text() == "ckpt-000003" and not (out / "ckpt-000002").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 3]  # the new run's alone


# 5. `latest` may only name a checkpoint folder directly inside OUT; nothing outside is deleted.
@pytest.mark.parametrize("pointer", ["../victim", "/tmp", "ckpt-000002/../../victim", "link"])
def test_latest_pointing_outside_out_is_refused(tmp_path, capsys, pointer):
    out, victim = tmp_path / "run", tmp_path / "victim"
    tiny_run(out)
    victim.mkdir()
    (victim / "model.safetensors").write_bytes(b"precious")
    if pointer == "link":
        (out / "ckpt-000009").symlink_to(victim)
        pointer = "ckpt-000009"
    (out / "latest").write_text(pointer)
    rc, _, err = cli(capsys, "train", "--out", out, "--resume", "--steps", "4", *TINY)
    assert rc == 2
    one_line_error(err, f"{out / 'latest'}")
    rc, _, err = cli(capsys, "sample", "--ckpt", out, "--device", "cpu")
    assert rc == 2
    one_line_error(err, "latest")
    # A new run with --overwrite replaces the pointer and never touches what it named.
    rc, _, _ = cli(capsys, "train", "--out", out, "--steps", "2", "--overwrite", *TINY)
    assert rc == 0 and (out / "latest").read_text() == "ckpt-000002"
    assert (victim / "model.safetensors").read_bytes() == b"precious"


def test_checkpoint_code_deletes_nothing_outside_out(tmp_path):
    out, victim = tmp_path / "run", tmp_path / "victim"
    victim.mkdir()
    (victim / "model.safetensors").write_bytes(b"precious")
    tok = build_tokenizer("word", "mary had a little lamb\n")
    model = GPT(preset_config("tiny", vocab_size=tok.vocab_size))
    config = {"model": model.config.to_dict(), "train": {}}
    checkpoint.save_checkpoint(out, 1, model, tok, config, {"step": 1})
    (out / "latest").write_text("../victim")
    with pytest.raises(FastGPTError, match="not a checkpoint folder"):
        checkpoint.save_checkpoint(out, 2, model, tok, config, {"step": 2})
    with pytest.raises(FastGPTError, match="Refusing to delete"):
        checkpoint.remove_checkpoint(out, victim)
    assert (victim / "model.safetensors").read_bytes() == b"precious"


# 6. Temporary files are created exclusively; a planted link is never followed.
def test_links_planted_at_temporary_names_are_not_followed(tmp_path):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("mary had a little lamb its fleece was white as snow\n" * 20)
    victim.write_text("precious")
    (out / "data").mkdir(parents=True)
    planted = ["latest.tmp", "metrics.json.tmp", "loss.png.tmp.png", "metrics.jsonl.tmp"]
    planted += ["data/train.bin.tmp", "data/meta.json.tmp", "data/val.bin.tmp"]
    for name in planted:
        (out / name).symlink_to(victim)
    (out / "metrics.json").symlink_to(victim)  # even the final name: the link is replaced
    tiny_run(out, data=str(corpus), block_size=4, batch_size=4)
    assert victim.read_text() == "precious"
    assert not (out / "metrics.json").is_symlink()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert json.loads((out / "data" / "meta.json").read_text())["train"] > 0


def test_a_linked_token_cache_folder_is_refused(tmp_path, capsys):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("mary had a little lamb its fleece was white as snow\n" * 20)
    elsewhere.mkdir()
    out.mkdir()
    (out / "data").symlink_to(elsewhere)
    rc, _, err = cli(capsys, "train", "--out", out, "--data", corpus, "--block-size", 4, *TINY)
    assert rc == 2
    one_line_error(err, "is a link")
    assert list(elsewhere.iterdir()) == []


# 7. An exclusive lock on OUT for the run's life, naming the holder.
def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out):
        rc, _, err = cli(capsys, "train", "--out", out, "--steps", "2", *TINY)
        assert rc == 2
        one_line_error(err, f"{out} is in use by another run (process {os.getpid()})")
        run = console("train", "--out", out, "--steps", "2", *TINY, cwd=tmp_path)
        assert run.returncode == 2, run.stderr
        one_line_error(run.stderr, f"process {os.getpid()}")
        assert not (out / "latest").exists()
    rc, _, _ = cli(capsys, "train", "--out", out, "--steps", "2", *TINY)  # released: it runs
    assert rc == 0 and (out / "latest").read_text() == "ckpt-000002"


# 4. Non-finite hyper-parameters are refused up front; a non-finite loss stops the run.
@pytest.mark.parametrize(
    "option, value",
    [("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--dropout", "nan"), ("--dropout", "1.5")]
    + [("--weight-decay", "-inf"), ("--grad-clip", "nan"), ("--warmup", "-3")],
)
def test_non_finite_hyper_parameters_are_refused_up_front(tmp_path, capsys, option, value):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--out", out, f"{option}={value}", *TINY)
    assert rc == 2
    one_line_error(err, f"{option} must be")
    assert not out.exists()  # refused before anything was made


def test_a_non_finite_loss_stops_without_overwriting_the_last_checkpoint(
    tmp_path, capsys, monkeypatch
):
    real_step = fastgpt.train.train_step

    def nan_from_step_6(run, step):  # step is 0-based: the 6th step's loss is NaN
        loss = real_step(run, step)
        return loss * float("nan") if step >= 5 else loss

    monkeypatch.setattr(fastgpt.train, "train_step", nan_from_step_6)
    out = tmp_path / "run"
    argv = ["train", "--out", out, "--steps", "12", "--eval-every", "4", *TINY]
    rc, _, err = cli(capsys, *argv)
    assert rc == 2
    one_line_error(err, "the training loss at step 6 is nan", "ckpt-000004")
    assert (out / "latest").read_text() == "ckpt-000004"
    model, _, config = checkpoint.load_model(out)
    assert config["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # What was logged before the failure is kept.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [4]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_non_finite_validation_loss_stops_the_run_too(tmp_path, capsys, monkeypatch):
    real_estimate = fastgpt.train.estimate_loss
    calls = []

    def nan_at_the_second_evaluation(*args):
        calls.append(1)
        return float("inf") if len(calls) == 2 else real_estimate(*args)

    monkeypatch.setattr(fastgpt.train, "estimate_loss", nan_at_the_second_evaluation)
    out, corpus = tmp_path / "run", tmp_path / "poem.txt"
    corpus.write_text(data.POEM * 10)  # large enough for a validation split
    argv = ["--steps", "6", "--eval-every", "2", "--data", corpus, *TINY]
    rc, _, err = cli(capsys, "train", "--out", out, *argv)
    assert rc == 2
    one_line_error(err, "the validation loss at step 4 is inf", "ckpt-000002")
    assert (out / "latest").read_text() == "ckpt-000002"


# 8. OUT is checked to be a writable folder before any training.
def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a folder")
    rc, _, err = cli(capsys, "train", "--out", file, *TINY)
    assert rc == 2
    one_line_error(err, f"--out {file} is a file")
    rc, _, err = cli(capsys, "train", "--out", file / "sub", *TINY)
    assert rc == 2
    one_line_error(err, "a part of the path is a file")
    assert file.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        rc, _, err = cli(capsys, "train", "--out", out, *TINY)
    finally:
        out.chmod(0o755)
    assert rc == 2
    one_line_error(err, "is not writable")


# 9. Bad devices, numbers and files: one line naming the file and the problem, exit 2.
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    tiny_run(out)
    return out


def test_unknown_device_and_nan_temperature(tmp_path, capsys, finished_run):
    rc, _, err = cli(capsys, "train", "--out", tmp_path / "x", "--device", "foo")
    assert rc == 2
    one_line_error(err, "Unknown --device 'foo'")
    rc, _, err = cli(capsys, "sample", "--ckpt", finished_run, "--device", "foo")
    assert rc == 2
    one_line_error(err, "Unknown --device 'foo'")
    for value in ("nan", "inf", "-1"):
        rc, _, err = cli(capsys, "sample", "--ckpt", finished_run, "--temperature", value)
        assert rc == 2
        one_line_error(err, "--temperature must be a finite number >= 0")


def broken_copy(run: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    """A copy of run's checkpoint folder with file `name` replaced by content."""
    ckpt = checkpoint.resolve_checkpoint(run)
    copy = tmp_path / "broken"
    copy.mkdir()
    for file in ckpt.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / name).write_bytes(content(copy / name) if callable(content) else content)
    return copy


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("model.safetensors", lambda p: p.read_bytes()[:100], "cannot be loaded"),
        ("config.json", b"{not json", "is not a readable JSON file"),
        ("config.json", b"[1, 2]", "has no 'model' section"),
        ("config.json", b'{"model": {"n_layer": -1}}', "has a bad model section"),
        ("tokenizer.json", b'{"kind": "word", "vocab": ["a", "b"]}', "does not belong"),
        ("tokenizer.json", b"\xff\xfe", "is not a readable tokenizer"),
    ],
)
def test_broken_checkpoint_files_are_one_line(
    tmp_path, capsys, finished_run, name, content, problem
):
    copy = broken_copy(finished_run, tmp_path, name, content)
    rc, _, err = cli(capsys, "sample", "--ckpt", copy, "--device", "cpu")
    assert rc == 2
    one_line_error(err, str(copy / name), problem)


class Payload:
    """A pickle that would run a command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_in_state_pt_is_refused(tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    tiny_run(out, steps=4)
    torch.save({"step": Payload(marker)}, out / "ckpt-000004" / "state.pt")
    rc, _, err = cli(capsys, "train", "--out", out, "--resume", "--steps", "6", *TINY)
    assert rc == 2
    one_line_error(err, str(out / "ckpt-000004" / "state.pt"), "cannot be loaded safely")
    assert not marker.exists()


# 11. --resume says what it takes from the checkpoint and refuses what conflicts.
@pytest.mark.parametrize(
    "option, value",
    [("--lr", "0.5"), ("--batch-size", "7"), ("--data", "corpus.txt"), ("--preset", "small")],
)
def test_resume_refuses_conflicting_options(tmp_path, capsys, option, value):
    out = tmp_path / "run"
    tiny_run(out, steps=2)
    rc, _, err = cli(capsys, "train", "--out", out, "--resume", "--steps", "4", option, value)
    assert rc == 2
    one_line_error(err, f"{option} ", "the checkpoint has", "conflict")


def test_resume_steps_below_the_checkpoint_and_a_stretched_schedule(tmp_path, capsys):
    out = tmp_path / "run"
    tiny_run(out, steps=4)
    rc, _, err = cli(capsys, "train", "--out", out, "--resume", "--steps", "3", *TINY)
    assert rc == 2
    one_line_error(err, "--steps 3 is not beyond the checkpoint's step 4")
    rc, _, err = cli(capsys, "train", "--out", out, "--resume", *TINY)  # the run is complete
    assert rc == 2
    one_line_error(err, "the run's 4 steps are not beyond the checkpoint's step 4")
    rc, printed, _ = cli(capsys, "train", "--out", out, "--resume", "--steps", "6", *TINY)
    assert rc == 0
    assert "resuming" in printed and "from the checkpoint" in printed
    assert "--steps 6 (the run had 4) stretches the learning-rate schedule" in printed
    assert checkpoint.run_step(checkpoint.resolve_checkpoint(out)) == 6


# 12. `fastgpt sample` streams its tokens; a prompt without tokens is an error.
def test_sample_streams_tokens_as_they_come(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cmd = [sys.executable, "-m", "fastgpt", "sample", "--ckpt", str(tiny_ckpt(out))]
    cmd += ["--tokens", "1000000000", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE)
    try:
        first = proc.stdout.read(200)  # arrives long before a billion tokens
    finally:
        proc.kill()
        proc.wait()
    assert len(first.split()) > 10


def tiny_ckpt(out: Path) -> Path:
    tok = build_tokenizer("word", data.DEFAULT_CORPUS)
    model = GPT(preset_config("tiny", vocab_size=tok.vocab_size))
    return checkpoint.save_checkpoint(out, 0, model, tok, {"model": model.config.to_dict()}, {})


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_streamed_pieces_join_to_the_sampled_text(kind):
    text = "mary had a little lamb\nits fleece was white as snow, é ü\n" * 4
    tok = build_tokenizer(kind, text, 300)
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", vocab_size=tok.vocab_size, block_size=8))
    prompt = "mary had" if kind != "bpe" else "mary é"
    pieces = list(stream_text(model, tok, prompt, 20, seed=3))
    assert len(pieces) > 5 and "".join(pieces) == generate_text(model, tok, prompt, 20, seed=3)
    endless = stream_text(model, tok, "", 10**9, seed=3)
    assert len(list(itertools.islice(endless, 3))) == 3  # a huge --tokens starts at once
    greedy = model.generate(torch.tensor([tok.encode(prompt, close_lines=False)]), 20, 0)
    assert generate_text(model, tok, prompt, 20, temperature=0) == tok.decode(greedy[0].tolist())


def test_a_prompt_without_tokens_is_an_error(tmp_path, capsys):
    ckpt = tiny_ckpt(tmp_path)
    rc, _, err = cli(capsys, "sample", "--ckpt", ckpt, "--prompt", "!!!", "--device", "cpu")
    assert rc == 2
    one_line_error(err, "The prompt '!!!' has no tokens for the word tokenizer")


# 13. Leftovers of a killed run are cleaned; Ctrl-C before the first checkpoint says so.
def test_orphans_of_a_killed_run_are_cleaned_on_the_next_run(tmp_path, capsys):
    out = tmp_path / "run"
    tiny_run(out, steps=2)
    (out / "ckpt-000099").mkdir()  # renamed into place, `latest` never written
    (out / ".tmp-ckpt-000004-x1y2").mkdir()  # killed mid-write
    (out / ".tmp-ckpt-000004-x1y2" / "model.safetensors").write_bytes(b"trunc")
    (out / ".latest.ab12.tmp").write_text("ckpt-000099")
    rc, _, _ = cli(capsys, "train", "--out", out, "--resume", "--steps", "3", *TINY)
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [".lock", "ckpt-000003", "latest", "loss.png", "metrics.json", "metrics.jsonl"]


def test_ctrl_c_before_the_first_checkpoint_does_not_suggest_resume(tmp_path, capsys, monkeypatch):
    real_step = fastgpt.train.train_step

    def interrupt_at_step_3(run, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(fastgpt.train, "train_step", interrupt_at_step_3)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--out", out, "--steps", "8", "--eval-every", "4", *TINY)
    assert rc == 130 and "before the first checkpoint" in err and "--resume" not in err
    rc, _, err = cli(capsys, "train", "--out", out, "--steps", "8", "--eval-every", "2", *TINY)
    assert rc == 130 and f"`fastgpt train --resume --out {out}` continues from ckpt-000002" in err
