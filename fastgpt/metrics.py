"""What a training run writes as it goes, so a crash or Ctrl-C keeps everything up to then.

OUT/metrics.jsonl   one JSON line per evaluation: step, train and validation loss, lr, speed
OUT/loss.png        the loss curve, redrawn at each evaluation
OUT/tb/             TensorBoard events (`--log tensorboard`, when tensorboard is installed)
OUT/metrics.json    everything at the end of a complete run (losses per step, config, sample)
"""

import json
import math
import time
from pathlib import Path

from fastgpt.errors import FastGPTError
from fastgpt.files import append_line, replacing, write_atomic

LOGGERS = ("tensorboard",)
PLOT_BUDGET = 10


def tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter writing into folder; FastGPTError when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise FastGPTError(
            "--log tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FastGPTError(f"{folder} is a link or a file; TensorBoard logs go to a folder in OUT.")
    return SummaryWriter(log_dir=str(folder))


class MetricsLog:
    """OUT/metrics.jsonl, OUT/loss.png and optional TensorBoard events, written at each evaluation.

    A resumed run keeps the lines up to its checkpoint's step (later ones came from steps it will
    train again); a new run starts the file afresh.
    """

    def __init__(self, out: Path, start: int, log: str | None = None) -> None:
        if log is not None and log not in LOGGERS:
            raise FastGPTError(f"Unknown --log {log!r}; expected one of {', '.join(LOGGERS)}.")
        self.out = out
        self.path = out / "metrics.jsonl"
        kept = []
        if start > 0 and self.path.is_file() and not self.path.is_symlink():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    if json.loads(line)["step"] <= start:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill
        write_atomic(self.path, "".join(kept))
        self.plotted_at, self.plot_cost = -math.inf, 0.0
        self.writer = tensorboard_writer(out / "tb") if log == "tensorboard" else None

    def evaluation(self, record: dict, plot: dict) -> None:
        """Append record (a dict with "step") and redraw the loss curve from plot's history."""
        append_line(self.path, json.dumps(record))
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()
        # Redraw unless the last drawing is younger than PLOT_BUDGET times its own cost, so that
        # drawing takes at most ~1/PLOT_BUDGET of the run (the end of the run always draws).
        if time.perf_counter() - self.plotted_at >= PLOT_BUDGET * self.plot_cost:
            start = time.perf_counter()
            plot_losses(plot, self.out / "loss.png")
            self.plotted_at = time.perf_counter()
            self.plot_cost = self.plotted_at - start

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_metrics(path: Path, metrics: dict) -> None:
    write_atomic(path, json.dumps(metrics, indent=2))


def plot_losses(result: dict, path: Path) -> None:
    """The training loss per step and the validation points, log scale, as a PNG at path.

    result: "losses" (one per step), "val" ([step, loss] pairs), "vocab_size", "preset",
    "n_params", "device", "backend".
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(range(1, len(result["losses"]) + 1), result["losses"], lw=1, label="train")
    if result["val"]:
        steps, vals = zip(*result["val"], strict=True)
        ax.plot(steps, vals, "o-", ms=3, label="validation (held-out text)")
    uniform = math.log(result["vocab_size"])
    ax.axhline(
        uniform, color="gray", ls="--", lw=1, label=f"ln(vocab) = {uniform:.2f}: a uniform guess"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_yscale("log")
    for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_format(FormatStrFormatter("%g"))  # plain numbers: cheaper to draw than mathtext
    ax.set_title(
        f"fastgpt {result['preset']}: {result['n_params'] / 1e6:.2f}M params, "
        f"{result['device']}, attention {result['backend']}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.98, top=0.92, bottom=0.12)
    with replacing(path) as f:
        fig.savefig(f, format="png", dpi=120)
