"""Training: `fastgpt train` (one process, or one per GPU / CPU process under torchrun).

    from fastgpt.train import TrainConfig, train
    result = train(TrainConfig(preset="tiny", steps=200))   # embedded corpus, best device
    result["losses"]  # one training loss per step

Every step draws one global batch of windows (batch_size x grad_accum x world_size) from a
generator seeded with --seed; each process takes its slice. So a run on N processes sees the same
data as one process with an N times larger batch, and a resumed run that of an uninterrupted one.
"""

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastgpt import checkpoint, data
from fastgpt.attention import select_backend
from fastgpt.model import GPT, preset_config
from fastgpt.tokenizer import build_tokenizer, load_tokenizer, tokenizer_from_dict

# Defaults per preset: tokenizer, steps, batch size, learning rate, warm-up steps, BPE vocabulary.
PRESET_TRAINING = {
    "tiny": dict(tokenizer="word", steps=1500, batch_size=4, lr=1e-3, warmup=0),  # the notebook's
    "small": dict(tokenizer="char", steps=5000, batch_size=64, lr=1e-3, warmup=100),
    "gpt2": dict(tokenizer="bpe", steps=5000, batch_size=8, lr=6e-4, warmup=200),
}
BPE_VOCAB_SIZE = {"tiny": 1024, "small": 1024, "gpt2": 50257}  # when --tokenizer bpe
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Below this many FLOPs per step a CPU step runs on one thread (the tiny preset: ~3e7).
SMALL_STEP_FLOPS = 1e9
# Options a resumed run takes from its own arguments; the rest come from the checkpoint, so the
# run continues as it was (steps too, unless given).
RESUME_OVERRIDES = ("steps", "device", "out", "compile", "stop_after", "progress", "sample_tokens")


@dataclass
class TrainConfig:
    data: str | None = None  # .txt file or folder, or embedded:poem; None = the embedded rhyme
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
    seed: int = 1337
    eval_every: int | None = None  # steps between validation (and checkpoints); None = steps/10
    eval_batches: int = 4  # global batches per validation estimate
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as if interrupted
    sample_tokens: int = 40  # tokens sampled at the end (0 = none)
    progress: bool = True  # tqdm progress bar and printed summary (rank 0)


def resolved(cfg: TrainConfig) -> TrainConfig:
    """cfg with every None default filled from the preset."""
    if cfg.preset not in PRESET_TRAINING:
        raise ValueError(
            f"Unknown preset {cfg.preset!r}; expected one of {', '.join(PRESET_TRAINING)}."
        )
    defaults = PRESET_TRAINING[cfg.preset]
    cfg = replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    if cfg.bpe_vocab_size is None:
        cfg = replace(cfg, bpe_vocab_size=BPE_VOCAB_SIZE[cfg.preset])
    if cfg.block_size is None:
        cfg = replace(cfg, block_size=preset_config(cfg.preset, vocab_size=1).block_size)
    for name in ("steps", "batch_size", "block_size", "grad_accum", "eval_batches"):
        if getattr(cfg, name) <= 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}."
            )
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}.")
    return replace(
        cfg,
        warmup=min(cfg.warmup, cfg.steps // 10),
        eval_every=cfg.eval_every or max(cfg.steps // 10, 1),
    )


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """The requested device, else the best one here: cuda > mps > cpu."""
    if requested is None:
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here.")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for but MPS is not available here.")
    return device


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    if requested is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if requested not in DTYPES:
        raise ValueError(f"Unknown --dtype {requested!r}; expected one of {', '.join(DTYPES)}.")
    return DTYPES[requested]


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU (for MFU; the benchmark's table), None when unknown.

    FASTGPT_PEAK_FLOPS (FLOP/s) overrides it, e.g. for a GPU the table does not know.
    """
    if "FASTGPT_PEAK_FLOPS" in os.environ:
        return float(os.environ["FASTGPT_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    from fastgpt.bench import peak_bf16_tflops

    tflops = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


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


@torch.no_grad()
def estimate_loss(model, ids, cfg: TrainConfig, global_batch: int, device, autocast) -> float:
    """Mean loss over eval_batches global batches of windows of ids, the same at every evaluation
    and for any split of the global batch into processes and micro-steps."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.eval_batches * global_batch
    offsets = torch.randint(len(ids) - cfg.block_size, (n,), generator=gen)
    losses = []
    for chunk in offsets.split(cfg.batch_size):  # equal chunks: their mean is the overall mean
        x, y = data.get_batch(ids, chunk, cfg.block_size, device)
        with autocast:
            losses.append(model(x, y)[1].float())
    model.train()
    return torch.stack(losses).mean().item()


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
    rank, local_rank, world = _world()
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the default CUDA stream: this rank's GPU
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    threads = torch.get_num_threads()
    try:
        metrics = _train(cfg, rank, world, device)
        if world > 1:
            # Rank 0 still writes the last checkpoint and plots: no rank may tear its process
            # group down while a peer can still talk to it (gloo aborts the process then).
            dist.barrier()
        return metrics
    finally:
        torch.set_num_threads(threads)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _tokenizer_and_data(cfg: TrainConfig, ckpt: Path | None, rank: int, world: int):
    """(tokenizer, train ids, val ids). Rank 0 learns the tokenizer (or it comes from the
    checkpoint) and writes the token cache; the other ranks receive the one and read the other."""
    if ckpt is not None:
        tok = load_tokenizer(ckpt / "tokenizer.json")
    else:
        tok = None
        if rank == 0:
            text = data.embedded_text(cfg.data) or data.read_text(cfg.data)
            tok = build_tokenizer(cfg.tokenizer, text, cfg.bpe_vocab_size).to_dict()
        tok = tokenizer_from_dict(_broadcast(tok, rank, world))
    embedded = data.embedded_text(cfg.data)
    if embedded is not None:
        return tok, *data.split(data.encode(tok, embedded), cfg.block_size)
    cache = Path(cfg.out) / "data"
    if rank == 0:
        data.cached_split(cfg.data, tok, cfg.block_size, cache)
    if world > 1:
        dist.barrier()
    return tok, *data.cached_split(cfg.data, tok, cfg.block_size, cache)


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> dict:
    out = Path(cfg.out)
    state, ckpt = None, None
    if cfg.resume:
        ckpt = checkpoint.latest_checkpoint(out)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out} to resume from.")
        saved = checkpoint.read_config(ckpt)
        overrides = {k: getattr(cfg, k) for k in RESUME_OVERRIDES}
        if cfg.steps is None:  # keep the run's length (and so its learning-rate schedule)
            del overrides["steps"]
        cfg = replace(TrainConfig(**saved["train"]), **overrides)
        state = checkpoint.load_state(ckpt)
    cfg = resolved(cfg)
    main = rank == 0
    log = print if main and cfg.progress else (lambda *a, **k: None)

    tok, train_ids, val_ids = _tokenizer_and_data(cfg, ckpt, rank, world)

    # Model: identical initial weights on every rank; then a per-rank RNG for dropout.
    torch.manual_seed(cfg.seed)
    overrides = {"dropout": cfg.dropout} if cfg.dropout is not None else {}
    model_cfg = preset_config(
        cfg.preset,
        vocab_size=tok.vocab_size,
        block_size=cfg.block_size,
        backend=cfg.backend,
        **overrides,
    )
    raw_model = GPT(model_cfg)
    if ckpt is not None:
        checkpoint.load_safetensors_into(raw_model, ckpt)
    raw_model.to(device)
    backend, why = select_backend(device, cfg.backend)
    dtype = pick_dtype(cfg.dtype, device)
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    fp16_cuda = dtype == torch.float16 and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda" if fp16_cuda else "cpu", enabled=fp16_cuda)
    optimizer = make_optimizer(raw_model, cfg, device)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    data_gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)
    history = {"losses": [], "val": [], "elapsed_s": 0.0}
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        data_gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"][rank])
        if device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state(state["cuda_rng"][rank], device)
        history, start = state["history"], state["step"]

    n_params = raw_model.num_params()
    global_batch = cfg.batch_size * cfg.grad_accum * world  # sequences per optimizer step
    tokens_per_step = global_batch * cfg.block_size
    flops_per_token = raw_model.flops_per_token(cfg.block_size)
    peak = peak_flops(device)
    if device.type == "cpu" and tokens_per_step * flops_per_token < SMALL_STEP_FLOPS:
        # A step this small runs slower on several threads than on one (sync overhead).
        torch.set_num_threads(1)
    log(
        f"fastgpt train: preset {cfg.preset} ({n_params / 1e6:.2f}M params), {cfg.tokenizer} "
        f"tokenizer (vocab {tok.vocab_size}), {len(train_ids):,} train / {len(val_ids):,} val "
        f"tokens; {device} {str(dtype).removeprefix('torch.')} x{world}, attention backend "
        f"{backend} ({why}); {cfg.steps} steps of {tokens_per_step:,} tokens"
        + (f", resuming at step {start}" if start else "")
    )
    if len(val_ids) == 0:
        log(data.no_validation_note(len(train_ids), cfg.block_size))

    def save(step: int) -> None:
        """Checkpoint after `step` steps (every rank joins the RNG gather; rank 0 writes)."""
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        rngs, cuda_rngs = [rng], [cuda_rng]
        if world > 1:
            rngs, cuda_rngs = [None] * world, [None] * world
            dist.all_gather_object(rngs, rng)
            dist.all_gather_object(cuda_rngs, cuda_rng)
        if not main:
            return
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "data_rng": data_gen.get_state(),
            "torch_rng": rngs,
            "cuda_rng": cuda_rngs if device.type == "cuda" else None,
            "history": history,
        }
        config = {"model": model_cfg.to_dict(), "train": asdict(cfg)}
        checkpoint.save_checkpoint(out, step, raw_model, tok, config, state)

    bar = tqdm(
        total=cfg.steps, initial=start, disable=not (main and cfg.progress), dynamic_ncols=True
    )
    note = bar.write if main and cfg.progress else log
    pending, speed = [], {}
    t_flush = time.perf_counter()
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        offsets = torch.randint(
            len(train_ids) - cfg.block_size,
            (cfg.grad_accum, world, cfg.batch_size),
            generator=data_gen,
        )[:, rank]  # (grad_accum, batch_size): this rank's slice of the global batch
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = data.get_batch(train_ids, offsets[micro], cfg.block_size, device)
            if world > 1:  # all-reduce gradients on the last micro-step only
                model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step_loss = loss_sum / cfg.grad_accum
        if world > 1:  # the mean over all ranks (gloo has no AVG reduction)
            dist.all_reduce(step_loss)
            step_loss /= world
        pending.append(step_loss)

        done = step + 1
        evaluate = done % cfg.eval_every == 0 or done == end
        if done % 10 == 0 or evaluate:  # one device sync per 10 steps
            history["losses"] += torch.stack(pending).tolist()
            now = time.perf_counter()
            history["elapsed_s"] += now - t_flush
            tok_s = len(pending) * tokens_per_step / (now - t_flush)
            speed = {"tokens_per_s": tok_s}
            postfix = {"loss": f"{history['losses'][-1]:.4f}", "tok/s": f"{tok_s:,.0f}"}
            if peak:
                speed["mfu"] = flops_per_token * tok_s / (peak * world)
                postfix["mfu"] = f"{100 * speed['mfu']:.1f}%"
            bar.set_postfix(postfix, refresh=False)
            bar.update(len(pending))
            pending, t_flush = [], now
        if evaluate:
            if main:
                line = f"step {done}: train loss {history['losses'][-1]:.4f}"
                if len(val_ids):
                    val = estimate_loss(raw_model, val_ids, cfg, global_batch, device, autocast)
                    history["val"].append([done, val])
                    line += f", val loss {val:.4f}"
                note(line)
            save(done)
            t_flush = time.perf_counter()  # evaluation and saving are not training time
    bar.close()

    result = {
        "preset": cfg.preset,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "world_size": world,
        "n_params": n_params,
        "vocab_size": tok.vocab_size,
        "steps": len(history["losses"]),
        "final_loss": history["losses"][-1] if history["losses"] else None,
        **history,
        **speed,
        "checkpoint": str(checkpoint.latest_checkpoint(out)) if main else None,
    }
    if main and len(history["losses"]) == cfg.steps:
        _finish(result, raw_model, tok, cfg, device, autocast, out, log)
    return result


def _finish(result, model, tok, cfg, device, autocast, out: Path, log) -> None:
    """After the last step: a sample, the metrics JSON and the loss-curve PNG."""
    from fastgpt.sample import generate_text

    if cfg.sample_tokens > 0:
        with autocast:
            result["sample"] = generate_text(
                model, tok, "", cfg.sample_tokens, temperature=1.0, seed=cfg.seed
            )
    result["metrics_json"] = str(out / "metrics.json")
    result["loss_png"] = str(out / "loss.png")
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps({"config": asdict(cfg), **result}, indent=2))
    os.replace(tmp, out / "metrics.json")
    plot_losses(result, out / "loss.png")
    val = f", val loss {result['val'][-1][1]:.4f}" if result["val"] else ""
    log(
        f"done: {result['steps']} steps in {result['elapsed_s']:.1f} s, final loss "
        f"{result['final_loss']:.4f}{val}\nwrote {result['checkpoint']}, {result['metrics_json']}, "
        f"{result['loss_png']}"
    )
    if "sample" in result:
        log(f"sample:\n{result['sample']}")


def plot_losses(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(result["losses"]) + 1), result["losses"], lw=1, label="train")
    if result["val"]:
        steps, vals = zip(*result["val"], strict=True)
        ax.plot(steps, vals, "o-", ms=3, label="validation")
    uniform = math.log(result["vocab_size"])
    ax.axhline(
        uniform, color="gray", ls="--", lw=1, label=f"ln(vocab) = {uniform:.2f}: a uniform guess"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_yscale("log")
    ax.set_title(
        f"fastgpt {result['preset']}: {result['n_params'] / 1e6:.2f}M params, "
        f"{result['device']}, attention {result['backend']}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
