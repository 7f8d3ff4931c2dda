"""Environment switches read one way everywhere: env_flag("TRITON_INTERPRET") -> bool, and
env_choice(name, choices, default) -> str for a switch with named values.

A flag is on when its value is one of 1, true, yes, on, y (any case, spaces ignored): the rule
Triton itself applies to TRITON_INTERPRET, so fastgpt and Triton never disagree about a switch.
Unset, empty, 0, false, no, off and anything else mean off.
"""

import os

TRUE_VALUES = ("1", "true", "yes", "on", "y")


def env_flag(name: str) -> bool:
    """True when the environment variable `name` is set to a true value (see the module doc)."""
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of `name` (case and spaces ignored) among `choices`; `default` when unset or empty.

    Raises ValueError for any other value, naming the variable and the choices."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}.")
    return value
