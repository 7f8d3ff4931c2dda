"""Attention kernel benchmark: the same as `fastgpt bench` (see bench/cli.py or --help).

python bench/attention.py              # GPU: flash-attn's configuration, bf16 and fp16
python bench/attention.py --tiny       # CPU smoke run
"""

import sys

from fastgpt.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
