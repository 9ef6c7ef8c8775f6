"""edgemoe: run Mixture-of-Experts LLMs from flash inside a hard memory budget."""

from edgemoe.units import Bytes

__version__ = "0.1.0"
__all__ = ["Bytes", "__version__"]
