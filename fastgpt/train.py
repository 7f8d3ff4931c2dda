"""Training: `fastgpt train` (one process, or one per GPU / CPU process under torchrun).

    from fastgpt.train import TrainConfig, train
    result = train(TrainConfig(preset="tiny", steps=200))   # embedded corpus, best device
    result["losses"]  # one training loss per step

Every step draws one global batch of windows (batch_size x grad_accum x world_size) from a
generator seeded with --seed; each process takes its slice. So a run on N processes sees the same
data as one process with an N times larger batch, and a resumed run that of an uninterrupted one.

The run in pieces: `train` claims OUT (lock, checks), `setup_run` builds everything a run needs
(a `Run`), `train_step` does one optimizer step, `evaluate` measures the held-out loss and logs
it, `save` writes a checkpoint; `_train` is the loop that calls them.
"""

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from fastgpt import checkpoint, data
from fastgpt.attention import select_backend
from fastgpt.devices import peak_flops, pick_device, pick_dtype
from fastgpt.errors import FastGPTError
from fastgpt.metrics import MetricsLog, plot_losses, write_metrics
from fastgpt.model import GPT, GPTConfig, preset_config
from fastgpt.sample import generate_text
from fastgpt.tokenizer import build_tokenizer, tokenizer_from_dict
from fastgpt.varlen import select_varlen_backend

# Defaults per preset: tokenizer, steps, batch size, learning rate, warm-up steps, BPE vocabulary.
PRESET_TRAINING = {
    "tiny": dict(tokenizer="word", steps=1500, batch_size=4, lr=1e-3, warmup=0),  # the notebook's
    "small": dict(tokenizer="char", steps=5000, batch_size=64, lr=1e-3, warmup=100),
    "gpt2": dict(tokenizer="bpe", steps=5000, batch_size=8, lr=6e-4, warmup=200),
}
BPE_VOCAB_SIZE = {"tiny": 1024, "small": 1024, "gpt2": 50257}  # when --tokenizer bpe
# Below this many FLOPs per step a CPU step runs on one thread (the tiny preset: ~3e7).
SMALL_STEP_FLOPS = 1e9
# Options a resumed run takes from its own arguments; the rest come from the checkpoint, so the
# run continues as it was. The first three only when given (None keeps the checkpoint's).
RESUME_OVERRIDES = ("steps", "eval_every", "backend")
RESUME_OWN = ("device", "out", "compile", "stop_after", "progress", "sample_tokens", "log")
RESUME_OWN += ("resume", "overwrite")


@dataclass
class TrainConfig:
    data: str | None = None  # .txt file or folder, or embedded:poem; None = the embedded rhyme
    doc_sep: str | None = None  # splits each --data file into documents (e.g. "<|endoftext|>")
    doc_mask: bool = True  # attention within each document, where the corpus has several
    tokenizer: str | None = None  # one of tokenizer.KINDS ("word", "bpe"...); None = the preset's
    bpe_vocab_size: int | None = None  # BPE vocabulary; None = 50257 for gpt2, else 1024
    preset: str = "tiny"  # model architecture: "tiny", "small" or "gpt2"
    steps: int | None = None  # optimizer steps; None = the preset's
    batch_size: int | None = None  # sequences per process per micro-step; None = the preset's
    block_size: int | None = None  # context length; None = the preset's
    dropout: float | None = None  # dropout probability; None = the preset's
    lr: float | None = None  # peak learning rate (cosine decay to lr/10 after warm-up)
    warmup: int | None = None  # linear warm-up steps; None = the preset's (at most steps/10)
    weight_decay: float = 0.1  # AdamW decay of matrices (not of biases, norms)
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    grad_accum: int = 1  # micro-steps per optimizer step
    device: str | None = None  # "cuda", "mps", "cpu"...; None = best available
    dtype: str | None = None  # "float32", "bfloat16" (autocast), "float16"; None = bf16 on CUDA
    backend: str | None = None  # fastgpt.attention backend; None = automatic pick
    compile: bool = False  # torch.compile the model
    out: str = "out"  # folder for checkpoints, metrics, loss curve and token cache
    resume: bool = False  # continue from OUT's latest checkpoint
    overwrite: bool = False  # replace the run OUT holds (without it, a new run there is refused)
    seed: int = 1337
    eval_every: int | None = None  # steps between validation (and checkpoints); None = steps/10
    eval_batches: int = 4  # global batches per validation estimate
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as if interrupted
    sample_tokens: int = 40  # tokens sampled at the end (0 = none)
    progress: bool = True  # tqdm progress bar and printed summary (rank 0)
    log: str | None = None  # extra metrics logger: "tensorboard" (needs tensorboard installed)


def check_values(cfg: TrainConfig) -> None:
    """FastGPTError for a hyper-parameter out of range (NaN and infinities included)."""
    for name in ("steps", "batch_size", "block_size", "grad_accum", "eval_batches"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise FastGPTError(f"--{name.replace('_', '-')} must be positive, got {value}.")
    for name in ("warmup", "sample_tokens", "eval_every", "stop_after"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise FastGPTError(f"--{name.replace('_', '-')} must be >= 0, got {value}.")
    rules = {
        "lr": (lambda x: 0 < x < math.inf, "positive and finite"),
        "dropout": (lambda x: 0 <= x < 1, "in [0, 1)"),
        "weight_decay": (lambda x: 0 <= x < math.inf, ">= 0 and finite"),
        "grad_clip": (lambda x: 0 <= x < math.inf, ">= 0 and finite (0 disables clipping)"),
    }
    for name, (ok, text) in rules.items():
        value = getattr(cfg, name)
        if value is not None and not ok(value):  # NaN fails every comparison
            raise FastGPTError(f"--{name.replace('_', '-')} must be {text}, got {value}.")
    if cfg.doc_sep is not None and (cfg.doc_sep == "" or data.embedded_text(cfg.data)):
        raise FastGPTError(
            f"--doc-sep {cfg.doc_sep!r} needs a non-empty separator and --data files to split "
            f"(--data is {cfg.data or 'the embedded rhyme'})."
        )


def resolved(cfg: TrainConfig) -> TrainConfig:
    """cfg with every None default filled from the preset (values checked)."""
    if cfg.preset not in PRESET_TRAINING:
        raise FastGPTError(
            f"Unknown preset {cfg.preset!r}; expected one of {', '.join(PRESET_TRAINING)}."
        )
    check_values(cfg)
    defaults = PRESET_TRAINING[cfg.preset]
    cfg = replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    if cfg.bpe_vocab_size is None:
        cfg = replace(cfg, bpe_vocab_size=BPE_VOCAB_SIZE[cfg.preset])
    if cfg.block_size is None:
        cfg = replace(cfg, block_size=preset_config(cfg.preset, vocab_size=1).block_size)
    return replace(
        cfg,
        warmup=min(cfg.warmup, cfg.steps // 10),
        eval_every=cfg.eval_every or max(cfg.steps // 10, 1),
    )


def resume_config(cfg: TrainConfig, ckpt: Path) -> tuple[TrainConfig, str]:
    """(the configuration a resumed run continues with, a sentence saying what it took from ckpt).

    The checkpoint's run decides the data, tokenizer, model, batch, learning rate and seed: an
    option given here that differs from it is an error. --steps may extend the run (said, as it
    stretches the learning-rate schedule), never end it before the checkpoint's step.
    """
    saved_dict = checkpoint.read_config(ckpt).get("train")
    if not isinstance(saved_dict, dict):
        raise FastGPTError(f"{ckpt / 'config.json'} has no training section; it cannot resume.")
    names = {f.name for f in fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in saved_dict.items() if k in names})
    defaults = TrainConfig()
    conflicts = [
        f"--{name.replace('_', '-')} {getattr(cfg, name)!r} (the checkpoint has "
        f"{getattr(saved, name)!r})"
        for name in sorted(names - set(RESUME_OVERRIDES) - set(RESUME_OWN))
        if getattr(cfg, name) not in (getattr(defaults, name), getattr(saved, name))
    ]
    if conflicts:
        raise FastGPTError(
            f"--resume continues the run in {cfg.out} with its own settings, and "
            f"{', '.join(conflicts)} conflict{'s' if len(conflicts) == 1 else ''} with it; drop "
            "them, or start a new run (--overwrite or another --out)."
        )
    given = {k: getattr(cfg, k) for k in RESUME_OVERRIDES if getattr(cfg, k) is not None}
    new = replace(saved, **given, **{k: getattr(cfg, k) for k in RESUME_OWN})
    step = checkpoint.run_step(ckpt)
    if new.steps is not None and new.steps <= step:
        what = f"--steps {new.steps} is" if "steps" in given else f"the run's {new.steps} steps are"
        raise FastGPTError(
            f"{what} not beyond the checkpoint's step {step}: nothing to train; give --steps "
            f"above {step} to continue."
        )
    note = (
        f"resuming {ckpt} at step {step}; data, tokenizer, preset, batch, learning rate and seed "
        "from the checkpoint"
    )
    if "steps" in given and saved.steps is not None and new.steps != saved.steps:
        old, stretched = resolved(saved), resolved(new)
        note += (
            f"; --steps {new.steps} (the run had {saved.steps}) stretches the learning-rate "
            f"schedule: lr at step {step} is {lr_at(step, stretched):.3g} (was "
            f"{lr_at(step, old):.3g})"
        )
    return new, note


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr / 10 at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and norms
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def summed_loss(model, x: torch.Tensor, y: torch.Tensor, documents: dict) -> torch.Tensor:
    """Cross-entropy of model on x (N, T) summed over the targets y (N, T) that count (not -100),
    as GPT.forward takes it (float32 logits)."""
    logits = model(x, **documents)[0]  # (N, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")


def window_batch(ids, starts, offsets: torch.Tensor, block_size: int, device) -> tuple:
    """(x, y, model keyword arguments) of the windows of ids at offsets (N,): with document starts,
    cu_seqlens keeps attention within each document (data.get_document_batch)."""
    if starts is None:
        return *data.get_batch(ids, offsets, block_size, device), {}
    x, y, cu_seqlens = data.get_document_batch(ids, starts, offsets, block_size, device)
    return x, y, {"cu_seqlens": cu_seqlens}


@torch.no_grad()
def estimate_loss(
    model, ids, cfg: TrainConfig, global_batch: int, device, autocast, starts=None
) -> float:
    """Mean loss over eval_batches global batches of windows of ids (documents starting at
    `starts`, or None), the same at every evaluation and for any split of the global batch into
    processes and micro-steps."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.eval_batches * global_batch
    offsets = torch.randint(len(ids) - cfg.block_size, (n,), generator=gen)
    losses = []
    for chunk in offsets.split(cfg.batch_size):  # equal chunks: their mean is the overall mean
        x, y, documents = window_batch(ids, starts, chunk, cfg.block_size, device)
        with autocast:
            if starts is None:
                losses.append(model(x, y)[1].float())
            else:  # chunks hold different numbers of targets: sum, then divide by them all
                losses.append(summed_loss(model, x, y, documents))
    model.train()
    if starts is None:
        return torch.stack(losses).mean().item()
    return (torch.stack(losses).sum() / data.count_targets(starts, offsets, cfg.block_size)).item()


def _world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) without it."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train(cfg: TrainConfig) -> dict:
    """Train as cfg says; returns the metrics (losses per step, val losses, speed, sample...)."""
    check_values(cfg)  # before any work: a bad value is refused up front
    rank, local_rank, world = _world()
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the default CUDA stream: this rank's GPU
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    threads = torch.get_num_threads()
    try:
        with contextlib.ExitStack() as stack:
            ckpt = claim_out(cfg, rank, world, stack)
            metrics = _train(cfg, rank, world, device, ckpt)
            if world > 1:
                # Rank 0 still writes the last checkpoint and plots: no rank may tear its process
                # group down while a peer can still talk to it (gloo aborts the process then).
                dist.barrier()
        return metrics
    finally:
        torch.set_num_threads(threads)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def claim_out(cfg: TrainConfig, rank: int, world: int, stack: contextlib.ExitStack) -> Path | None:
    """Check OUT is a writable folder, lock it for the run (released by stack), tidy it; returns
    the checkpoint to resume from. Rank 0 does it; every rank gets its verdict."""
    verdict = None
    if rank == 0:
        try:
            ckpt = checkpoint.claim_out(cfg.out, cfg.resume, cfg.overwrite, stack)[1]
            verdict = ("ok", None if ckpt is None else str(ckpt))
        except FastGPTError as e:
            if world == 1:
                raise
            verdict = ("error", str(e))
    status, value = _broadcast(verdict, rank, world)
    if status == "error":
        raise FastGPTError(value)
    return None if value is None else Path(value)


def _tokenizer_and_data(cfg: TrainConfig, ckpt: Path | None, rank: int, world: int):
    """(tokenizer, data.Corpus). Rank 0 learns the tokenizer (or it comes from the checkpoint)
    and writes the token cache; the other ranks receive the one and read the other."""
    if ckpt is not None:
        vocab = checkpoint.read_config(ckpt)["model"].get("vocab_size")
        tok = checkpoint.load_checkpoint_tokenizer(ckpt, vocab)
    else:
        tok = None
        if rank == 0:
            text = data.embedded_text(cfg.data) or "".join(
                data.read_documents(cfg.data, cfg.doc_sep)
            )
            tok = build_tokenizer(cfg.tokenizer, text, cfg.bpe_vocab_size).to_dict()
        tok = tokenizer_from_dict(_broadcast(tok, rank, world))
    embedded = data.embedded_text(cfg.data)
    if embedded is not None:  # one stream, no documents
        return tok, data.Corpus(*data.split(data.encode(tok, embedded), cfg.block_size))
    cache = Path(cfg.out) / "data"
    if rank == 0:
        data.cached_corpus(cfg.data, tok, cfg.block_size, cache, cfg.doc_sep)
    if world > 1:
        dist.barrier()
    return tok, data.cached_corpus(cfg.data, tok, cfg.block_size, cache, cfg.doc_sep)


@dataclass
class Run:
    """Everything a run needs between steps; built by setup_run."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    tok: object
    train_ids: object  # np.ndarray or np.memmap of token ids
    val_ids: object
    model_cfg: GPTConfig
    raw_model: GPT  # the model itself (what is saved)
    model: torch.nn.Module  # what the step calls: raw_model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: torch.dtype
    backend: str
    data_gen: torch.Generator
    start: int = 0
    history: dict = field(default_factory=lambda: {"losses": [], "val": [], "elapsed_s": 0.0})
    log: MetricsLog | None = None
    # Where the documents of train_ids / val_ids start (int64); None: attention over whole windows.
    train_starts: object = None
    val_starts: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def global_batch(self) -> int:  # sequences per optimizer step
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def setup_run(cfg: TrainConfig, rank: int, world: int, device, ckpt: Path | None) -> Run:
    """Tokenizer, data, model, optimizer and RNGs of a run (restored from ckpt when resuming)."""
    tok, corpus = _tokenizer_and_data(cfg, ckpt, rank, world)
    train_ids, val_ids = corpus.train, corpus.val
    # Model: identical initial weights on every rank; then a per-rank RNG for dropout.
    torch.manual_seed(cfg.seed)
    overrides = {"dropout": cfg.dropout} if cfg.dropout is not None else {}
    model_cfg = preset_config(
        cfg.preset, vocab_size=tok.vocab_size, block_size=cfg.block_size, backend=cfg.backend,
        **overrides,
    )  # fmt: skip
    raw_model = GPT(model_cfg)
    if ckpt is not None:
        checkpoint.load_safetensors_into(raw_model, ckpt)
    raw_model.to(device)
    dtype = pick_dtype(cfg.dtype, device)
    fp16_cuda = dtype == torch.float16 and device.type == "cuda"
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    run = Run(
        cfg, rank, world, device, tok, train_ids, val_ids, model_cfg, raw_model, model,
        optimizer=make_optimizer(raw_model, cfg, device),
        scaler=torch.amp.GradScaler("cuda" if fp16_cuda else "cpu", enabled=fp16_cuda),
        dtype=dtype,
        backend=select_backend(device, cfg.backend)[0],
        data_gen=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    if cfg.doc_mask and corpus.has_documents:
        run.train_starts, run.val_starts = corpus.train_starts, corpus.val_starts
        try:
            select_varlen_backend(device, cfg.backend)
        except NotImplementedError as e:
            raise FastGPTError(f"{e} Or train without document masks: --no-doc-mask.") from None
    torch.manual_seed(cfg.seed + rank)
    if ckpt is not None:
        _restore(run, checkpoint.load_state(ckpt))
    return run


def _restore(run: Run, state: dict) -> None:
    """Optimizer, scaler, RNGs, step and loss history from a checkpoint's state.pt."""
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        run.data_gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"][run.rank])
        if run.device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state(state["cuda_rng"][run.rank], run.device)
        run.history, run.start = state["history"], state["step"]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise FastGPTError(
            f"The state.pt of the checkpoint in {run.out} does not fit this run ({e!r}); was it "
            "written by a run with another number of processes?"
        ) from None


def describe_validation(run: Run) -> str:
    """What the validation loss measures, in words (printed before any validation number)."""
    n_val = len(run.val_ids)
    what = (
        f"validation loss = mean cross-entropy of {run.cfg.eval_batches * run.global_batch} "
        f"windows of {run.cfg.block_size} tokens from the held-out last {n_val:,} tokens of the "
        "corpus (never trained on)"
    )
    if n_val < 20 * run.cfg.block_size:
        what += "; so few that it says little about unseen text"
    return what


def train_step(run: Run, step: int) -> torch.Tensor:
    """One optimizer step (all micro-steps) at index step; returns the mean loss, on device."""
    cfg, world = run.cfg, run.world
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    global_offsets = torch.randint(
        len(run.train_ids) - cfg.block_size,
        (cfg.grad_accum, world, cfg.batch_size),
        generator=run.data_gen,
    )
    offsets = global_offsets[:, run.rank]  # (grad_accum, batch_size): this rank's slice
    targets = None  # with documents: the targets that count in the whole global batch
    if run.train_starts is not None:
        targets = data.count_targets(run.train_starts, global_offsets.flatten(), cfg.block_size)
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(cfg.grad_accum):
        x, y, documents = window_batch(
            run.train_ids, run.train_starts, offsets[micro], cfg.block_size, run.device
        )
        if world > 1:  # all-reduce gradients on the last micro-step only
            run.model.require_backward_grad_sync = micro == cfg.grad_accum - 1
        with run.autocast():
            if targets is None:
                loss = run.model(x, y)[1] / cfg.grad_accum
            else:  # every target weighs alike, whatever micro-step and process holds it
                loss = summed_loss(run.model, x, y, documents) * world / targets
        run.scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    if cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    step_loss = loss_sum
    if world > 1:  # the mean over all ranks (gloo has no AVG reduction)
        dist.all_reduce(step_loss)
        step_loss /= world
    return step_loss


def diverged(run: Run, what: str, step: int, value: float) -> FastGPTError:
    """The error that stops a run whose loss stopped being a finite number."""
    try:
        last = checkpoint.latest_checkpoint(run.out)
    except FastGPTError:
        last = None
    kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was written"
    return FastGPTError(
        f"Training diverged: the {what} at step {step} is {value}; stopped without saving ({kept})."
        " Lower --lr or raise --warmup."
    )


def evaluate(run: Run, done: int, speed: dict) -> float | None:
    """Validation loss after `done` steps (rank 0; None without a validation split), recorded with
    the step's training loss in the history, the metrics log and the plot when it is a finite
    number (the caller stops the run when it is not)."""
    val = None
    if len(run.val_ids):  # a corpus too small for a held-out estimate has none
        val = estimate_loss(
            run.raw_model, run.val_ids, run.cfg, run.global_batch, run.device, run.autocast(),
            run.val_starts,
        )  # fmt: skip
        if not math.isfinite(val):
            return val
        run.history["val"].append([done, val])
    since = run.history["losses"][-run.cfg.eval_every :]
    record = {
        "step": done,
        "train_loss": run.history["losses"][-1],
        "train_loss_mean": sum(since) / len(since),
        **({} if val is None else {"val_loss": val}),
        "lr": lr_at(done - 1, run.cfg),
        "elapsed_s": run.history["elapsed_s"],
        **speed,
    }
    if run.log is not None:
        run.log.evaluation(record, {**_summary(run), **run.history})
    return val


def save(run: Run, step: int) -> None:
    """Checkpoint after `step` steps (every rank joins the RNG gather; rank 0 writes)."""
    device, world = run.device, run.world
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    rngs, cuda_rngs = [rng], [cuda_rng]
    if world > 1:
        rngs, cuda_rngs = [None] * world, [None] * world
        dist.all_gather_object(rngs, rng)
        dist.all_gather_object(cuda_rngs, cuda_rng)
    if not run.main:
        return
    state = {
        "step": step,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "data_rng": run.data_gen.get_state(),
        "torch_rng": rngs,
        "cuda_rng": cuda_rngs if device.type == "cuda" else None,
        "history": run.history,
    }
    config = {"model": run.model_cfg.to_dict(), "train": asdict(run.cfg)}
    checkpoint.save_checkpoint(run.out, step, run.raw_model, run.tok, config, state)


class Progress:
    """The progress bar and the loss history: one device sync per 10 steps (and at evaluations),
    tokens/s and MFU, and the check that every loss is a finite number."""

    def __init__(self, run: Run) -> None:
        self.run, self.pending, self.speed = run, [], {}
        cfg = run.cfg
        self.bar = tqdm(
            total=cfg.steps, initial=run.start, disable=not (run.main and cfg.progress),
            dynamic_ncols=True,
        )  # fmt: skip
        self.tokens_per_step = run.global_batch * cfg.block_size
        self.flops_per_token = run.raw_model.flops_per_token(cfg.block_size)
        self.peak = peak_flops(run.device)
        self.restart_clock()

    def restart_clock(self) -> None:
        """Evaluation and saving are not training time."""
        self.t_flush = time.perf_counter()

    def flush(self, done: int) -> None:
        """Move the pending losses (steps up to `done`) into the history; stop on a NaN/inf."""
        history, losses = self.run.history, torch.stack(self.pending).tolist()
        for i, loss in enumerate(losses):
            if not math.isfinite(loss):
                raise diverged(self.run, "training loss", done - len(losses) + i + 1, loss)
        history["losses"] += losses
        now = time.perf_counter()
        history["elapsed_s"] += now - self.t_flush
        tok_s = len(losses) * self.tokens_per_step / (now - self.t_flush)
        self.speed = {"tokens_per_s": tok_s}
        postfix = {"loss": f"{losses[-1]:.4f}", "tok/s": f"{tok_s:,.0f}"}
        if self.peak:
            self.speed["mfu"] = self.flops_per_token * tok_s / (self.peak * self.run.world)
            postfix["mfu"] = f"{100 * self.speed['mfu']:.1f}%"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(len(losses))
        self.pending, self.t_flush = [], now


def _summary(run: Run) -> dict:
    return {
        "preset": run.cfg.preset,
        "device": str(run.device),
        "dtype": str(run.dtype).removeprefix("torch."),
        "backend": run.backend,
        "world_size": run.world,
        "n_params": run.raw_model.num_params(),
        "vocab_size": run.tok.vocab_size,
    }


def _announce(run: Run, note: str | None, say) -> None:
    """The first printed lines: what runs where, and what the validation loss measures."""
    cfg, tok = run.cfg, run.tok
    why = select_backend(run.device, cfg.backend)[1]
    tokens_per_step = run.global_batch * cfg.block_size
    say(
        f"fastgpt train: preset {cfg.preset} ({run.raw_model.num_params() / 1e6:.2f}M params), "
        f"{cfg.tokenizer} tokenizer (vocab {tok.vocab_size}), {len(run.train_ids):,} train / "
        f"{len(run.val_ids):,} val tokens; {run.device} {str(run.dtype).removeprefix('torch.')} "
        f"x{run.world}, attention backend {run.backend} ({why}); {cfg.steps} steps of "
        f"{tokens_per_step:,} tokens" + (f"\n{note}" if note else "")
    )
    if run.train_starts is not None:
        name, why = select_varlen_backend(run.device, cfg.backend)
        say(
            f"documents: {len(run.train_starts):,} start in the train tokens; attention stays "
            f"within each and positions restart (varlen attention on {name}: {why}; "
            "--no-doc-mask turns it off)"
        )
    if len(run.val_ids):
        say(describe_validation(run))
    else:
        say(data.no_validation_note(len(run.train_ids), cfg.block_size))


def _train(cfg: TrainConfig, rank: int, world: int, device, ckpt: Path | None) -> dict:
    note = None
    if ckpt is not None:
        cfg, note = resume_config(cfg, ckpt)
    cfg = resolved(cfg)
    run = setup_run(cfg, rank, world, device, ckpt)
    say = print if run.main and cfg.progress else (lambda *a, **k: None)
    if run.main:
        if cfg.overwrite:  # only now that the new run is set up
            checkpoint.clear_run(run.out)
        run.log = MetricsLog(run.out, run.start, cfg.log)
    tokens_per_step = run.global_batch * cfg.block_size
    if (
        device.type == "cpu"
        and tokens_per_step * run.raw_model.flops_per_token(cfg.block_size) < SMALL_STEP_FLOPS
    ):
        torch.set_num_threads(1)  # a step this small runs slower on several threads (sync cost)
    _announce(run, note, say)
    progress = Progress(run)
    note_line = progress.bar.write if run.main and cfg.progress else say
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    try:
        for step in range(run.start, end):
            progress.pending.append(train_step(run, step))
            done = step + 1
            at_eval = done % cfg.eval_every == 0 or done == end
            if done % 10 == 0 or at_eval:  # one device sync per 10 steps
                progress.flush(done)
            if at_eval:
                # Every rank learns rank 0's validation loss, so that all stop together on a NaN.
                val = _broadcast(
                    evaluate(run, done, progress.speed) if run.main else None, rank, world
                )
                if val is not None and not math.isfinite(val):
                    raise diverged(run, "validation loss", done, val)
                if run.main:
                    line = f"step {done}: train loss {run.history['losses'][-1]:.4f}"
                    note_line(line + ("" if val is None else f", val loss {val:.4f} (held-out)"))
                save(run, done)
                progress.restart_clock()
    finally:
        progress.bar.close()
        if run.log is not None:
            run.log.close()
    return _result(run, progress.speed, say)


def _result(run: Run, speed: dict, say) -> dict:
    history = run.history
    result = {
        **_summary(run),
        "steps": len(history["losses"]),
        "final_loss": history["losses"][-1] if history["losses"] else None,
        **history,
        **speed,
        "checkpoint": str(checkpoint.latest_checkpoint(run.out)) if run.main else None,
    }
    if run.main and len(history["losses"]) == run.cfg.steps:
        _finish(run, result, say)
    return result


def _finish(run: Run, result: dict, say) -> None:
    """After the last step: a sample, the metrics JSON and the loss-curve PNG."""
    cfg, out = run.cfg, run.out
    if cfg.sample_tokens > 0:
        with run.autocast():
            result["sample"] = generate_text(
                run.raw_model, run.tok, "", cfg.sample_tokens, temperature=1.0, seed=cfg.seed
            )
    result["metrics_json"] = str(out / "metrics.json")
    result["loss_png"] = str(out / "loss.png")
    write_metrics(out / "metrics.json", {"config": asdict(cfg), **result})
    plot_losses(result, out / "loss.png")
    val = f", val loss {result['val'][-1][1]:.4f} (held-out)" if result["val"] else ""
    say(
        f"done: {result['steps']} steps in {result['elapsed_s']:.1f} s, final loss "
        f"{result['final_loss']:.4f}{val}\nwrote {result['checkpoint']}, {result['metrics_json']}, "
        f"{out / 'metrics.jsonl'}, {result['loss_png']}"
    )
    if "sample" in result:
        say(f"sample:\n{result['sample']}")
