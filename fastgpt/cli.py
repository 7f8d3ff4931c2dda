"""The `fastgpt` command: train, sample, tokenize, bench.

    fastgpt train                      # tiny GPT, embedded corpus, best device; prints a sample
    fastgpt train --config run.toml    # options from a TOML file (given options override it)
    fastgpt sample --ckpt out --prompt "mary had a"
    fastgpt sample --ckpt out --prompt "mary had" --prompt "the lamb"   # one batch, two streams
    fastgpt train --task seq2seq       # encoder-decoder: rhyme lines -> reversed
    fastgpt sample --ckpt out --prompt "mary had a little lamb"   # translates (seq2seq ckpt)
    fastgpt tokenize --data embedded:poem --vocab-size 300   # tokenizers: vocabulary vs length
    fastgpt bench ...                  # kernel benchmarks (fastgpt.bench)

Bad input (fastgpt's own FastGPTError, and ValueError, TypeError, OSError) ends with one line
`fastgpt: error: ...` and exit status 2; anything else is a bug and keeps its traceback.
FASTGPT_DEBUG=1 shows the traceback always.

A subcommand is a function that adds its parser (`_train_parser`) and one that runs it
(`_run_train`), listed in COMMANDS.
"""

import argparse
import os
import sys
import types
import typing
from dataclasses import fields

from fastgpt.errors import FastGPTError
from fastgpt.tokenizer import KINDS
from fastgpt.train import PRESET_TRAINING, TrainConfig

BACKENDS = ["auto", "triton", "cpp", "reference"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _train_parser(sub) -> None:
    # Options left out are not in the result (SUPPRESS), so --config's file can supply them.
    t = sub.add_parser(
        "train",
        help="train a GPT (no arguments: tiny preset, embedded corpus)",
        argument_default=argparse.SUPPRESS,
    )
    t.add_argument("--config", help="TOML file of options (names as below, - or _; CLI wins)")
    t.add_argument("--task", choices=["lm", "seq2seq"], help="seq2seq: translation (default: lm)")
    t.add_argument(
        "--data",
        help="UTF-8 text file or folder (each file a document), or embedded:poem (default: rhyme)",
    )
    t.add_argument(
        "--doc-sep", help='split each --data file into documents at this text, e.g. "<|endoftext|>"'
    )
    t.add_argument(
        "--no-doc-mask",
        dest="doc_mask",
        action="store_false",
        help="let attention cross document boundaries (default: within each document)",
    )
    t.add_argument("--tokenizer", choices=KINDS, help="default: the preset's")
    t.add_argument(
        "--bpe-vocab-size", type=_positive_int, help="subword vocabulary: 50257 (gpt2), else 1024"
    )
    t.add_argument("--preset", choices=list(PRESET_TRAINING), help="default: tiny")
    t.add_argument("--steps", type=_positive_int)
    t.add_argument("--batch-size", type=_positive_int, help="sequences per process per micro-step")
    t.add_argument("--block-size", type=_positive_int, help="context length in tokens")
    t.add_argument("--dropout", type=float, help="dropout probability (default: the preset's)")
    t.add_argument("--lr", type=float, help="peak learning rate (warm-up, then cosine to lr/10)")
    t.add_argument("--warmup", type=int, help="warm-up steps")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0.1)")
    t.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off (default: 1)")
    t.add_argument("--device", help="cuda, mps, cpu (default: the best available)")
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="autocast dtype")
    t.add_argument("--backend", choices=BACKENDS)
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--grad-accum", type=_positive_int, help="micro-steps per step (default: 1)")
    t.add_argument("--eval-every", type=_positive_int, help="steps between validation/checkpoints")
    t.add_argument("--eval-batches", type=_positive_int, help="global batches per validation")
    t.add_argument("--out", help="output folder (default: out)")
    t.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace the run OUT holds")
    t.add_argument("--seed", type=int, help="default: 1337")
    t.add_argument("--sample-tokens", type=int, help="tokens sampled at the end (default: 40)")
    t.add_argument("--log", choices=["tensorboard"], help="also log to TensorBoard (OUT/tb)")


def _sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="sample text from a trained checkpoint")
    s.add_argument("--ckpt", default="out", help="training output folder or checkpoint folder")
    s.add_argument(
        "--prompt",
        action="append",
        help="text to continue (default: a new line); repeat it to sample several as one batch",
    )
    s.add_argument("--prompts-file", help="UTF-8 file of prompts, one per line, sampled as a batch")
    s.add_argument("--task", choices=["lm", "seq2seq"], help="default: the checkpoint's")
    s.add_argument("--tokens", type=int, default=40, help="tokens to sample (printed as they come)")
    s.add_argument("--temperature", type=float, help="0 = greedy (default: 1; seq2seq: 0)")
    s.add_argument("--top-k", type=_positive_int)
    s.add_argument("--seed", type=int)
    s.add_argument("--device", help="cuda, mps, cpu (default: the best available)")
    s.add_argument("--backend", choices=BACKENDS)
    s.add_argument(
        "--page-size", type=_positive_int, help="paged KV cache of this many positions a page"
    )


def _tokenize_parser(sub) -> None:
    k = sub.add_parser("tokenize", help="train tokenizers on a text; vocabulary vs length")
    k.add_argument("--data", help="UTF-8 text file or folder, or embedded:poem (default: rhyme)")
    k.add_argument("--tokenizer", choices=["all", *KINDS], default="all")
    k.add_argument(
        "--vocab-size", type=_positive_int, default=1024, help="for bpe, wordpiece, unigram"
    )


def _field_types() -> dict[str, tuple[type, ...]]:
    """TrainConfig field name -> the Python types its value may have."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in fields(TrainConfig):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        out[f.name] = tuple(type(None) if a is None else a for a in args)
    return out


def read_config_file(path: str) -> dict:
    """TrainConfig options from a TOML file; FastGPTError naming the file and the bad key."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise FastGPTError(f"--config {path}: cannot read it ({e.strerror}).") from None
    except tomllib.TOMLDecodeError as e:
        raise FastGPTError(f"--config {path} is not valid TOML ({e}).") from None
    allowed = _field_types()
    options = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in allowed:
            raise FastGPTError(f"--config {path}: unknown option {key!r}.")
        types_ok = allowed[name] + ((int,) if float in allowed[name] else ())
        if isinstance(value, bool) and bool not in allowed[name] or not isinstance(value, types_ok):
            expected = " or ".join(t.__name__ for t in allowed[name] if t is not type(None))
            raise FastGPTError(
                f"--config {path}: {key} must be {expected}, got {value!r} "
                f"({type(value).__name__}).",
            )
        options[name] = value
    return options


def _run_train(options: dict) -> None:
    from fastgpt.train import train

    path = options.pop("config", None)
    merged = {**(read_config_file(path) if path else {}), **options}
    if merged.get("backend") == "auto":
        merged["backend"] = None
    if merged.pop("task", "lm") == "seq2seq":
        from fastgpt.translation import train_from_options

        train_from_options(merged)
        return
    train(TrainConfig(**merged))


def _sample_prompts(options: dict) -> list[str]:
    """The --prompt values, then the --prompts-file lines; [""] (a new line) when neither."""
    from fastgpt.sample import read_prompts_file

    prompts = options.pop("prompt") or []
    path = options.pop("prompts_file")
    return prompts + (read_prompts_file(path) if path else []) or [""]


def _run_sample(options: dict) -> None:
    from fastgpt.sample import stream, stream_prompts, write_streams
    from fastgpt.translation import is_translation_checkpoint, sample_from_options

    task = options.pop("task") or (
        "seq2seq" if is_translation_checkpoint(options["ckpt"]) else "lm"
    )
    if options["temperature"] is None:  # a translation is decoded greedily, text sampled
        options["temperature"] = 0.0 if task == "seq2seq" else 1.0
    prompts = _sample_prompts(options)
    if task == "seq2seq":  # translates each line of its prompt
        if options.pop("page_size") is not None:
            raise FastGPTError("--page-size is for GPT checkpoints, not translation ones.")
        print(sample_from_options({**options, "prompt": "\n".join(prompts)}))
        return
    try:
        if len(prompts) > 1:  # one batch, one KV-cache row per prompt
            write_streams(stream_prompts(prompts=prompts, **options), len(prompts), sys.stdout)
            return
        for piece in stream(prompt=prompts[0], **options):  # each token printed as it is drawn
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except BrokenPipeError:  # `fastgpt sample ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _run_tokenize(options: dict) -> None:
    from fastgpt.tokenizer import tokenize_report

    print(tokenize_report(**options))


COMMANDS = {
    "train": (_train_parser, _run_train),
    "sample": (_sample_parser, _run_sample),
    "tokenize": (_tokenize_parser, _run_tokenize),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgpt", description="Train and sample GPTs on fastgpt's attention kernels."
    )
    names = "{" + ",".join([*COMMANDS, "bench"]) + "}"
    sub = parser.add_subparsers(dest="command", required=True, metavar=names)
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    sub.add_parser("bench", help="attention benchmarks (fastgpt bench --help)", add_help=False)
    return parser


def _interrupted(command: str, options: dict) -> None:
    """What Ctrl-C leaves: a resumable checkpoint, or (before the first one) nothing to resume."""
    if command != "train":
        return
    from fastgpt.checkpoint import latest_checkpoint

    out = options.get("out", "out")
    try:
        ckpt = latest_checkpoint(out)
    except (FastGPTError, OSError):
        ckpt = None
    if ckpt is None:
        text = f"interrupted before the first checkpoint; {out} holds none to resume."
    else:
        text = f"interrupted; `fastgpt train --resume --out {out}` continues from {ckpt.name}."
    print(f"\nfastgpt: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # the benchmark parses its own arguments
        from fastgpt.bench import main as bench_main

        return bench_main(argv[1:]) or 0
    options = vars(build_parser().parse_args(argv))
    command = options.pop("command")
    if options.get("backend") == "auto":
        options["backend"] = None
    try:
        COMMANDS[command][1](options)
    except (FastGPTError, ValueError, TypeError, OSError) as e:
        if os.environ.get("FASTGPT_DEBUG", "0") not in ("", "0"):
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"fastgpt: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _interrupted(command, options)
        return 130
    return 0
