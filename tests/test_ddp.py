"""torchrun DDP on CPU (gloo): 2 processes give the losses of 1 with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from fastgpt import data
from fastgpt.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_two_gloo_processes_match_one_process(tmp_path):
    # One kernel in both runs (the reference): this compares the training loops. The poem ten
    # times over is large enough for a validation split (the default rhyme has none).
    corpus = tmp_path / "poem.txt"
    corpus.write_text(data.EMBEDDED["poem"] * 10)
    steps = ["--steps", "6", "--eval-every", "3", "--device", "cpu", "--seed", "5"]
    steps += ["--data", str(corpus)]
    steps += ["--backend", "reference"]
    # 2 processes x 2 micro-steps x 2 sequences: a global batch of 8 sequences per step.
    ddp_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "fastgpt", "train", "--batch-size", "2", "--grad-accum", "2"]
    cmd += ["--out", str(ddp_out), "--sample-tokens", "0", *steps]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = f"stdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-3000:]}"
    assert run.returncode == 0, output
    ddp = json.loads((ddp_out / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and len(ddp["losses"]) == 6, output
    assert (ddp_out / "ckpt-000006" / "model.safetensors").is_file()
    assert run.stdout.count("fastgpt train:") == 1, output  # rank 0 alone prints

    single = train(
        TrainConfig(
            data=str(corpus),
            steps=6,
            eval_every=3,
            device="cpu",
            seed=5,
            backend="reference",
            batch_size=8,
            grad_accum=1,
            out=str(tmp_path / "single"),
            progress=False,
            sample_tokens=0,
        )
    )
    assert single["world_size"] == 1
    # Same data, same initial weights; only the order of float additions differs (~1e-7 seen).
    assert ddp["backend"] == single["backend"] == "reference"
    assert ddp["losses"] == pytest.approx(single["losses"], rel=2e-6), output
    assert len(ddp["val"]) == 2 and ddp["val"][-1][1] == pytest.approx(
        single["val"][-1][1], rel=2e-6
    )
