"""The budget is a hard limit: `edgemoe run` under a real memory cgroup equal to --mem.

From "every expert fits" down to the smallest budget the planner accepts:
never OOM-killed, peak inside the cap, more bytes read from flash as the
budget shrinks, and the same tokens at every budget. The model file is
evicted from the page cache before every run, so each starts cold.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from edgemoe.engine import DEMO
from edgemoe.units import Bytes

PROMPTS = ["The function returns a list of", "In the beginning God created", "The database server"]
RUN = [sys.executable, "-m", "edgemoe.cli", "run", "-n", "64", "--ctx", "256", "--json"]
RUN += ["--temperature", "0"]  # greedy: the same tokens at every budget
RUN += [arg for p in PROMPTS for arg in ("-p", p)]  # a batch of three: more experts touched
# the floor is measured anew in every run; a little slack absorbs its jitter
SLACK = Bytes.parse("512KiB")
# library pages touched after the floor is measured, which no term of the plan counts:
# ~9 MiB measured in a warm environment, 44 MiB in the first run of a fresh clone's venv
UNCOUNTED = Bytes.parse("64MiB")


def _run(memory_cap, model, mem, extra=(), env=None):
    cmd = RUN + [str(model), "--mem", str(int(mem)), *extra]
    env = None if env is None else {**os.environ, **env}
    r = memory_cap(cmd, mem, evict=[model], timeout=600, env=env)
    assert not r.oom_killed, f"OOM-killed under {mem}"
    assert r.returncode == 0, r.stderr[-1500:]
    rec = json.loads(r.stdout)
    return r, rec["outputs"], rec["summary"]


@pytest.mark.slow
@pytest.mark.cgroup
def test_capped_runs_from_all_experts_to_the_minimum(memory_cap):
    path = DEMO  # 96 experts of ~300 KB: the cache slots, not the floor's jitter, decide what fits
    _, ref_text, s = _run(memory_cap, path, Bytes.parse("8GiB"))
    plan = s["plan"]
    fixed = plan["minimum"] - plan["largest_expert"]
    budgets = {
        "all experts": Bytes(fixed + plan["all_experts"]) + SLACK,
        "a half": Bytes(fixed + plan["all_experts"] // 2) + SLACK,
        "a third": Bytes(fixed + plan["all_experts"] // 3) + SLACK,
        "minimum": Bytes(plan["minimum"]) + SLACK,
    }
    rows, reads = [], []
    for name, mem in budgets.items():
        r, text, s = _run(memory_cap, path, mem)
        # inside a cgroup equal to --mem the cap itself cannot be passed (the cgroup's peak
        # is at most its limit), so hold the process to its plan instead: its own peak RSS
        # within what the plan counted, less a margin for the library pages the floor is
        # measured before (UNCOUNTED)
        p = s["plan"]
        counted = sum(p[k] for k in ("floor", "resident", "kv_cache", "io_buffers", "workspace"))
        counted += p["expert_cache"]
        assert s["peak_rss"] <= counted + UNCOUNTED, (name, s["peak_rss"], counted)
        # the summary's peak is the cap's own figure (page cache and all), read inside it
        assert s["peak_source"] == "cgroup" and s["peak"] <= r.peak, (s["peak"], r.peak)
        assert text == ref_text, f"{name}: output differs"
        reads.append(s["bytes_read"])
        rows.append(
            f"{name:>11}: budget {mem}, peak {r.peak}, floor {Bytes(s['floor'])}, "
            f"decode {s['decode_tok_s']:.1f} tok/s, hits {100 * s['hit_rate']:.0f}%, "
            f"read {Bytes(s['bytes_read'])}"
        )
    print("\n" + "\n".join(rows))
    assert reads[0] <= reads[1] < reads[2] < reads[3], reads


@pytest.mark.slow
@pytest.mark.cgroup
def test_a_cache_made_at_load_and_a_read_ahead_stay_inside_the_cap(memory_cap, tiny_emoe):
    """The expert cache's slabs made at load and a read ahead in its own slab, inside a
    cgroup equal to --mem: the process within its plan, the same tokens as with every expert
    cached. A tiny model's experts weigh less than the floor's jitter, so --expert-cache
    makes the cache a third of them and EDGEMOE_ARENA=1 makes its slabs at load."""
    path = tiny_emoe("mixtral", experts="int8", dense="int8")  # read in place: slabs
    _, ref_text, s = _run(memory_cap, path, Bytes.parse("8GiB"))
    plan = s["plan"]
    mem = Bytes(plan["minimum"] + plan["all_experts"]) + SLACK
    extra = ["--prefetch", "idle", "--expert-cache", "33%"]
    r, text, s = _run(memory_cap, path, mem, extra, {"EDGEMOE_ARENA": "1"})
    assert s["arena_slabs"] > 0 and s["prefetch"] == "idle" and s["prefetch_issued"] > 0, {
        k: s[k] for k in ("arena_slabs", "prefetch", "prefetch_issued", "expert_slots", "hit_rate")
    }
    p = s["plan"]
    counted = sum(p[k] for k in ("floor", "resident", "kv_cache", "io_buffers", "workspace"))
    assert s["peak_rss"] <= counted + p["expert_cache"] + UNCOUNTED, (s["peak_rss"], counted)
    assert s["peak_source"] == "cgroup" and s["peak"] <= r.peak
    assert text == ref_text


@pytest.mark.cgroup
def test_budget_below_the_minimum_fails_before_loading(memory_cap):
    r = memory_cap(RUN + ["--mem", "150MB"], "2GiB", timeout=300)
    assert (
        r.returncode == 2
        and "smallest budget that works is" in r.stderr
        and "Traceback" not in r.stderr
    )
