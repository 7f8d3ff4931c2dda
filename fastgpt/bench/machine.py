"""Machine description: names, versions, git commit, results file names, datasheet peaks."""

import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

# The datasheet peaks live with the device choice; re-exported for the benchmark scripts.
from fastgpt.devices import PEAK_BF16_TFLOPS, peak_bf16_tflops  # noqa: F401


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit() -> str | None:
    """HEAD of the checkout fastgpt runs from, '+dirty' when tracked files differ from it.

    A copy without .git (e.g. a working tree shipped to a GPU machine) is named by the
    environment variable FASTGPT_GIT_COMMIT when set, else None.
    """
    root = Path(__file__).resolve().parents[2]  # fastgpt/bench/machine.py -> the checkout
    try:
        run = lambda *a: subprocess.run(
            a, cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        head = run("git", "rev-parse", "HEAD").stdout.strip()
        dirty = run("git", "status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("FASTGPT_GIT_COMMIT") or None
    return head + ("+dirty" if dirty else "")


def machine_info(device: torch.device) -> dict:
    import triton

    import fastgpt

    info = {
        "device": device.type,
        "name": device_name(device),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "fastgpt": getattr(fastgpt, "__version__", None),
        "fastgpt_backends": fastgpt.available_backends(device),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
        )
    with contextlib.suppress(Exception):
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    return info


def results_path(out_dir: Path, device: torch.device, suffix: str = "") -> Path:
    short = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return out_dir / f"{slug(short)}-{date}{suffix}.json"


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)  # atomic: a run killed mid-write leaves the previous complete file
