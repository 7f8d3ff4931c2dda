"""Checkpoints, written so that killing the process at any moment never leaves a corrupt one.

    OUT/latest               name of the newest complete checkpoint (temp file + os.replace)
    OUT/ckpt-000100/         model.safetensors  weights
                             state.pt           optimizer, step, RNGs, loss history (torch.save)
                             config.json        model and training configuration (resolved)
                             train.toml         the same training configuration, for --config
                             tokenizer.json     the tokenizer the model was trained with

A checkpoint is written into a new temporary folder (created exclusively), renamed into place
(atomic), and only then named in OUT/latest; the previous one is removed after that.

Paths read from disk are not trusted: `latest` must name a `ckpt-NNNNNN` folder directly inside
OUT (anything else is an error), and nothing outside OUT is ever deleted.
"""

import contextlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import safetensors.torch
import torch

from fastgpt.errors import FastGPTError
from fastgpt.files import FolderLock, make_folder, writable_folder, write_atomic
from fastgpt.model import GPT, GPTConfig
from fastgpt.tokenizer import load_tokenizer, save_tokenizer

LATEST = "latest"
CKPT_NAME = re.compile(r"ckpt-\d{6,}")
TMP_PREFIX = ".tmp-ckpt-"
# Files a run writes directly in OUT besides its checkpoints (removed by --overwrite).
RUN_FILES = ("metrics.json", "metrics.jsonl", "loss.png")
# Training options that steer one invocation, not the run: left out of train.toml.
RUN_CONTROL = ("resume", "overwrite", "stop_after")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def save_checkpoint(
    out_dir: str | os.PathLike, step: int, model: GPT, tok, config: dict, state: dict
) -> Path:
    """Write a complete checkpoint of `step` under out_dir and point OUT/latest at it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:06d}"
    tmp = make_folder(out_dir, f"{TMP_PREFIX}{step:06d}-")
    safetensors.torch.save_model(
        model, str(tmp / "model.safetensors"), metadata={"step": str(step)}
    )
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps({**config, "step": step}, indent=2))
    if "train" in config:
        (tmp / "train.toml").write_text(to_toml(config["train"]))
    save_tokenizer(tok, tmp / "tokenizer.json")
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    previous = latest_checkpoint(out_dir)
    final = out_dir / name
    if final.is_symlink():
        final.unlink()
    elif final.exists():  # the same step saved again: move the old copy aside first
        os.rename(final, make_folder(out_dir, f"{TMP_PREFIX}old-") / "old")
    os.rename(tmp, final)
    write_atomic(out_dir / LATEST, name)
    if previous is not None and previous != final:
        remove_checkpoint(out_dir, previous)
    clean_orphans(out_dir, keep=final)
    return final


def to_toml(train: dict) -> str:
    """A training configuration as TOML (None values left out: they mean "the default")."""
    lines = ["# fastgpt train --config this-file (resolved configuration of the run)"]
    for key, value in train.items():
        if value is not None and key not in RUN_CONTROL:
            lines.append(f"{key} = {json.dumps(value)}")  # JSON str/int/float/bool are TOML
    return "\n".join(lines) + "\n"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint OUT/latest names, or None when OUT has no `latest`.

    Raises FastGPTError when `latest` is not a plain file naming a complete `ckpt-NNNNNN` folder
    directly inside OUT.
    """
    out_dir = Path(out_dir)
    pointer = out_dir / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        return None
    if pointer.is_symlink() or not pointer.is_file():
        raise FastGPTError(f"{pointer} is not a plain file; it should hold a checkpoint's name.")
    name = pointer.read_text(errors="replace").strip()
    if not CKPT_NAME.fullmatch(name):
        raise FastGPTError(
            f"{pointer} names {name[:80]!r}, not a checkpoint folder (ckpt-NNNNNN) inside "
            f"{out_dir}."
        )
    ckpt = out_dir / name
    if ckpt.is_symlink() or not (ckpt / "model.safetensors").is_file():
        raise FastGPTError(f"{pointer} names {name}, which is not a complete checkpoint folder.")
    return ckpt


def remove_checkpoint(out_dir: Path, ckpt: Path) -> None:
    """Delete a checkpoint folder, only if it is a real `ckpt-*` folder directly inside out_dir."""
    if ckpt.parent != out_dir or not CKPT_NAME.fullmatch(ckpt.name):
        raise FastGPTError(f"Refusing to delete {ckpt}: not a checkpoint folder inside {out_dir}.")
    if ckpt.is_symlink():
        ckpt.unlink()
    elif ckpt.is_dir():
        shutil.rmtree(ckpt)


def clean_orphans(out_dir: Path, keep: Path | None) -> list[str]:
    """Remove what killed runs leave in out_dir: checkpoint folders `latest` does not name,
    temporary checkpoint folders and temporary files. Returns the names removed."""
    removed = []
    for child in sorted(out_dir.iterdir()):
        name = child.name
        orphan_ckpt = CKPT_NAME.fullmatch(name) and child != keep
        tmp_file = name.startswith(".") and name.endswith(".tmp") and not child.is_dir()
        if not (orphan_ckpt or name.startswith(TMP_PREFIX) or tmp_file):
            continue
        if child.is_symlink() or not child.is_dir():
            child.unlink()
        else:
            shutil.rmtree(child)
        removed.append(name)
    return removed


def run_step(ckpt: Path) -> int:
    """The step a checkpoint was saved at."""
    return int(read_config(ckpt).get("step", 0))


def prepare_out(out_dir: str | os.PathLike, resume: bool, overwrite: bool) -> Path | None:
    """Check OUT (its lock held) for a run: the checkpoint to resume from, or None.

    A new run into a folder holding a run is refused unless overwrite; the run is then removed by
    clear_run once the new run is set up (a new run that fails to start removes nothing).
    Leftovers of killed runs are removed here.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise FastGPTError("--resume and --overwrite contradict each other; give one.")
    try:
        latest = latest_checkpoint(out_dir)
    except FastGPTError as e:
        if overwrite:
            return None
        raise FastGPTError(f"{e} (--overwrite replaces it)" if not resume else str(e)) from None
    if resume:
        if latest is None:
            raise FastGPTError(f"--resume: no checkpoint in {out_dir} to resume from.")
        clean_orphans(out_dir, keep=latest)
        return latest
    if latest is not None and not overwrite:
        raise FastGPTError(
            f"{out_dir} holds a run at step {run_step(latest)}; use --resume to continue it, "
            "--overwrite to replace it, or another --out."
        )
    if not overwrite:
        clean_orphans(out_dir, keep=None)  # no run here: only leftovers of killed ones
    return None


def claim_out(
    out_dir: str | os.PathLike, resume: bool, overwrite: bool, stack: contextlib.ExitStack
) -> tuple[Path, Path | None]:
    """Check OUT is a writable folder, lock it for the run (released by stack) and check it for
    a run (prepare_out): (OUT, the checkpoint to resume from or None)."""
    out = writable_folder(out_dir)
    stack.enter_context(FolderLock(out))
    return out, prepare_out(out, resume, overwrite)


def clear_run(out_dir: str | os.PathLike) -> None:
    """Remove the run in OUT (--overwrite): `latest`, its checkpoints, metrics and leftovers.
    The token cache OUT/data stays (it is checked against its source before each use)."""
    out_dir = Path(out_dir)
    for name in (LATEST, *RUN_FILES):
        path = out_dir / name
        if path.is_symlink() or path.is_file():
            path.unlink()
    clean_orphans(out_dir, keep=None)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A training output folder (its latest checkpoint) or a checkpoint folder itself."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if ckpt is None:
        raise FileNotFoundError(
            f"No checkpoint in {path}: train one first with `fastgpt train --out {path}`."
        )
    return ckpt


def read_config(ckpt: Path) -> dict:
    """config.json of a checkpoint; FastGPTError naming the file when it is unreadable."""
    path = Path(ckpt) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FastGPTError(f"{path} is not a readable JSON file ({_first_line(e)}).") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise FastGPTError(f"{path} has no 'model' section: not a fastgpt checkpoint config.")
    return config


def model_config(ckpt: Path, config: dict, backend: str | None = None) -> GPTConfig:
    """The GPTConfig a checkpoint's config.json describes; FastGPTError naming the file if bad."""
    try:
        return GPTConfig.from_dict({**config["model"], "backend": backend})
    except (TypeError, ValueError) as e:
        path = Path(ckpt) / "config.json"
        raise FastGPTError(f"{path} has a bad model section ({_first_line(e)}).") from None


def load_checkpoint_tokenizer(ckpt: Path, vocab_size: int | None = None):
    """The tokenizer of a checkpoint, checked against the model's vocabulary size."""
    path = Path(ckpt) / "tokenizer.json"
    try:
        tok = load_tokenizer(path)
    except Exception as e:  # JSON, a missing key, a broken BPE model: all the file's fault
        raise FastGPTError(f"{path} is not a readable tokenizer ({_first_line(e)}).") from None
    if vocab_size is not None and tok.vocab_size != vocab_size:
        raise FastGPTError(
            f"{path} has {tok.vocab_size} tokens but the model in {ckpt} has a vocabulary of "
            f"{vocab_size}: the tokenizer does not belong to this model."
        )
    return tok


def load_model(
    ckpt: str | os.PathLike, device: str | torch.device = "cpu", backend: str | None = None
):
    """(model in eval mode on device, tokenizer, config dict) of a checkpoint or output folder.

    The attention backend is chosen here (None = automatic), not taken from the training run:
    weights trained with one backend run on any other.
    """
    ckpt = resolve_checkpoint(ckpt)
    config = read_config(ckpt)
    model = GPT(model_config(ckpt, config, backend))
    load_safetensors_into(model, ckpt)
    tok = load_checkpoint_tokenizer(ckpt, model.config.vocab_size)
    return model.to(device).eval(), tok, config


def load_safetensors_into(model: GPT, ckpt: Path) -> None:
    """Load ckpt/model.safetensors into model (strict); FastGPTError naming the file if bad."""
    path = Path(ckpt) / "model.safetensors"
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=True)
    except Exception as e:  # safetensors' own error type (truncated file), OSError, size mismatch
        raise FastGPTError(f"{path} cannot be loaded ({_first_line(e)}).") from None
    if missing or unexpected:
        raise FastGPTError(f"{path} does not match the model: {missing} {unexpected}.")


def load_state(ckpt: Path) -> dict:
    """state.pt, loaded with weights_only=True: a pickle that runs code is refused."""
    path = Path(ckpt) / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise FastGPTError(
            f"{path} cannot be loaded safely ({_first_line(e)}); it is not a state fastgpt wrote."
        ) from None
