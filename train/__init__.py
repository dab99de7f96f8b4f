"""Training entry points (`dalle_ar.train` once installed) and the shipped configs.

The one way to find a shipped config: `config_path("dalle-shapes.json")` or `CONFIG_DIR`
(`train/configs` in a checkout, `dalle_ar/train/configs` once installed).
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The stages `dalle-ar train` offers, read by the CLI without importing them (torch, DeepSpeed);
# each is a class in dalle_ar.train.stages.STAGES (tests/test_architecture.py holds the two equal).
STAGE_NAMES = ("dvae", "vqgan", "dalle", "clip")


def config_path(name: str) -> Path:
    """A shipped config file: a stage config (`dvae-shapes.json`) or a DeepSpeed one (`zero3.json`)."""
    return CONFIG_DIR / name
