"""Run configs shipped inside the package (the demos), found wherever magmax is installed."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMOS = {"text": "demo_text.yaml", "image": "demo_image.yaml"}


def demo_config_path(kind: str = "text") -> Path:
    """The packaged YAML config of ``magmax demo`` (``kind``: text or image)."""
    return Path(str(resources.files("magmax.presets") / DEMOS[kind]))
