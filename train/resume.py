"""A run's record and what a resume may change.

`dalle-ar train` writes OUT/stage.json when the engine accepts a run: the stage, its shards, the
DeepSpeed config and the resolved configs (`Stage.record()`). `--resume` and `dalle-ar export`
rebuild the stage from it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dalle_ar.io import config_from_dict

from . import find_config
from .stage import Stage

STAGE_FILE = "stage.json"

# What a `--resume` may change: how long, how often to save/log/evaluate, what the sample grids show. The rest
# (model, optimiser, schedule shape, batch, data order) is the run's, recorded in its stage.json.
RESUME_MAY_CHANGE = ("train.steps", "train.save_every", "train.keep_last", "train.log_every", "train.eval_every",
                     "train.progress", "train.tensorboard", "train.export", "train.max_nonfinite",
                     "data.sample_count", "data.sample_prompts", "data.tokenizer", "data.dvae")


def resume_configs(cls: type[Stage], meta: dict, out, config_file, overrides, train_shards, val_shards,
                   ds_config):
    """The configs of a resumed run: its stage.json, with `config_file` and `overrides` applied on top and
    resolved again; a value that differs from the recorded one is accepted only for RESUME_MAY_CHANGE
    keys, else a ValueError names it. Shards not given are the recorded ones (given ones may differ);
    the DeepSpeed config must be the recorded one. Returns ((model, train, data, ds overrides),
    train_shards, val_shards, ds_config)."""
    where, stage = Path(out) / STAGE_FILE, cls.name
    if meta.get("stage") != stage:
        raise ValueError(f"--resume: {where} records a {meta.get('stage')} run, not {stage}")
    rec = meta["config"]
    classes = cls.config_classes()
    recorded = {name: recorded_config(c, rec[name]) for name, c in classes.items()}
    *asked, ds_over = cls.load_config(config_file, overrides,
                                      base={n: dataclasses.asdict(c) for n, c in recorded.items()})
    asked = dict(zip(classes, cls.resolve(*asked)))
    plain = lambda cfg: json.loads(json.dumps(dataclasses.asdict(cfg)))  # noqa: E731  (tuples vs lists)
    refused = [f"{name}.{k}={json.dumps(v)} (the run has {json.dumps(plain(recorded[name])[k])})"
               for name in classes for k, v in plain(asked[name]).items()
               if v != plain(recorded[name])[k] and f"{name}.{k}" not in RESUME_MAY_CHANGE]
    then_ds, then_over = meta.get("deepspeed_config"), meta.get("ds_overrides") or []
    now_ds = str(find_config(ds_config).resolve()) if ds_config else then_ds
    if "deepspeed_config" in meta and now_ds != then_ds:  # (runs recorded before it was recorded: any)
        refused.append(f"--deepspeed-config {ds_config} (the run has {then_ds})")
    if ds_over and ds_over != then_over:
        refused.append(f"ds overrides {ds_over} (the run has {then_over})")
    if refused:
        raise ValueError(f"--resume: {where} records another setting for {'; '.join(refused)}. A resume may change "
                         f"only {', '.join(RESUME_MAY_CHANGE)} and the shard paths: drop the others to continue the "
                         f"run, or train into a new --out")
    return ((asked["model"], asked["train"], asked["data"], then_over),
            train_shards or meta["train_shards"], val_shards or meta.get("val_shards"), now_ds)


def recorded_config(cls: type, d: dict):
    """A config from stage.json; runs recorded before the data configs were split per stage carry
    other stages' (unused) data fields, which are dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    return config_from_dict(cls, {k: v for k, v in d.items() if k in names})

