"""Shipped device profiles parse and are sane; malformed ones fail with a named error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.profile import (
    PROFILE_DIR,
    DeviceProfile,
    MalformedProfile,
    UnknownDevice,
    known_devices,
    load_profile,
    parse_profile,
)
from edgemoe.units import Bytes
from formats.errors import EmoeError

SHIPPED = [
    "devbox",
    "jetson-agx-orin-64gb",
    "jetson-orin-nano-8gb",
    "laptop-8gb",
    "rpi5-8gb-nvme",
    "rpi5-8gb-sd",
    "snapdragon-8gen3-phone",
]

GOOD = """\
# a valid profile
name = Test board
memory = 8GiB
os_reserve = 1GiB
memory_bandwidth = 68GB
flash_seq_read = 2GB
flash_rand_read = 1GB
cores = 4
compute_factor = 0.5
"""


def test_known_devices_lists_all_seven(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no user profiles (`edgemoe profile`)
    assert known_devices() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_is_sane(name):
    p = load_profile(name)
    assert isinstance(p, DeviceProfile)
    for size in (p.memory, p.os_reserve, p.memory_bandwidth, p.flash_seq_read, p.flash_rand_read):
        assert isinstance(size, Bytes)
    assert p.memory > p.os_reserve > 0
    assert p.usable_memory == p.memory - p.os_reserve
    assert isinstance(p.usable_memory, Bytes)
    assert p.memory >= Bytes.parse("1GiB")
    assert p.flash_seq_read >= p.flash_rand_read > 0
    # DRAM is always faster than flash, by a wide margin
    assert p.memory_bandwidth > 2 * p.flash_seq_read
    assert isinstance(p.cores, int) and 1 <= p.cores <= 256
    assert isinstance(p.compute_factor, float) and 0.01 <= p.compute_factor <= 100


@pytest.mark.parametrize("name", SHIPPED)
def test_every_value_line_cites_a_source(name):
    lines = (PROFILE_DIR / f"{name}.profile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line.split("#", 1)[0]:
            above = lines[i - 1] if i else ""
            assert "#" in line or above.lstrip().startswith("#"), line


def test_devbox_is_the_reference():
    assert load_profile("devbox").compute_factor == 1.0


def test_load_by_path(tmp_path):
    f = tmp_path / "board.profile"
    f.write_text(GOOD)
    p = load_profile(f)
    assert p.name == "Test board"
    assert p.usable_memory == Bytes.parse("7GiB")
    assert load_profile(str(f)) == p


def test_unknown_device_lists_known_names():
    with pytest.raises(UnknownDevice) as e:
        load_profile("pdp-11")
    assert isinstance(e.value, EmoeError)
    for name in SHIPPED:
        assert name in str(e.value)


def _replace(key: str, line: str) -> str:
    return "\n".join(line if ln.startswith(f"{key} ") else ln for ln in GOOD.splitlines())


# file name -> (text, line number or None, key or None, words in the message)
MALFORMED = {
    "unknown_key": (GOOD + "gpu = yes\n", 10, "gpu", "unknown key"),
    "duplicate_key": (GOOD + "cores = 8\n", 10, "cores", "duplicate key"),
    "missing_key": (_replace("cores", "# cores removed"), None, "cores", "missing key"),
    "not_key_value": (_replace("cores", "cores 4"), 8, None, "not a `key = value`"),
    "empty_key": (_replace("cores", "= 4"), 8, None, "not a `key = value`"),
    "bad_size": (_replace("memory", "memory = lots"), 3, "memory", "cannot read"),
    "bad_cores": (_replace("cores", "cores = 4.5"), 8, "cores", "cannot read"),
    "bad_factor": (
        _replace("compute_factor", "compute_factor = fast"),
        9,
        "compute_factor",
        "cannot read",
    ),
    "nan_factor": (
        _replace("compute_factor", "compute_factor = nan"),
        9,
        "compute_factor",
        "finite",
    ),
    "zero_cores": (_replace("cores", "cores = 0"), 8, "cores", "greater than zero"),
    "negative_factor": (
        _replace("compute_factor", "compute_factor = -1"),
        9,
        "compute_factor",
        "greater than zero",
    ),
    "zero_bandwidth": (
        _replace("flash_rand_read", "flash_rand_read = 0MB"),
        7,
        "flash_rand_read",
        "greater than zero",
    ),
    "empty_name": (_replace("name", "name ="), 2, "name", "empty"),
    "reserve_too_big": (
        _replace("os_reserve", "os_reserve = 9GiB"),
        4,
        "os_reserve",
        "leaves nothing",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_profile_names_line_and_key(tmp_path, case):
    text, line, key, words = MALFORMED[case]
    f = tmp_path / f"{case}.profile"
    f.write_text(text)
    with pytest.raises(MalformedProfile) as e:
        load_profile(f)
    message = str(e.value)
    assert str(f) in message
    if line is not None:
        assert f"line {line}" in message
    if key is not None:
        assert key in message
    assert words in message
    assert "; " in message  # "what; fix"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_random_text_raises_only_malformed_profile(text):
    try:
        parse_profile(text, "fuzz.profile")
    except MalformedProfile:
        pass


KEY_LINES = st.sampled_from(
    [
        "name",
        "memory",
        "os_reserve",
        "memory_bandwidth",
        "flash_seq_read",
        "flash_rand_read",
        "cores",
        "compute_factor",
        "x",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KEY_LINES, st.text(max_size=12)), max_size=12))
def test_random_key_value_lines_raise_only_malformed_profile(pairs):
    # closer to valid files than st.text(), so the value readers get exercised
    text = "\n".join(f"{k} = {v}" for k, v in pairs)
    try:
        parse_profile(text, "fuzz.profile")
    except MalformedProfile:
        pass
