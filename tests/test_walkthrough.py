"""docs/walkthrough.md runs as written: every ```python block, in order, in one namespace.

The blocks run in a fresh interpreter with TRITON_INTERPRET=1 (the first block sets it too), as a
reader on a CPU runs them, so this process's own Triton set-up cannot leak in. Any exception or
failed assert in a block fails the test and names the block.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import fastgpt
from fastgpt.attention import triton_importable

WALKTHROUGH = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)

# Executes the blocks given as a JSON list on stdin; prints the backends step 9 checked.
RUNNER = """
import json, sys
blocks = json.load(sys.stdin)
namespace = {"__name__": "__walkthrough__"}
for number, source in enumerate(blocks, 1):
    print(f"--- block {number} of {len(blocks)}", flush=True)
    exec(compile(source, f"walkthrough.md block {number}", "exec"), namespace)
print("KERNEL_BACKENDS=" + json.dumps(namespace.get("kernel_backends")))
"""


def python_blocks(text: str) -> list[str]:
    """The source of every ```python fenced block of a markdown text, in order."""
    return BLOCK.findall(text)


def run_blocks(blocks: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_blocks_are_found():
    blocks = python_blocks(WALKTHROUGH.read_text())
    assert len(blocks) >= 10
    assert "TRITON_INTERPRET" in blocks[0]
    markdown = "```python\na = 1\n```\ntext\n```bash\nls\n```\n```python\nb = a\n```\n"
    assert python_blocks(markdown) == ["a = 1\n", "b = a\n"]


def test_runner_shares_one_namespace_and_fails_on_a_failed_assert():
    assert run_blocks(["a = 1\n", "assert a == 1\n"]).returncode == 0
    failed = run_blocks(["a = 1\n", "assert a == 2\n"])
    assert failed.returncode != 0 and "block 2" in failed.stderr


def test_walkthrough_runs_in_order():
    result = run_blocks(python_blocks(WALKTHROUGH.read_text()))
    assert result.returncode == 0, f"walkthrough failed:\n{result.stdout}\n{result.stderr}"
    ran = json.loads(result.stdout.rsplit("KERNEL_BACKENDS=", 1)[1])
    # Step 9 checked every compiled backend that can run on CPU tensors here.
    assert ("cpp" in ran) == ("cpp" in fastgpt.available_backends("cpu"))
    assert ("triton" in ran) == triton_importable()
