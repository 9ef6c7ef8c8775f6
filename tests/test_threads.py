"""edgemoe sets its OpenMP wait policy before torch starts its threads, unless the user did."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import edgemoe, torch, os; print(os.environ.get('OMP_WAIT_POLICY'))"


def _probe(env):
    p = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_passive_wait_policy_by_default_and_the_users_choice_kept():
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _probe(base) == "PASSIVE"
    assert _probe(base | {"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
