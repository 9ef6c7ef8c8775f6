"""The README's Python example runs as written, on the bundled demo model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_api_example_runs():
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin"},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "prefill" in p.stdout and "decode" in p.stdout  # the summary line
    assert "stop" in p.stdout or "length" in p.stdout  # a finish reason
