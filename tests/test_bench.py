"""`edgemoe bench`: its arithmetic on fabricated runs, its argument errors, and one
real capped run of the demo model (no llama.cpp, no big model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.bench import prepare, report
from edgemoe.bench.models import SHAPES, tensor_shapes
from edgemoe.bench.report import OK, REFUSED, Cap, Run
from edgemoe.cli import main
from edgemoe.units import Bytes

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "edgemoe" / "demo" / "demo.emoe"


def _run(system, cap, rep, decode, **kw) -> Run:
    kw.setdefault("prefill_tok_s", 10 * decode if decode else None)
    return Run(system, cap, rep, decode_tok_s=decode, **kw)


# -- caps, lists, schedule ---------------------------------------------------------------


def test_caps_parse_percents_sizes_and_none():
    caps = report.parse_caps("none,100,50%,2GiB,12.5")
    assert [c.label for c in caps] == ["none", "100%", "50%", "2GiB", "12.5%"]
    assert caps[0].bytes(1000) is None
    assert caps[1].bytes(1000) == 1000
    assert caps[2].bytes(2381 << 20) == Bytes((2381 << 20) // 2)
    assert caps[3].bytes(1) == 2 << 30  # absolute sizes ignore the reference file
    assert caps[4].bytes(800) == 100


@pytest.mark.parametrize(
    "text, match",
    [("", "empty item"), ("100,,50", "empty item"), ("0", "percent"), ("2000", "percent"),
     ("50,50%", "twice"), ("lots", "cannot read"), ("none,NONE", "twice")],
)  # fmt: skip
def test_bad_caps_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        report.parse_caps(text)


@pytest.mark.parametrize(
    "text, match", [("1,x", "'x' is not"), ("0", "at least 1"), ("8,-1", "at least 1")]
)
def test_bad_batch_lists_are_named(text, match):
    with pytest.raises(ValueError, match=f"--batch: .*{match}"):
        report.parse_ints(text, "--batch")


def test_schedule_pairs_every_cap_and_alternates_order():
    caps = report.parse_caps("none,50,25")
    plan = report.schedule(["llama.cpp", "edgemoe"], caps, [1], repeats=2)
    assert len(plan) == 6
    assert [p[1].label for p in plan] == ["none", "50%", "25%"] * 2
    firsts = [p[3][0] for p in plan]
    assert firsts == ["llama.cpp", "edgemoe"] * 3  # alternates pair by pair, across repeats too
    for cap in caps:  # each cap: each system first once over two repeats
        assert sorted(p[3][0] for p in plan if p[1] == cap) == ["edgemoe", "llama.cpp"]
    assert all(sorted(p[3]) == ["edgemoe", "llama.cpp"] for p in plan)


# -- medians, pairing, table -------------------------------------------------------------


def test_medians_ignore_failed_runs_and_keep_the_failure_when_all_fail():
    runs = [
        _run(
            "edgemoe", "50%", 0, 4.0, tokens=100, bytes_read=1000, hit_rate=0.5, peak=90, limit=100
        ),
        _run(
            "edgemoe", "50%", 1, 6.0, tokens=100, bytes_read=3000, hit_rate=0.7, peak=95, limit=100
        ),
        _run(
            "edgemoe",
            "50%",
            2,
            100.0,
            tokens=100,
            bytes_read=2000,
            hit_rate=0.6,
            peak=80,
            limit=100,
        ),
        _run("edgemoe", "50%", 3, None, status="timeout", note="timeout (10 s)"),
        _run("llama.cpp", "25%", 0, None, status="oom", note="OOM-killed"),
        _run("llama.cpp", "25%", 1, None, status="oom", note="OOM-killed"),
    ]
    cells = report.summarize(runs)
    c = cells[("50%", 1, "edgemoe")]
    assert (c.runs, c.ok, c.status) == (4, 3, OK)
    assert c.decode == 6.0 and c.read_per_token == 20 and c.hit_rate == 0.6 and c.peak == 90
    assert report._rate(c) == "6.00 (1 of 4 timeout (10 s))"  # a median of 3 says 1 run failed
    bad = cells[("25%", 1, "llama.cpp")]
    assert (bad.ok, bad.status, bad.note, bad.decode) == (0, "oom", "OOM-killed", None)


def test_ratio_is_the_median_of_paired_ratios_not_a_ratio_of_medians():
    # A noisy machine: repeat 1 is slow for both systems; pairing cancels it.
    runs = [
        _run("llama.cpp", "none", 0, 10.0), _run("edgemoe", "none", 0, 12.0),
        _run("llama.cpp", "none", 1, 2.0), _run("edgemoe", "none", 1, 3.0),
        _run("llama.cpp", "none", 2, 10.0), _run("edgemoe", "none", 2, 15.0),
        _run("edgemoe", "none", 3, 1.0),  # its partner failed: not a pair
    ]  # fmt: skip
    assert report.paired_ratio(runs, "edgemoe", "llama.cpp", "none", 1) == pytest.approx(1.5)
    assert report.paired_ratio(runs, "edgemoe", "llama.cpp", "25%", 1) is None


def test_table_rows_show_rates_ratios_refusals_and_peaks():
    caps = report.parse_caps("none,25")
    runs = [
        _run("llama.cpp", "none", 0, 8.0, tokens=10, bytes_read=10 << 20, peak=3 << 30),
        _run(
            "edgemoe", "none", 0, 12.0, tokens=10, bytes_read=20 << 20, hit_rate=0.9, peak=2 << 30
        ),
        _run("llama.cpp", "25%", 0, 1.0, tokens=10, bytes_read=1 << 30, peak=500, limit=1000),
        _run("edgemoe", "25%", 0, None, status=REFUSED, note="refused (needs 700 MiB)", limit=1000),
    ]
    lines = report.table(runs, ["llama.cpp", "edgemoe"], "llama.cpp", caps, [1])
    head = lines[0]
    for col in (
        "llama.cpp decode tok/s",
        "edgemoe decode tok/s",
        "edgemoe / llama.cpp",
        "hit rate (edgemoe)",
    ):
        assert col in head
    assert lines[1].count("---") == head.count("|") - 1
    none_row, cap_row = lines[2], lines[3]
    assert (
        "| none | 8.00 | 12.00 | 1.50x | 80.0 / 120.0 | 1 MiB / 2 MiB | 90% | 3 GiB / 2 GiB |"
        == none_row
    )
    assert "refused (needs 700 MiB)" in cap_row and "| 1.00 |" in cap_row and "50% / -" in cap_row


def test_table_without_baseline_and_with_batches():
    caps = report.parse_caps("none")
    runs = [_run("edgemoe", "none", 0, 5.0, batch=b, tokens=4, bytes_read=4) for b in (1, 8)]
    lines = report.table(runs, ["edgemoe"], None, caps, [1, 8])
    assert (
        lines[0].startswith("| cap | batch | edgemoe decode tok/s |")
        and "/ llama.cpp" not in lines[0]
    )
    assert len(lines) == 4


def test_plot_writes_a_png_or_says_why_not(tmp_path):
    caps = report.parse_caps("none,50")
    runs = [
        _run(s, c, 0, 3.0, tokens=2, bytes_read=2 << 20, hit_rate=0.5)
        for s in ("a", "b")
        for c in ("none", "50%")
    ]
    why = report.plot(runs, ["a", "b"], caps, 1 << 30, tmp_path / "p.png")
    assert why is None and (tmp_path / "p.png").stat().st_size > 1000 or "matplotlib" in why


# -- bench models ------------------------------------------------------------------------


def test_bench_shapes_are_the_reference_sizes():
    ref = SHAPES["mixtral-2b"]
    assert 2.3e9 < ref.params < 2.4e9
    cfg = ref.config()
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_local_experts"]) == (2048, 8, 8)
    assert (cfg["num_experts_per_tok"], cfg["intermediate_size"], cfg["vocab_size"]) == (
        2,
        5632,
        8192,
    )
    fg = SHAPES["mixtral-2b-fg"]
    assert (fg.experts, fg.top_k) == (64, 8) and abs(fg.params / ref.params - 1) < 0.01
    names = [n for n, _ in tensor_shapes(cfg)]
    assert len(names) == len(set(names)) == 2 + 8 * (7 + 8 * 3) + 1


# -- command-line errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "give a MODEL or --make"),
        ([str(DEMO), "--make", "mixtral-tiny"], "give a MODEL or --make"),
        ([str(DEMO), "--caps", "none,0"], "percent"),
        ([str(DEMO), "--batch", "0"], "--batch"),
        ([str(DEMO), "--repeats", "0"], "--repeats"),
        ([str(DEMO), "--systems", "llama.cpp"], "no edgemoe system"),
        ([str(DEMO), "--new-tokens", "1"], "--new-tokens"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(capsys, argv, match):
    assert main(["bench", *argv, "--no-doc"]) == 2
    assert match in capsys.readouterr().err


def test_missing_llama_bench_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setattr(prepare, "CACHE", tmp_path)
    monkeypatch.delenv("EDGEMOE_LLAMA_BENCH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(prepare.LlamaBenchMissing, match="tools/llamacpp_build.sh"):
        prepare.find_llama_bench()
    with pytest.raises(prepare.LlamaBenchMissing, match="not an executable"):
        prepare.find_llama_bench(str(tmp_path / "nope"))


def test_a_emoe_with_a_baseline_needs_its_gguf():
    with pytest.raises(prepare.BenchInputError, match="--gguf"):
        prepare.prepare(DEMO, baseline=True)
    with pytest.raises(prepare.BenchInputError, match="not a model folder"):
        prepare.prepare(REPO / "README.md", baseline=False)


# -- one real run ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cgroup
def test_bench_runs_the_demo_model_inside_a_cgroup(memory_cap, tmp_path):
    out = tmp_path / "runs.json"
    cmd = [sys.executable, "-m", "edgemoe.cli", "bench", str(DEMO), "--baseline", "none"]
    cmd += ["--caps", "none", "--repeats", "1", "--prompt-tokens", "16", "--new-tokens", "8"]
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n")
    cmd += ["--doc", str(doc), "--no-drop-caches", "--json", str(out)]
    cmd += ["--bits", "fixed:1", "--lever-emoe", str(DEMO)]  # a D²MoE lever system beside
    cmd += ["--traces", str(tmp_path / "traces")]
    cmd += ["--bound", "rpi5-8gb-sd"]  # its rates measured again before and after each run
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    record = json.loads(out.read_text())
    (run,) = [r for r in record["runs"] if r["system"] == "edgemoe"]
    assert run["status"] == OK, run["extra"].get("stderr", run["note"])
    assert run["decode_tok_s"] > 0 and run["peak"] > 0
    assert 1 <= run["prompt_tokens"] <= 16 and run["new_tokens"] >= 1
    assert "| none |" in p.stdout
    # its bound on the means of the rates measured before and after it
    from edgemoe.bound import rerated

    x = run["extra"]
    before, after = x["bound_rates"], x["bound_rates_after"]
    keys = ("memory_bandwidth", "flash_rand_read", "flash_seq_read")
    mean = {k: (before[k] + after[k]) / 2 for k in keys}
    assert x["bound_tok_s_before"] > 0 and x["bound_tok_s"] > 0
    assert x["bound_tok_s"] == pytest.approx(
        rerated(
            x["bound_memory_bytes_per_step"], x["bound_flash_bytes_per_step"],
            read_bytes=x["largest_expert"], **mean,
        ),
        rel=1e-9,
    )  # fmt: skip
    (lever,) = [r for r in record["runs"] if r["system"] == "edgemoe+fixed:1"]
    assert lever["status"] == OK and lever["extra"]["bits_policy"] == "fixed:1"
    assert lever["extra"]["average_bits"] > 0
    # one traced run of each edgemoe system at the cap, kept and summed up
    traces = record["traces"]
    assert set(traces) == {f"{name} at none" for name in record["systems"]}, traces
    assert {"edgemoe at none", "edgemoe+fixed:1 at none"} <= set(traces)
    for t in traces.values():
        assert Path(t["file"]).parent == tmp_path / "traces" and Path(t["file"]).is_file()
        assert t["decode_steps"] >= 1 and t["ms_per_step"] > 0 and 0 <= t["disk_busy"] <= 1
    text = doc.read_text()  # the section, with the traces summed up
    assert "<!-- bench-demo:start -->" in text and "Where decode time goes" in text
    assert "edgemoe+fixed:1 at none" in text.split("Where decode time goes")[1]


def test_cap_sizes_for_the_reference_measurement():
    caps = report.parse_caps("none,100,50,25")
    q8 = 2381 << 20
    assert [c.bytes(q8) for c in caps] == [None, q8, q8 // 2, q8 // 4]
    assert Cap("x", size=Bytes(5)).bytes(q8) == 5


@pytest.mark.slow
@pytest.mark.cgroup
@pytest.mark.llamacpp
def test_bench_against_llama_cpp_on_a_tiny_made_model(memory_cap, tmp_path):
    bench = os.environ.get("EDGEMOE_LLAMA_BENCH")
    if not bench:
        pytest.skip(
            "set EDGEMOE_LLAMA_BENCH to llama-bench (tools/llamacpp_build.sh CACHE_DIR prints it)"
        )
    from edgemoe.bench.models import make_model

    try:
        convert = str(prepare.find_llama_convert())
    except prepare.LlamaConverterMissing as e:
        pytest.skip(str(e))
    hf = make_model("mixtral-tiny", tmp_path / "mixtral-tiny")
    out = tmp_path / "runs.json"
    cmd = [sys.executable, "-m", "edgemoe.cli", "bench", str(hf), "--caps", "none,1GiB"]
    cmd += ["--repeats", "1", "--prompt-tokens", "16", "--new-tokens", "8", "--no-doc"]
    cmd += [
        "--no-drop-caches",
        "--json",
        str(out),
        "--llama-bench",
        bench,
        "--llama-convert",
        convert,
    ]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", EDGEMOE_CACHE=str(tmp_path / "cache"))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert {r["system"] for r in runs} >= {"llama.cpp", "edgemoe"}
    for r in runs:
        assert r["status"] == OK, r["extra"].get("stderr", r["note"])
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
    assert "edgemoe / llama.cpp" in p.stdout


def test_the_doc_shows_the_command_less_its_output_paths():
    from edgemoe.bench.cli import _measured_args

    args = [
        "--make",
        "mixtral-2b",
        "--json",
        "r.json",
        "--doc=/x.md",
        "--plot",
        "p.png",
        "--caps",
        "none,50",
    ]
    assert _measured_args(args) == ["--make", "mixtral-2b", "--caps", "none,50"]


def test_from_json_redoes_the_table_without_running(tmp_path, capsys):
    runs = [
        _run("edgemoe", "none", r, 5.0 + r, tokens=10, bytes_read=100).to_dict() for r in range(3)
    ]
    saved = tmp_path / "runs.json"
    saved.write_text(json.dumps({"systems": ["edgemoe"], "runs": runs, "date": 0}))
    argv = ["bench", str(DEMO), "--baseline", "none", "--caps", "none", "--no-doc"]
    assert main([*argv, "--from-json", str(saved)]) == 0
    assert "| none | 6.00 |" in capsys.readouterr().out  # the median of 5, 6, 7


def test_fresh_bound_remeasures_the_rates_and_keeps_the_rest(tmp_path):
    from devices.profile import load_profile
    from edgemoe.bench.runners import fresh_bound

    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(8 << 20))
    out = tmp_path / "now.profile"
    rates = fresh_bound("rpi5-8gb-sd", model, out)
    base, now = load_profile("rpi5-8gb-sd"), load_profile(out)
    assert set(rates) == {"memory_bandwidth", "flash_seq_read", "flash_rand_read", "flash_seq_32m"}
    assert rates["flash_seq_read"] == rates["flash_seq_32m"]  # not a .emoe: no expert's span
    for key, value in rates.items():  # this machine's, not the Pi's
        assert value > 0
        if key != "flash_seq_32m":
            assert int(getattr(now, key)) == value
    assert int(now.flash_seq_read) != int(base.flash_seq_read)
    assert (now.name, now.memory, now.cores, now.compute_factor) == (
        base.name,
        base.memory,
        base.cores,
        base.compute_factor,
    )


def test_large_reads_are_timed_over_the_whole_file(tmp_path):
    """The bound's rate for an expert's read: reads of its size at random places over the
    whole file (at least two), refused for a file smaller than one read."""
    from devices.profiler import large_read_rate

    f = tmp_path / "model.bin"
    f.write_bytes(os.urandom(12 << 20))
    assert large_read_rate(f, 5 << 20, seconds=0.05) > 0
    with pytest.raises(ValueError, match="fewer than one read"):
        large_read_rate(f, 16 << 20)
