"""Training entry points (`dalle_ar.train` once installed) and the shipped configs.

The one way to find a shipped config: `config_path("dalle-shapes.json")` or `CONFIG_DIR`
(`train/configs` in a checkout, `dalle_ar/train/configs` once installed); `find_config` takes a file
or a shipped config's name (`dvae-shapes`), so `--config` works from any directory.
"""

import os
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The stages `dalle-ar train` offers, read by the CLI without importing them (torch, DeepSpeed);
# each is a class in dalle_ar.train.stages.STAGES (tests/test_architecture.py holds the two equal).
STAGE_NAMES = ("dvae", "vqgan", "dalle", "clip")


def config_path(name: str) -> Path:
    """A shipped config file: a stage config (`dvae-shapes.json`) or a DeepSpeed one (`zero3.json`)."""
    return CONFIG_DIR / name


def shipped_configs() -> list[str]:
    """The names of the shipped configs (`dvae-shapes`, `zero2`, ...), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def find_config(name_or_path) -> Path:
    """A config file: an existing path, else a shipped config by name (`dvae-shapes` or `dvae-shapes.json`).
    FileNotFoundError naming the shipped ones when neither exists."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    if os.sep not in text and "/" not in text:
        shipped = CONFIG_DIR / (text if text.endswith(".json") else f"{text}.json")
        if shipped.is_file():
            return shipped
    raise FileNotFoundError(f"config {text!r}: no such file, and not a shipped config "
                            f"({', '.join(shipped_configs())}; `dalle-ar configs` lists and copies them)")
