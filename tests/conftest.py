"""Shared fixtures: tiny models per family (built once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factories import FAMILIES, make_tiny_hf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """tiny_hf(family, **overrides) -> folder of a saved seeded tiny model (cached)."""
    cache: dict = {}

    def get(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"hf-{family}")
            cache[key] = make_tiny_hf(family, d, **overrides)
        return cache[key]

    return get


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def memory_cap():
    """run(cmd, limit, **kw) -> CapResult: the command inside a real memory cgroup.

    Skips, saying why, only where no memory cgroup is writable; under CI=true
    that is a failure instead, so CI can never pass by skipping the proof.
    """
    import os

    from edgemoe import memcap

    why = memcap.available()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"memory-cap tests must run in CI: {why}")
        pytest.skip(why)
    return memcap.run_capped
