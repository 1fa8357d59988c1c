"""Run a Triton test script under the interpreter on CPU.

TRITON_INTERPRET must be set before `triton` is imported, and the test process has imported it
already, so the script runs in a fresh interpreter and prints `RESULT<json>` as its last result line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def run_interpreted(script: str, timeout: int = 300) -> Any:
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])
