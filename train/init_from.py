"""`dalle-ar train STAGE --init-from EXPORT_DIR`: start a run from exported weights.

Fine-tuning, not resuming: the weights come from an export (`dalle-ar export`, a run's export/,
or the matching component of a pipeline directory), while the optimizer, the LR schedule and the
step count start fresh (`--resume` restores all of those from the run's own checkpoints instead).

The export must be of the stage's kind and hold exactly the tensors of the model the run builds:
another kind, or a config whose shapes differ (dim, depth, vocabularies, grid, ...), is a
ValueError that names the differing config fields. Fields that change no tensor (dropout,
null_prob, loss weights, sampling defaults, schedules) may differ: the run's config wins.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from dalle_ar.io import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

# The directory a pipeline keeps each stage's export in.
PIPELINE_PARTS = {"dvae": "dvae", "dalle": "dalle", "clip": "clip"}


def _kind(config: dict) -> str:
    if config.get("kind") in ("dvae", "vqgan"):  # image tokenizers name their kind (image_tokenizer.KINDS)
        return config["kind"]
    if config.get("model_type") == "clip" or "text_config" in config:
        return "clip"
    if "attn_types" in config or "text_len" in config:
        return "dalle"
    if "n_hid" in config or "group_count" in config:
        return "dvae"
    return "unknown"


def resolve_export_dir(stage: str, export_dir) -> Path:
    """The directory holding config.json + model.safetensors for `stage` (a pipeline's component too)."""
    d = Path(export_dir)
    if not d.is_dir():
        raise ValueError(f"--init-from: {d} is not a directory")
    if (d / "pipeline.json").is_file() and (d / PIPELINE_PARTS.get(stage, stage)).is_dir():
        d = d / PIPELINE_PARTS[stage]
    if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
        raise ValueError(f"--init-from: {d} is not an export: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                         f"(from `dalle-ar export` or a run's export/)")
    return d


def _config_dict(config) -> dict:
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):  # transformers configs
        return config.to_dict()
    import dataclasses

    return dataclasses.asdict(config)


def init_from_export(stage: str, model: torch.nn.Module, model_config, export_dir) -> dict:
    """Load an export's weights into a freshly built `model` of `stage` -> a summary dict.

    ValueError (naming --init-from) for another kind of export or tensors that do not fit.
    """
    d = resolve_export_dir(stage, export_dir)
    saved = json.loads((d / CONFIG_NAME).read_text())
    kind = _kind(saved)
    if kind != stage:
        raise ValueError(f"--init-from: {d} holds a {kind} export, not a {stage} one")
    state = load_file(str(d / WEIGHTS_NAME))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                    for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    ours = _config_dict(model_config)
    differ = {k: (saved[k], ours[k]) for k in sorted(set(saved) & set(ours))
              if not isinstance(saved[k], dict) and _norm(saved[k]) != _norm(ours[k])}
    if missing or unexpected or shapes:
        fields = "; ".join(f"{k}: export {a!r}, run {b!r}" for k, (a, b) in differ.items()) or "none found"
        problems = [f"{len(shapes)} tensor(s) of another shape, e.g. {shapes[0]}" if shapes else "",
                    f"{len(missing)} missing, e.g. {missing[0]}" if missing else "",
                    f"{len(unexpected)} unexpected, e.g. {unexpected[0]}" if unexpected else ""]
        raise ValueError(f"--init-from: {d} does not fit this run's {stage} model ("
                         + ", ".join(p for p in problems if p) + f"). Config fields that differ: {fields}. "
                         "Set the run's model config to the export's (--config or model.<field>=...) "
                         "or start from scratch")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    if differ:
        log.info("--init-from %s: config fields that change no tensor differ (the run's values are used): %s",
                 d, differ)
    return {"init_from": str(d), "tensors": len(state), "config_differences": sorted(differ)}


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
