"""Load on loopback: a served model under a memory cap, many streaming clients, the figures.

    with ServerProcess(["--mem", "448MiB", "--max-batch", "8"], cap="448MiB") as srv:
        results, wall = run_load(srv.url, mixed_requests(200), clients=16)
    print(summarize(results, wall), srv.cap)   # p50/p99 TTFT, tokens/s; peak, OOM kills

ServerProcess starts `edgemoe serve` in a fresh process, inside a real memory
cgroup equal to the cap when one is given (edgemoe.memcap), waits for /health,
and stops it with SIGTERM on exit; its CapResult then holds the cgroup's peak
and OOM kills. Clients stream (TTFT is the first token's arrival at the client)
and count tokens from the server's usage chunk. Bounded in count and time, and
only ever 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import psutil

from edgemoe import memcap

HOST = "127.0.0.1"

# Text of the kinds the demo model was trained on (Python, PostgreSQL and Linux docs, the KJV).
SENTENCES = (
    "The function returns a new list containing the items of the iterable.",
    "In the beginning God created the heaven and the earth.",
    "The server process accepts connections on the configured port.",
    "A table can have at most one primary key, which may consist of several columns.",
    "The kernel driver exposes a character device for each controller it finds.",
    "If the argument is omitted, the default value is used instead.",
    "And the LORD spake unto Moses, saying, Speak unto the children of Israel.",
    "The module provides functions for working with dates and times.",
    "Each query is planned before it is executed, and the plan is cached.",
    "The interrupt handler must not sleep, since it runs in atomic context.",
)


def prompt_of(words: int, rng: random.Random) -> str:
    """Text of about `words` words drawn from SENTENCES."""
    out: list[str] = []
    while len(out) < words:
        out += rng.choice(SENTENCES).split()
    return " ".join(out[:words])


def mixed_requests(n: int, seed: int = 0, ctx: int = 512) -> list[dict]:
    """n /v1/completions bodies of mixed prompt and reply lengths (greedy, streaming), each
    within ctx: short prompts with short replies up to long prompts with long replies."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(n):
        words = rng.choice((4, 8, 16, 48, 120, 240))
        max_tokens = rng.choice((8, 16, 32, 64, 128))
        max_tokens = min(max_tokens, ctx - 2 * words - 8)  # ~1.5 tokens a word here, with room
        bodies.append(
            {
                "prompt": prompt_of(words, rng),
                "max_tokens": max(1, max_tokens),
                "temperature": 0,
                "ignore_eos": True,  # every request its full length: the same work each run
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return bodies


@dataclass(frozen=True)
class Result:
    ok: bool
    status: int
    ttft_s: float | None
    latency_s: float
    prompt_tokens: int = 0
    tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


async def one(
    client: httpx.AsyncClient, url: str, body: dict, path: str, text: list | None = None
) -> Result:
    """One streaming request; TTFT is the first chunk that carries text (appended to `text`)."""
    t0 = time.perf_counter()
    ttft, use = None, None
    try:
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return Result(False, r.status_code, None, time.perf_counter() - t0, error=text)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(
                        False, 200, ttft, time.perf_counter() - t0, error=str(chunk["error"])
                    )
                for c in chunk.get("choices") or ():
                    piece = c.get("text") or (c.get("delta") or {}).get("content")
                    if ttft is None and (piece or c.get("finish_reason")):
                        ttft = time.perf_counter() - t0
                    if piece and text is not None:
                        text.append(piece)
                use = chunk.get("usage") or use
    except httpx.HTTPError as e:
        return Result(False, 0, ttft, time.perf_counter() - t0, error=repr(e))
    if use is None:
        return Result(False, 200, ttft, time.perf_counter() - t0, error="no usage chunk")
    cached = (use.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Result(
        True,
        200,
        ttft,
        time.perf_counter() - t0,
        use["prompt_tokens"],
        use["completion_tokens"],
        cached,
    )


def run_load(
    url: str,
    bodies: list[dict],
    clients: int,
    path: str = "/v1/completions",
    timeout: float = 600,
) -> tuple[list[Result], float]:
    """Send bodies from `clients` concurrent clients (each sends its next when its last is
    done); the results in order and the wall time."""

    async def main():
        todo = iter(enumerate(bodies))
        out: list[Result | None] = [None] * len(bodies)
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

            async def worker():
                for i, body in todo:
                    out[i] = await one(client, url, body, path)

            t0 = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout)
            return out, time.perf_counter() - t0

    return asyncio.run(main())


def converse(
    url: str, conversations: int, turns: int, max_tokens: int = 32, seed: int = 0
) -> list[list[Result]]:
    """Chats of `turns` turns each, turn by turn in rotation (one request at a time, so TTFT
    is the prefill's own): results[conversation][turn]. Each turn's user message is ~40
    words, each reply at most max_tokens long (greedy)."""
    rng = random.Random(seed)
    chats = [[] for _ in range(conversations)]
    out: list[list[Result]] = [[] for _ in range(conversations)]

    async def main():
        async with httpx.AsyncClient(timeout=600) as client:
            for _ in range(turns):
                for i, msgs in enumerate(chats):
                    msgs.append({"role": "user", "content": prompt_of(40, rng)})
                    body = {
                        "messages": msgs,
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "stream": True,
                    }
                    reply: list[str] = []
                    r = await one(client, url, body, "/v1/chat/completions", reply)
                    out[i].append(r)
                    msgs.append({"role": "assistant", "content": "".join(reply)})

    asyncio.run(main())
    return out


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({f"{r.status}: {r.error[:120]}" for r in results if not r.ok}),
        "tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "latency_p50_s": percentile([r.latency_s for r in ok], 0.5),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`edgemoe serve ARGS` on a free loopback port, capped at `cap` if given.

    Attributes (after exit): cap: the CapResult (peak, OOM kills) of a capped run;
    returncode; stderr.
    """

    def __init__(self, args: list[str], cap=None, ready_timeout: float = 180, env=None):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.cmd = [
            sys.executable,
            "-m",
            "edgemoe.cli",
            "serve",
            *args,
            "--host",
            HOST,
            "--port",
            str(self.port),
        ]
        self.cap_limit, self.ready_timeout = cap, ready_timeout
        self.env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
        self.cap: memcap.CapResult | None = None
        self.returncode: int | None = None
        self.stderr = ""
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> ServerProcess:
        if self.cap_limit is None:
            self._proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        else:
            self._thread = threading.Thread(target=self._capped, daemon=True)
            self._thread.start()
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _capped(self) -> None:
        try:
            self.cap = memcap.run_capped(self.cmd, self.cap_limit, env=self.env, timeout=3600)
        except BaseException as e:  # noqa: BLE001 (reported by __exit__)
            self._error = e

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._exited():
                raise RuntimeError(f"edgemoe serve exited before it was ready: {self._tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"edgemoe serve not ready after {self.ready_timeout} s")

    def _exited(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is not None
        return self._thread is not None and not self._thread.is_alive()

    def _tail(self) -> str:
        if self._proc is not None and self._proc.poll() is not None:
            return self._proc.stderr.read()[-2000:]
        return (self.cap.stderr[-2000:] if self.cap else "") or repr(self._error)

    def pid(self) -> int | None:
        """The server's pid (under a cap it is a grandchild: the cgroup wrapper exec'd it)."""
        if self._proc is not None:
            return self._proc.pid
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "serve" in cmd and str(self.port) in cmd:
                return p.pid
        return None

    def __exit__(self, *exc) -> None:
        pid = self.pid()
        if pid is not None and not self._exited():
            os.kill(pid, signal.SIGTERM)
        if self._proc is not None:
            try:
                _, err = self._proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                _, err = self._proc.communicate()
            self.returncode, self.stderr = self._proc.returncode, err
        elif self._thread is not None:
            self._thread.join(120)
            if self.cap is not None:
                self.returncode, self.stderr = self.cap.returncode, self.cap.stderr
