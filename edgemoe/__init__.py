"""edgemoe: run Mixture-of-Experts LLMs from flash inside a hard memory budget.

import edgemoe
m = edgemoe.load("model.emoe", mem="4GB")
print(m.generate("Hello", max_tokens=32))
"""

import os

# torch's OpenMP threads spin while they wait for work: with the other core busy (a phone,
# a shared laptop) decode fell 3x here. Passive waiting must be set before libgomp starts,
# i.e. before torch is first imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Weights are read at the memory's speed only in huge pages: on this Xeon the kernels read
# 4 KiB pages at 18-20 GB/s and 2 MiB ones at ~25 (TLB misses; a torch sum over the same
# bytes, measured). With this set torch madvises its allocations of 2 MiB and more, but
# torch 2.13 does not align them to 2 MiB: a 4 MiB weight gets one huge page of its two.
# Aligning them (a mapping per weight) was measured and left out: 25% cap decode 3.43 tok/s
# either way, uncapped 33.1 against 32.3, for more fresh huge pages to fault at load.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _return_freed_memory() -> None:
    """glibc keeps freed blocks below a threshold that grows with every large free (up to
    32 MiB), so a process that builds and evicts experts of a few MiB again and again holds
    their freed memory: 1.48 GB RSS under a 1.24 GB plan for mwq experts, OOM-killed inside a
    cgroup equal to the budget. A fixed 4 MiB threshold maps larger blocks on their own and
    returns them when freed: peak 1.09 GB for the same run. Other C libraries: nothing."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD (also turns the growing threshold off)
        libc.mallopt(-1, 4 << 20)  # M_TRIM_THRESHOLD: give back a free heap top past 4 MiB
    except (OSError, AttributeError):
        pass


_return_freed_memory()

from edgemoe.units import Bytes  # noqa: E402

__version__ = "0.1.0"


def load(path=None, mem=None, **kw):
    """Open a .emoe inside a memory budget; see edgemoe.engine.EdgeModel."""
    from edgemoe.engine import load as _load

    return _load(path, mem, **kw)


__all__ = ["Bytes", "__version__", "load"]
