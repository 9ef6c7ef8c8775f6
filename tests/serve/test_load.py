"""16 concurrent streaming clients, 30 requests of mixed lengths, the server inside a real memory
cgroup equal to its --mem: no request fails, nothing is OOM-killed, the peak stays under the cap.

The 200-request version, with continuous against static batching and prefix reuse, is
`python tools/serve_load.py` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import pytest

from edgemoe.serve.loadgen import ServerProcess, mixed_requests, run_load, summarize

CAP = "448MiB"


@pytest.mark.slow
@pytest.mark.cgroup
def test_sixteen_clients_inside_the_budget(memory_cap):  # memory_cap: skip/fail without cgroups
    args = ["--mem", CAP, "--ctx", "512", "--max-batch", "8", "--max-queue", "32"]
    with ServerProcess(args, cap=CAP) as srv:
        results, wall = run_load(srv.url, mixed_requests(30, ctx=512), clients=16, timeout=600)
    s = summarize(results, wall)
    print(s, srv.cap)
    assert s["failed"] == 0, s["errors"]
    assert s["tokens"] == sum(b["max_tokens"] for b in mixed_requests(30, ctx=512))
    assert srv.cap is not None and not srv.cap.oom_killed
    assert srv.cap.peak <= srv.cap.limit
    assert srv.returncode == 0, srv.stderr
    assert "30 requests" in srv.stderr  # the shutdown summary counted them all
