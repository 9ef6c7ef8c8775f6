"""Nodes files: good ones parse, every bad one is one named line; `edgemoe cluster plan`."""

from __future__ import annotations

import json

import pytest

from cluster.nodes import capacity, parse_nodes
from cluster.types import LINKS, BadNodesFile, BudgetBelowFloor, ModelShape
from edgemoe.cli import main
from edgemoe.units import Bytes

GOOD = """
[[node]]
name = "orin"
profile = "jetson-orin-nano-8gb"
budget = "1GiB"
link = "wifi"

[[node]]
name = "pi"
profile = "rpi5-8gb-nvme"
rtt_ms = 2
mbit_s = 300
paging = false
"""


def test_good_file():
    a, b = parse_nodes(GOOD)
    assert a.name == "orin" and a.budget == Bytes.parse("1GiB") and a.link == LINKS["wifi"]
    assert b.budget == Bytes.parse("7GiB")  # the profile's usable memory
    assert b.link.rtt_s == 0.002 and b.link.bandwidth == Bytes(37_500_000) and not b.paging
    assert a.resource == "edgemoe_host_orin"


@pytest.mark.parametrize(
    "text, match",
    [
        ("[[node]\n", "not valid TOML"),
        ("", "no \\[\\[node\\]\\] tables"),
        ('[x]\na = 1\n[[node]]\nname="a"\nprofile="devbox"\n', "unknown table"),
        ('[[node]]\nname="a b"\nprofile="devbox"\n', "key 'name'"),
        (
            '[[node]]\nname="a"\nprofile="nosuch"\n',
            "key 'profile': no device profile named 'nosuch'",
        ),
        ('[[node]]\nname="a"\n', "key 'profile': missing"),
        ('[[node]]\nname="a"\nprofile="devbox"\nbudget="lots"\n', "key 'budget'"),
        ('[[node]]\nname="a"\nprofile="devbox"\nbudget="1TB"\n', "exceeds"),
        ('[[node]]\nname="a"\nprofile="devbox"\nram=1\n', "unknown key"),
        ('[[node]]\nname="a"\nprofile="devbox"\nlink="modem"\n', "key 'link'"),
        ('[[node]]\nname="a"\nprofile="devbox"\nrtt_ms=-1\n', "key 'rtt_ms'"),
        ('[[node]]\nname="a"\nprofile="devbox"\nlink="wifi"\nrtt_ms=1\n', "not both"),
        ('[[node]]\nname="a"\nprofile="devbox"\n[[node]]\nname="a"\nprofile="devbox"\n', "twice"),
        ('[[node]]\nname="a"\nprofile="devbox"\npaging="yes"\n', "key 'paging'"),
    ],
)
def test_bad_files_are_named(text, match):
    with pytest.raises(BadNodesFile, match=match):
        parse_nodes(text, "n.toml")


def test_budget_below_floor():
    (spec,) = parse_nodes('[[node]]\nname="tiny"\nprofile="devbox"\nbudget="300MiB"\n')
    shape = ModelShape((1,), 8, 2, (Bytes.parse("1MiB"),))
    with pytest.raises(BudgetBelowFloor, match="node 'tiny'.*smallest budget is"):
        capacity(spec, shape)


def test_cli_plan(tmp_path, capsys):
    f = tmp_path / "nodes.toml"
    f.write_text(GOOD.replace('budget = "1GiB"', 'budget = "400MiB"'))
    assert main(["cluster", "plan", "--nodes", str(f), "--spare", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in out["nodes"]] == ["orin", "pi"]
    assert len(out["map"]["replicas"]) == 64  # the demo: 4 layers x 16 experts
    assert sum(len(v) for v in out["map"]["replicas"].values()) == 66
    assert main(["cluster", "plan", "--nodes", str(f)]) == 0
    assert "layer   0:" in capsys.readouterr().out


def test_cli_plan_bad_input_one_line(tmp_path, capsys):
    f = tmp_path / "nodes.toml"
    f.write_text('[[node]]\nname="a"\nprofile="nosuch"\n')
    assert main(["cluster", "plan", "--nodes", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no device profile named 'nosuch'" in err
    f.write_text('[[node]]\nname="a"\nprofile="devbox"\nbudget="340MiB"\n')
    assert main(["cluster", "plan", "--nodes", str(f)]) == 2
    assert "smallest budget is" in capsys.readouterr().err
