"""Machine description: names, versions, git commit, results files and folder, datasheet peaks."""

import contextlib
import datetime
import json
import math
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


def source_checkout() -> Path | None:
    """The fastgpt source checkout this package runs from, None for an installed copy.

    The package lives in the checkout's bench/ folder (installed as fastgpt.bench through
    pyproject's package-dir); an installed wheel has no pyproject.toml beside it.
    """
    here = Path(__file__).resolve().parent
    root = here.parent
    if here.name == "bench" and (root / "pyproject.toml").is_file() and (root / "kernels").is_dir():
        return root
    return None


def default_results_dir() -> Path:
    """Where results go without --out: the checkout's bench/results, else ./bench-results."""
    root = source_checkout()
    return root / "bench" / "results" if root is not None else Path.cwd() / "bench-results"


def git_commit() -> str:
    """The commit the results come from, '+dirty' when tracked files differ from it.

    In order: the environment variable FASTGPT_GIT_COMMIT (a copy of the tree without .git,
    e.g. one shipped to a GPU machine), `git rev-parse HEAD` in the source checkout when
    fastgpt runs from one, else "unknown".
    """
    named = os.environ.get("FASTGPT_GIT_COMMIT")
    if named:
        return named
    root = source_checkout()
    if root is None or not (root / ".git").exists():  # .git is a file in a git worktree
        return "unknown"
    run = lambda *a: subprocess.run(
        a, cwd=root, capture_output=True, text=True, timeout=10, check=True
    )
    try:
        head = run("git", "rev-parse", "HEAD").stdout.strip()
        dirty = run("git", "status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
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


def jsonable(value: object) -> object:
    """A command-line value as JSON can hold it: paths and devices as text, infinity as null."""
    if isinstance(value, Path | torch.device):
        return str(value)
    return None if isinstance(value, float) and math.isinf(value) else value


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)  # atomic: a run killed mid-write leaves the previous complete file
