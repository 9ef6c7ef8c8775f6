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

from edgemoe.units import Bytes  # noqa: E402

__version__ = "0.1.0"


def load(path=None, mem=None, **kw):
    """Open a .emoe inside a memory budget; see edgemoe.engine.EdgeModel."""
    from edgemoe.engine import load as _load

    return _load(path, mem, **kw)


__all__ = ["Bytes", "__version__", "load"]
