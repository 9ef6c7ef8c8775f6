"""Who gets in: the API key, the bounded queue (503, never an out-of-memory crash), /health
while loading or failed, a budget too small at start."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from starlette.testclient import TestClient

import edgemoe
from edgemoe.serve.app import ServeConfig, Server
from edgemoe.serve.loadgen import ServerProcess

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded():
    """One slot, one place in the queue, an API key."""
    args = ["--max-batch", "1", "--max-queue", "1", "--ctx", "1024", "--api-key", KEY]
    with ServerProcess(args) as s:
        yield s
    assert s.returncode == 0, s.stderr


def gauge(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return float(next(x for x in text.splitlines() if x.startswith(name + " ")).split()[-1])


def wait_for(cond, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_api_key_is_required_when_set(guarded):
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(guarded.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(guarded.url + "/api/panel", timeout=30).status_code == 401
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="demo", prompt="The", max_tokens=2).usage
    for open_path in ("/health", "/metrics", "/"):  # probes, scrapers and the page itself
        assert httpx.get(guarded.url + open_path, timeout=30).status_code == 200


def test_a_full_queue_is_refused_with_503(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "In the beginning", "max_tokens": 800, "ignore_eos": True, "stream": True}
    url = guarded.url + "/v1/completions"
    with httpx.stream("POST", url, json=body, headers=auth, timeout=60) as first:
        assert first.status_code == 200
        wait_for(lambda: gauge(guarded.url, "edgemoe_requests_running") == 1)
        with httpx.stream("POST", url, json=body, headers=auth, timeout=60) as second:
            assert second.status_code == 200
            wait_for(lambda: gauge(guarded.url, "edgemoe_requests_waiting") == 1)
            client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(model="demo", prompt="The", max_tokens=2)
            assert e.value.status_code == 503
            assert e.value.body["code"] == "overloaded"
            assert e.value.response.headers["retry-after"] == "1"
    # both clients left: the slot and the queue empty, and the server serves again
    wait_for(lambda: gauge(guarded.url, "edgemoe_requests_running") == 0)
    wait_for(lambda: gauge(guarded.url, "edgemoe_requests_waiting") == 0)
    text = httpx.get(guarded.url + "/metrics", timeout=30).text
    assert 'edgemoe_requests_rejected_total{reason="queue_full"} 1.0' in text
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="demo", prompt="The", max_tokens=2).usage


def test_health_is_503_while_loading_and_after_a_failed_load():
    gate = threading.Event()

    def slow_load():
        gate.wait(60)
        return edgemoe.load(None, None, ctx=128, batch=1)

    srv = Server(ServeConfig(), load=slow_load)
    srv.worker.start()
    try:
        with TestClient(srv.app) as http:
            r = http.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = http.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            gate.set()
            wait_for(lambda: http.get("/health").status_code == 200)
            assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).json()[
                "usage"
            ]
    finally:
        srv.worker.stop()
        srv.worker.model.close()

    def broken():
        raise RuntimeError("the flash card went away")

    srv = Server(ServeConfig(), load=broken)
    srv.worker.start()
    srv.worker._thread.join(30)
    with TestClient(srv.app) as http:
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "flash card" in r.json()["error"]


def test_a_budget_too_small_is_refused_at_start():
    p = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "serve", "--mem", "64MiB", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert "smallest budget that works" in p.stderr and "--mem" in p.stderr
