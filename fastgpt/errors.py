"""fastgpt's own error type: a problem with the user's input, files or machine, not a bug.

The `fastgpt` command prints such an error as one line `fastgpt: error: ...` and exits with 2;
anything else is a bug and keeps its traceback. It is a ValueError, so code that already catches
ValueError for bad input keeps working.
"""


class FastGPTError(ValueError):
    """Bad input, a bad file or an unusable machine, said in one sentence naming what and where."""
