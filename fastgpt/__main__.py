"""`python -m fastgpt ...` (also what `torchrun -m fastgpt train ...` runs)."""

from fastgpt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
