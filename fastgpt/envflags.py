"""Environment switches read one way everywhere: env_flag("TRITON_INTERPRET") -> bool.

A flag is on when its value is one of 1, true, yes, on, y (any case, spaces ignored): the rule
Triton itself applies to TRITON_INTERPRET, so fastgpt and Triton never disagree about a switch.
Unset, empty, 0, false, no, off and anything else mean off.
"""

import os

TRUE_VALUES = ("1", "true", "yes", "on", "y")


def env_flag(name: str) -> bool:
    """True when the environment variable `name` is set to a true value (see the module doc)."""
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES
