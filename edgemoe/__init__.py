"""edgemoe: run Mixture-of-Experts LLMs from flash inside a hard memory budget.

import edgemoe
m = edgemoe.load("model.emoe", mem="4GB")
print(m.generate("Hello", max_tokens=32))
"""

from edgemoe.units import Bytes

__version__ = "0.1.0"


def load(path=None, mem=None, **kw):
    """Open a .emoe inside a memory budget; see edgemoe.engine.EdgeModel."""
    from edgemoe.engine import load as _load

    return _load(path, mem, **kw)


__all__ = ["Bytes", "__version__", "load"]
