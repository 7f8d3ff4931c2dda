"""Checkpoints, written so that killing the process at any moment never leaves a corrupt one.

    OUT/latest               name of the newest complete checkpoint (temp file + os.replace)
    OUT/ckpt-000100/         model.safetensors  weights
                             state.pt           optimizer, step, RNGs, loss history (torch.save)
                             config.json        model and training configuration
                             tokenizer.json     the tokenizer the model was trained with

A checkpoint is written into a temporary folder, renamed into place (atomic), and only then named
in OUT/latest; the previous one is removed after that.
"""

import json
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch

from fastgpt.model import GPT, GPTConfig
from fastgpt.tokenizer import load_tokenizer, save_tokenizer

LATEST = "latest"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    out_dir: str | os.PathLike, step: int, model: GPT, tok, config: dict, state: dict
) -> Path:
    """Write a complete checkpoint of `step` under out_dir and point OUT/latest at it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:06d}"
    tmp, final = out_dir / f".tmp-{name}", out_dir / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    safetensors.torch.save_model(
        model, str(tmp / "model.safetensors"), metadata={"step": str(step)}
    )
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps({**config, "step": step}, indent=2))
    save_tokenizer(tok, tmp / "tokenizer.json")
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    previous = latest_checkpoint(out_dir)
    if final.exists():  # the same step saved again (e.g. right after a resume)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_atomic(out_dir / LATEST, name)
    if previous is not None and previous != final:
        shutil.rmtree(previous, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint OUT/latest names, or None when there is none."""
    pointer = Path(out_dir) / LATEST
    if not pointer.is_file():
        return None
    ckpt = Path(out_dir) / pointer.read_text().strip()
    return ckpt if (ckpt / "model.safetensors").is_file() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A training output folder (its latest checkpoint) or a checkpoint folder itself."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(
            f"No checkpoint in {path}: train one first with `fastgpt train --out {path}`."
        )
    return ckpt


def read_config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def load_model(
    ckpt: str | os.PathLike, device: str | torch.device = "cpu", backend: str | None = None
):
    """(model in eval mode on device, tokenizer, config dict) of a checkpoint or output folder.

    The attention backend is chosen here (None = automatic), not taken from the training run:
    weights trained with one backend run on any other.
    """
    ckpt = resolve_checkpoint(ckpt)
    config = read_config(ckpt)
    model = GPT(GPTConfig.from_dict({**config["model"], "backend": backend}))
    load_safetensors_into(model, ckpt)
    return model.to(device).eval(), load_tokenizer(ckpt / "tokenizer.json"), config


def load_safetensors_into(model: GPT, ckpt: Path) -> None:
    missing, unexpected = safetensors.torch.load_model(
        model, str(ckpt / "model.safetensors"), strict=True
    )
    if missing or unexpected:
        raise ValueError(f"Checkpoint {ckpt} does not match the model: {missing} {unexpected}.")


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
