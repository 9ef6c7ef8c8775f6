"""Device profiles: the memory, bandwidth and compute figures of one device.

A profile is a data file in devices/profiles/ (see devices/README.md for every
key); this module reads and checks it. The budget and scheduler plan with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from formats.errors import EmoeError
from formats.units import Bytes

PROFILE_DIR = Path(__file__).parent / "profiles"
SUFFIX = ".profile"

_SIZE_KEYS = (
    "memory",
    "os_reserve",
    "memory_bandwidth",
    "flash_seq_read",
    "flash_rand_read",
)
_KEYS = ("name", *_SIZE_KEYS, "cores", "compute_factor")
_OPTIONAL_KEYS = ("watts",)  # power under load, for the cluster's energy costs (MoE²)


class UnknownDevice(EmoeError):
    fix = "pick one of the known devices, or pass the path of a .profile file"


class MalformedProfile(EmoeError):
    fix = "fix the profile file; devices/README.md explains every key"


@dataclass(frozen=True)
class DeviceProfile:
    """One device's figures; sizes in bytes, bandwidths in bytes per second."""

    name: str
    memory: Bytes
    os_reserve: Bytes
    memory_bandwidth: Bytes
    flash_seq_read: Bytes
    flash_rand_read: Bytes
    cores: int
    compute_factor: float
    watts: float | None = None  # optional: power drawn while computing
    source: str = field(default="", compare=False)

    @property
    def usable_memory(self) -> Bytes:
        """Memory left for edgemoe: total memory minus what the OS and other apps keep."""
        return self.memory - self.os_reserve


def _read_value(key: str, text: str) -> object:
    if key == "name":
        if not text:
            raise ValueError("the name is empty")
        return text
    if key == "cores":
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"cannot read {text!r} as a whole number of cores") from None
    elif key in ("compute_factor", "watts"):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"cannot read {text!r} as a number") from None
        if value != value or value == float("inf"):
            raise ValueError(f"{text!r} is not a finite number")
    else:
        try:
            value = Bytes.parse(text)
        except OverflowError:  # digits beyond a float's range
            raise ValueError(f"{text!r} is too large") from None
    if value <= 0:
        raise ValueError(f"{text!r} must be greater than zero")
    return value


def parse_profile(text: str, source: str = "<text>") -> DeviceProfile:
    """Parse the text of a profile file.

    Args:
        text: lines of `key = value`; `#` starts a comment, blank lines are skipped.
        source: the file name, for error messages.
    Returns:
        The checked DeviceProfile.
    Raises:
        MalformedProfile: names the file, line and key, and what is wrong.
    """
    values: dict[str, object] = {}
    lines: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        where = f"{source}, line {number}"
        if not sep or not key:
            raise MalformedProfile(f"{where}: {line!r} is not a `key = value` line")
        if key not in _KEYS + _OPTIONAL_KEYS:
            raise MalformedProfile(
                f"{where}, key {key!r}: unknown key (known keys: {', '.join(_KEYS + _OPTIONAL_KEYS)})"
            )
        if key in values:
            raise MalformedProfile(
                f"{where}, key {key!r}: duplicate key (first set on line {lines[key]})"
            )
        try:
            values[key] = _read_value(key, value)
        except ValueError as e:
            raise MalformedProfile(f"{where}, key {key!r}: {e}") from None
        lines[key] = number
    missing = [k for k in _KEYS if k not in values]
    if missing:
        raise MalformedProfile(f"{source}: missing key(s) {', '.join(missing)}")
    profile = DeviceProfile(**values, source=source)
    if profile.os_reserve >= profile.memory:
        raise MalformedProfile(
            f"{source}, line {lines['os_reserve']}, key 'os_reserve': "
            f"{profile.os_reserve.human()} leaves nothing of {profile.memory.human()}"
        )
    return profile


def user_profile_dir() -> Path:
    """Where `edgemoe profile` writes: $XDG_CONFIG_HOME/edgemoe/profiles (~/.config/...)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "edgemoe" / "profiles"


def profile_dirs() -> list[Path]:
    """Folders searched for a profile by name: the user's first, then the shipped ones."""
    return [user_profile_dir(), PROFILE_DIR]


def known_devices() -> list[str]:
    """Names of the user's and the shipped profiles, sorted."""
    return sorted(
        {p.name.removesuffix(SUFFIX) for d in profile_dirs() for p in d.glob(f"*{SUFFIX}")}
    )


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a shipped profile by name, or any profile file by path.

    Args:
        name_or_path: a name from known_devices(), or a path to a .profile file.
    Returns:
        The checked DeviceProfile.
    Raises:
        UnknownDevice: no shipped profile has that name and no such file exists.
        MalformedProfile: the file is not a valid profile.
    """
    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix == SUFFIX or "/" in text or "\\" in text) or not path.is_file():
        found = (d / f"{text}{SUFFIX}" for d in profile_dirs())
        path = next((p for p in found if p.is_file()), PROFILE_DIR / f"{text}{SUFFIX}")
    if not path.is_file():
        raise UnknownDevice(
            f"no device profile named {text!r} (known devices: {', '.join(known_devices())})"
        )
    return parse_profile(path.read_text(encoding="utf-8"), source=str(path))
