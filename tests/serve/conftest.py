"""A real `edgemoe serve` subprocess on 127.0.0.1 per test module that asks for one."""

from __future__ import annotations

import openai
import pytest

from edgemoe.serve.loadgen import ServerProcess


@pytest.fixture(scope="module")
def server():
    """The demo served on a free loopback port, batch 4, a third of its experts cached
    (so requests page experts from flash)."""
    with ServerProcess(["--max-batch", "4", "--ctx", "1024", "--expert-cache", "33%"]) as s:
        yield s
    assert s.returncode == 0, s.stderr
    assert "edgemoe serve: stopped:" in s.stderr


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
