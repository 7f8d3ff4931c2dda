"""A toy translation task for the encoder-decoder: each line of the rhyme -> the line reversed.

    fastgpt train --task seq2seq                                  # < 1 minute on a laptop CPU
    fastgpt sample --ckpt out --prompt "mary had a little lamb"   # -> "lamb little a had mary"

Source: the line's words and <END>; decoder input: <SOS> and the reversed words; target: the
reversed words and <END>. Lines of one length form one batch, so no sequence is ever padded (the
attention has no key-padding path yet); every step takes one optimizer step over all of them.
"""

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastgpt import checkpoint, data
from fastgpt.seq2seq import Seq2Seq, Seq2SeqConfig
from fastgpt.tokenizer import END, WordTokenizer, load_tokenizer

SOS = "<SOS>"
CONFIDENT = 0.9  # training stops once every correct target token is at least this likely
TASK = "seq2seq"
# The model: 2 encoder and 2 decoder blocks, 2 heads, 64 dims, sinusoidal positions.
MODEL = dict(block_size=12, n_layer=2, n_head=2, n_embd=64, positions="sinusoidal")


@dataclass
class TranslationConfig:
    steps: int = 400  # optimizer steps, each over every training line
    lr: float = 3e-3  # AdamW learning rate (cosine decay to lr/10)
    seed: int = 1337
    device: str | None = None  # None = the best available
    backend: str | None = None  # fastgpt.attention backend; None = automatic pick
    out: str = "out"  # checkpoint folder
    overwrite: bool = False  # replace the run OUT holds (without it, a new run there is refused)
    eval_every: int = 25  # steps between exact-match checks (training stops once all match)
    progress: bool = True  # print progress lines


def reverse_pairs(text: str = data.RHYME) -> list[tuple[str, str]]:
    """(line, the line's words reversed) for each distinct non-empty line of text, in order."""
    lines = dict.fromkeys(" ".join(WordTokenizer.split(line)[:-1]) for line in text.splitlines())
    return [(line, " ".join(reversed(line.split()))) for line in lines if line]


def task_tokenizer(text: str = data.RHYME) -> WordTokenizer:
    """Word-level vocabulary of text with <END> (id 0) and <SOS> (id 1)."""
    words = sorted(set(WordTokenizer.split(text)) - {END})
    return WordTokenizer([END, SOS, *words])


def batches(tok: WordTokenizer, pairs: list[tuple[str, str]], device) -> list[tuple]:
    """One (src, tgt_in, tgt_out) batch per source length: (N, Ts), (N, Tt), (N, Tt) ids."""
    by_length: dict[int, list] = {}
    sos = tok.index[SOS]
    for src, tgt in pairs:
        s, t = tok.encode(src), tok.encode(tgt)  # words + <END> each
        by_length.setdefault(len(s), []).append((s, [sos, *t[:-1]], t))
    return [
        tuple(torch.tensor(col, device=device) for col in zip(*rows, strict=True))
        for _, rows in sorted(by_length.items())
    ]


def translate_ids(model: Seq2Seq, tok: WordTokenizer, src: torch.Tensor, **sampling) -> list[str]:
    """Translations of src (B, Ts) as text (greedy unless sampling says otherwise)."""
    ids = model.generate(src, model.config.block_size, tok.index[SOS], tok.index[END], **sampling)
    texts = []
    for row in ids.tolist():
        row = row[: row.index(tok.index[END])] if tok.index[END] in row else row
        texts.append(tok.decode(row))
    return texts


def exact_matches(model: Seq2Seq, tok: WordTokenizer, batch_list: list[tuple]) -> int:
    """How many training lines greedy decoding translates exactly."""
    was_training = model.training
    model.eval()
    hits = 0
    for src, _, tgt_out in batch_list:
        want = [tok.decode(row[:-1]) for row in tgt_out.tolist()]
        hits += sum(a == b for a, b in zip(translate_ids(model, tok, src), want, strict=True))
    model.train(was_training)
    return hits


@torch.no_grad()
def least_target_probability(model: Seq2Seq, batch_list: list[tuple]) -> float:
    """The smallest probability the model gives a correct target token (teacher forcing).

    Above 0.5 every correct token is the argmax, so greedy decoding reproduces every line.
    """
    was_training = model.training
    model.eval()
    least = 1.0
    for src, tgt_in, tgt_out in batch_list:
        probs = model(src, tgt_in)[0].float().softmax(-1)  # (N, Tt, V)
        least = min(least, probs.gather(-1, tgt_out[..., None]).min().item())
    model.train(was_training)
    return least


def train_translation(cfg: TranslationConfig) -> dict:
    """Train the toy translation model; stop early once every line translates exactly and
    every correct token has probability >= CONFIDENT (a margin, not a near tie)."""
    from fastgpt.devices import pick_device

    device = pick_device(cfg.device)
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        checkpoint.claim_out(cfg.out, resume=False, overwrite=cfg.overwrite, stack=stack)
        if device.type == "cpu":
            torch.set_num_threads(1)  # a model this small runs slower on several threads
        try:
            return run_translation_training(cfg, device)
        finally:
            torch.set_num_threads(threads)


def run_translation_training(cfg: TranslationConfig, device: torch.device) -> dict:
    """train_translation's loop on device: batches, AdamW with cosine decay, checkpoint."""
    torch.manual_seed(cfg.seed)
    tok, pairs = task_tokenizer(), reverse_pairs()
    batch_list = batches(tok, pairs, device)
    model = Seq2Seq(Seq2SeqConfig(vocab_size=tok.vocab_size, backend=cfg.backend, **MODEL))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps, cfg.lr / 10)
    log = print if cfg.progress else (lambda *a, **k: None)
    n_tokens = sum(b[2].numel() for b in batch_list)
    log(
        f"fastgpt train --task seq2seq: {len(pairs)} lines -> reversed, vocab {tok.vocab_size}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {device}; "
        f"{len(batch_list)} batches (one per line length) of {n_tokens} target tokens per step"
    )
    losses, matches, t0 = [], 0, time.perf_counter()
    for step in range(1, cfg.steps + 1):
        total = torch.zeros((), device=device)
        for src, tgt_in, tgt_out in batch_list:  # every token weighs the same
            loss = model(src, tgt_in, tgt_out)[1] * tgt_out.numel() / n_tokens
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            matches = exact_matches(model, tok, batch_list)
            least = least_target_probability(model, batch_list)
            log(
                f"step {step}: loss {losses[-1]:.4f}, exact match {matches}/{len(pairs)} lines, "
                f"least correct-token probability {least:.3f}"
            )
            if matches == len(pairs) and least >= CONFIDENT:
                break
    elapsed = time.perf_counter() - t0
    config = {"task": TASK, "model": model.config.to_dict(), "train": asdict(cfg)}
    state = {"step": len(losses), "losses": losses}
    if cfg.overwrite:  # only now that the new run has trained: a failed run removes nothing
        checkpoint.clear_run(cfg.out)
    ckpt = checkpoint.save_checkpoint(cfg.out, len(losses), model, tok, config, state)
    log(f"done: {len(losses)} steps in {elapsed:.1f} s, exact match {matches}/{len(pairs)}")
    log(f"wrote {ckpt}")
    return {"losses": losses, "exact_match": matches, "lines": len(pairs), "elapsed_s": elapsed}


def is_translation_checkpoint(path: str) -> bool:
    """True when path (an output or checkpoint folder) holds a `--task seq2seq` checkpoint."""
    try:
        ckpt = checkpoint.resolve_checkpoint(path)
    except FileNotFoundError:
        return False
    return checkpoint.read_config(ckpt).get("task") == TASK  # a bad file: one named error


def load_translator(path: str, device="cpu", backend: str | None = None):
    """(Seq2Seq in eval mode on device, tokenizer) of a `--task seq2seq` checkpoint."""
    ckpt = checkpoint.resolve_checkpoint(path)
    config = checkpoint.read_config(ckpt)
    if config.get("task") != TASK:
        raise ValueError(f"{ckpt} is a GPT checkpoint, not a --task seq2seq one.")
    model = Seq2Seq(Seq2SeqConfig.from_dict({**config["model"], "backend": backend}))
    checkpoint.load_safetensors_into(model, ckpt)
    return model.to(device).eval(), load_tokenizer(Path(ckpt) / "tokenizer.json")


def translate(
    path: str,
    prompt: str,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    backend: str | None = None,
) -> str:
    """The checkpoint's translation of each line of prompt (greedy at temperature 0)."""
    from fastgpt.devices import pick_device

    dev = pick_device(device)
    model, tok = load_translator(path, dev, backend)
    generator = None if seed is None else torch.Generator(device=dev).manual_seed(seed)
    sampling = dict(temperature=temperature, top_k=top_k, generator=generator)
    out = []
    if not prompt.strip():
        raise ValueError("--prompt needs a line of words to translate.")
    for line in prompt.strip().splitlines():
        src = tok.encode(line)  # words + <END>
        if len(src) > model.config.block_size:
            raise ValueError(
                f"The line has {len(src)} tokens with <END>; the model's block_size is "
                f"{model.config.block_size}."
            )
        src_t = torch.tensor([src], device=dev)  # (1, Ts)
        out.append(translate_ids(model, tok, src_t, **sampling)[0])
    return "\n".join(out)


# `fastgpt train --task seq2seq` and `fastgpt sample` options that apply to this task.
TRAIN_OPTIONS = {"steps", "lr", "seed", "device", "backend", "out", "overwrite", "progress"}
SAMPLE_OPTIONS = {"ckpt", "prompt", "temperature", "top_k", "seed", "device", "backend"}


def train_from_options(options: dict) -> dict:
    """train_translation with the `fastgpt train` options that apply; --data, --resume refused."""
    for name in ("data", "tokenizer", "resume"):
        if options.get(name):
            raise ValueError(
                f"--{name} does not apply to --task seq2seq: it trains on the embedded "
                "translation task from scratch."
            )
    given = {k: v for k, v in options.items() if k in TRAIN_OPTIONS and v is not None}
    return train_translation(TranslationConfig(**given))


def sample_from_options(options: dict) -> str:
    """translate() with the `fastgpt sample` options that apply (--tokens does not)."""
    kw = {k: v for k, v in options.items() if k in SAMPLE_OPTIONS}
    return translate(kw.pop("ckpt"), **kw)
