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


@pytest.fixture(scope="session")
def tiny_emoe(tmp_path_factory):
    """tiny_emoe(family, experts="f32", dense="f32") -> .emoe of a tiny model with a BPE tokenizer (cached)."""
    from formats.convert import ConvertOptions, convert, open_source
    from tests.formats.gguf_fixtures import train_tiny_bpe_tokenizer

    folders: dict = {}
    files: dict = {}

    def get(family: str, experts: str = "f32", dense: str = "f32") -> Path:
        if family not in folders:
            d = tmp_path_factory.mktemp(f"tok-{family}")
            train_tiny_bpe_tokenizer(d, 384)
            folders[family] = make_tiny_hf(family, d, vocab_size=384)
        key = (family, experts, dense)
        if key not in files:
            out = tmp_path_factory.mktemp("emoe") / f"{family}.emoe"
            with open_source(folders[family]) as src:
                convert(src, out, ConvertOptions(dense=dense, experts=experts, progress=False))
            files[key] = out
        return files[key]

    return get


@pytest.fixture
def emulated_device():
    """emulated_device("rpi5-8gb-sd") -> the profile and the arguments that emulate it.

    Returns an object with .profile (DeviceProfile), .load_kwargs (for
    edgemoe.load) and .cli_args (for `edgemoe run`), to use beside memory_cap.
    """
    from types import SimpleNamespace

    from devices.profile import load_profile

    def get(name: str):
        p = load_profile(name)
        return SimpleNamespace(profile=p, load_kwargs={"device": name}, cli_args=["--device", name])

    return get
