"""The `fastgpt` command: train, sample, tokenize, bench.

    fastgpt train                      # tiny GPT, embedded corpus, best device; prints a sample
    fastgpt sample --ckpt out --prompt "mary had a"
    fastgpt train --task seq2seq       # encoder-decoder: rhyme lines -> reversed
    fastgpt sample --ckpt out --prompt "mary had a little lamb"   # translates (seq2seq ckpt)
    fastgpt tokenize --data embedded:poem --vocab-size 300   # tokenizers: vocabulary vs length
    fastgpt bench ...                  # kernel benchmarks (fastgpt.bench)

Bad input ends with one line `fastgpt: error: ...` and exit status 2; FASTGPT_DEBUG=1 shows the
traceback instead.
"""

import argparse
import os
import sys

from fastgpt.tokenizer import KINDS
from fastgpt.train import PRESET_TRAINING, TrainConfig


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgpt", description="Train and sample GPTs on fastgpt's attention kernels."
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,sample,tokenize,bench}"
    )

    t = sub.add_parser("train", help="train a GPT (no arguments: tiny preset, embedded corpus)")
    t.add_argument("--task", choices=["lm", "seq2seq"], default="lm", help="seq2seq: translation")
    t.add_argument("--data", help="UTF-8 text file or folder of .txt files (default: embedded)")
    t.add_argument("--tokenizer", choices=KINDS, help="default: the preset's")
    t.add_argument(
        "--bpe-vocab-size", type=_positive_int, help="subword vocabulary: 50257 (gpt2), else 1024"
    )
    t.add_argument("--preset", choices=list(PRESET_TRAINING), default="tiny")
    t.add_argument("--steps", type=_positive_int)
    t.add_argument("--batch-size", type=_positive_int, help="sequences per process per micro-step")
    t.add_argument("--block-size", type=_positive_int, help="context length in tokens")
    t.add_argument("--dropout", type=float, help="dropout probability (default: the preset's)")
    t.add_argument("--lr", type=float, help="peak learning rate (warm-up, then cosine to lr/10)")
    t.add_argument("--warmup", type=int, help="warm-up steps")
    t.add_argument("--device", help="cuda, mps, cpu (default: the best available)")
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="autocast dtype")
    t.add_argument("--backend", choices=["auto", "triton", "cpp", "reference"])
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--grad-accum", type=_positive_int, default=1)
    t.add_argument("--eval-every", type=_positive_int, help="steps between validation/checkpoints")
    t.add_argument("--out", default="out", help="output folder (default: out)")
    t.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--sample-tokens", type=int, default=40, help="tokens sampled at the end")

    s = sub.add_parser("sample", help="sample text from a trained checkpoint")
    s.add_argument("--ckpt", default="out", help="training output folder or checkpoint folder")
    s.add_argument("--prompt", default="", help="text to continue (default: a new line)")
    s.add_argument("--task", choices=["lm", "seq2seq"], help="default: the checkpoint's")
    s.add_argument("--tokens", type=int, default=40)
    s.add_argument("--temperature", type=float, help="0 = greedy (default: 1; seq2seq: 0)")
    s.add_argument("--top-k", type=_positive_int)
    s.add_argument("--seed", type=int)
    s.add_argument("--device", help="cuda, mps, cpu (default: the best available)")
    s.add_argument("--backend", choices=["auto", "triton", "cpp", "reference"])

    k = sub.add_parser("tokenize", help="train tokenizers on a text; vocabulary vs length")
    k.add_argument("--data", help="UTF-8 text file or folder, or embedded:poem (default: rhyme)")
    k.add_argument("--tokenizer", choices=["all", *KINDS], default="all")
    k.add_argument(
        "--vocab-size", type=_positive_int, default=1024, help="for bpe, wordpiece, unigram"
    )

    sub.add_parser("bench", help="attention benchmarks (fastgpt bench --help)", add_help=False)
    return parser


def _train(options: dict) -> None:
    from fastgpt.train import train

    if options.pop("task") == "seq2seq":
        from fastgpt.translation import train_from_options

        return train_from_options(options)
    train(TrainConfig(**options))


def _sample(options: dict) -> None:
    from fastgpt.sample import sample
    from fastgpt.translation import is_translation_checkpoint, sample_from_options

    task = options.pop("task")
    if task is None:  # the checkpoint's own
        task = "seq2seq" if is_translation_checkpoint(options["ckpt"]) else "lm"
    if options["temperature"] is None:  # a translation is decoded greedily, text sampled
        options["temperature"] = 0.0 if task == "seq2seq" else 1.0
    print(sample_from_options(options) if task == "seq2seq" else sample(**options))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # the benchmark parses its own arguments
        from fastgpt.bench import main as bench_main

        return bench_main(argv[1:]) or 0
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    command = options.pop("command")
    if options.get("backend") == "auto":
        options["backend"] = None
    try:
        if command == "tokenize":
            from fastgpt.tokenizer import tokenize_report

            print(tokenize_report(**options))
        else:
            _train(options) if command == "train" else _sample(options)
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("FASTGPT_DEBUG", "0") not in ("", "0"):
            raise
        print(f"fastgpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if command == "train":
            out = options["out"]
            print(
                f"\nfastgpt: interrupted; `fastgpt train --resume --out {out}` continues from the "
                "last checkpoint.",
                file=sys.stderr,
            )
        return 130
    return 0
