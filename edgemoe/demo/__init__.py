"""The bundled demo model (README.md here says how it was trained)."""

from pathlib import Path

DEMO = Path(__file__).parent / "demo.emoe"
