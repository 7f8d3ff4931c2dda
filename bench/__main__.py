"""`python -m fastgpt.bench ...`: the same as `fastgpt bench ...`."""

from fastgpt.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
