"""Model files shipped with the package: the synthetic demo bundle (not for diagnosis)."""

from __future__ import annotations

from pathlib import Path

DEMO_BUNDLE = Path(__file__).resolve().parent / "synthetic_demo.dermal"
