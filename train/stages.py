"""The stages `dalle-ar train` offers, and running one: STAGES, configs, `run_stage`, `export_run`.

What a stage is (the contract stage authors read): train/stage.py. One module per stage:
stage_dvae.py, stage_vqgan.py, stage_dalle.py, stage_clip.py. A resumed run's record: resume.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from dalle_ar import engine
from dalle_ar.data import expand_shards
from dalle_ar.io import config_from_dict, write_json
from dalle_ar.threads import set_threads

from . import find_config, shipped_configs
from .init_from import init_from_export
from .resume import STAGE_FILE, recorded_config, resume_configs
from .stage import Stage
from .stage_clip import CLIPStage
from .stage_config import route_overrides  # noqa: F401  (imported from here by callers and tests)
from .stage_dalle import DALLEStage
from .stage_dvae import DVAEStage
from .stage_vqgan import VQGANStage

log = logging.getLogger(__name__)

STAGES = {"dvae": DVAEStage, "vqgan": VQGANStage, "dalle": DALLEStage, "clip": CLIPStage}


def _stage_class(stage: str) -> type[Stage]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    return STAGES[stage]


def load_stage_config(stage: str, config_file=None, overrides=(), base=None):
    """-> (model config, TrainConfig, data config, DeepSpeed overrides as a list of `key=value`).
    `base` ({section: dict}, a resumed run's record) is what the file's sections and overrides go over."""
    return _stage_class(stage).load_config(config_file, overrides, base)


def describe_stage(stage: str) -> str:
    """What `dalle-ar train STAGE --help` adds to the options: what the stage needs, the shipped configs
    for it, and every config key with its default (the `key=value` overrides and `--config` sections)."""
    cls = _stage_class(stage)
    lines = [f"the {stage} stage: {cls.summary}", "", "needs: --train-shards and --out"
             + "".join(f"; {k}=DIR: {what}" for k, what in cls.needs.items())]
    shipped = [n for n in shipped_configs() if n.startswith(f"{stage}-")]
    if shipped:
        lines.append(f"shipped configs (--config NAME; `dalle-ar configs --show NAME`): {', '.join(shipped)}")
    lines += ["", "config keys and their defaults (set them in --config's sections or as key=value):"]
    for section, c in cls.config_classes().items():
        lines.append(f"  {section} ({c.__name__}):")
        for f in dataclasses.fields(c):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"    {section}.{f.name} = {json.dumps(default, default=str)}")
    return "\n".join(lines)


# ---- running and exporting -------------------------------------------------------------------------

def check_shards(shards, option: str) -> None:
    """Before any training: `shards` must name at least one shard, and every local one must exist
    (URLs and `pipe:` commands are left to the loader)."""
    try:
        urls = expand_shards(shards)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise ValueError(f"{option}: {len(missing)} of {len(urls)} shard(s) not found, e.g. {missing[:3]}")


def run_stage(stage: str, train_shards, out, *, val_shards=None, config_file=None, ds_config=None,
              overrides=(), steps=None, batch_size=None, save_every=None, resume=False, init_from=None,
              threads=None) -> dict:
    """Train one stage through the shared engine, export it to OUT/export, evaluate; returns a summary.

    With `resume` and an OUT/stage.json, the run's recorded configs, shards and DeepSpeed config are the
    starting point: what is passed besides them is checked against them (`resume_configs`).
    init_from: an export (or pipeline) directory whose weights the model starts from, with a fresh
    optimizer and schedule (`train/init_from.py`); with `resume`, the run's own newest checkpoint
    wins when there is one. threads: torch's CPU threads (None: the `dalle_ar.threads` policy)."""
    set_threads(threads)
    overrides = list(overrides)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("save_every", save_every)):
        if value is not None:
            overrides.append(f"train.{name}={value}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder")
    meta = json.loads((out / STAGE_FILE).read_text()) if resume and (out / STAGE_FILE).is_file() else None
    if meta is not None:
        (model_cfg, train_cfg, data_cfg, ds_over), train_shards, val_shards, ds_config = resume_configs(
            _stage_class(stage), meta, out, config_file, overrides, train_shards, val_shards, ds_config)
        resolved = True
    else:
        if not train_shards:
            raise ValueError("--train-shards is required (or --resume a run whose stage.json records them)")
        model_cfg, train_cfg, data_cfg, ds_over = load_stage_config(stage, config_file, overrides)
        ds_config, resolved = str(find_config(ds_config).resolve()) if ds_config else None, False
    check_shards(train_shards, "--train-shards")  # every input checked before the first step
    if val_shards:
        check_shards(val_shards, "--val-shards")
    st = STAGES[stage](model_cfg, train_cfg, data_cfg, train_shards, val_shards, out, resolved=resolved)
    for text in st.warnings() if engine.is_rank0() else ():
        print(f"[{stage}] {text}", flush=True)
    engine.seed_everything(st.train_cfg.seed)  # initial weights follow train.seed
    built = st.build()
    init = None
    if init_from is not None:
        if resume and engine.latest_checkpoint(out / "checkpoints") is not None:
            log.info("--init-from %s ignored: resuming %s from its own checkpoint", init_from, out)
        else:
            init = init_from_export(stage, built.model, st.model_cfg, init_from)
    out.mkdir(parents=True, exist_ok=True)

    def on_start(step):  # only once the engine accepted the run: a refused one leaves the old stage.json
        if engine.is_rank0():
            write_json(out / STAGE_FILE, {
                "stage": stage, "train_shards": train_shards, "val_shards": val_shards,
                "deepspeed_config": ds_config, "ds_overrides": ds_over, "config": st.record(),
                **({"init_from": init["init_from"]} if init else
                   {"init_from": meta["init_from"]} if meta and "init_from" in meta else {})})

    result = engine.train(built.model, built.loss_fn, built.make_batches, st.train_cfg, out,
                          ds_config=engine.load_ds_config(ds_config, ds_over),
                          hooks={**built.hooks, "on_start": on_start}, resume=resume, aux=built.aux)
    if result.get("export_dir") and engine.is_rank0():
        built.export(Path(result["export_dir"]))
        metrics = st.evaluate(built.model)
        if metrics:
            write_json(out / "metrics.json", metrics)
            result["metrics"] = metrics
    return result



def export_run(run_dir, out) -> Path:
    """`dalle-ar export`: consolidate the newest complete checkpoint of a run into OUT, with the
    configs its stage.json recorded."""
    run_dir = Path(run_dir)
    meta_path = next((p / STAGE_FILE for p in (run_dir, run_dir.parent) if (p / STAGE_FILE).is_file()), None)
    if meta_path is None:
        raise ValueError(f"{run_dir} is not a training run: no {STAGE_FILE} in it or its parent")
    meta = json.loads(meta_path.read_text())
    cls, cfg = _stage_class(meta["stage"]), meta["config"]
    st = cls(config_from_dict(cls.model_config_cls, cfg["model"]), config_from_dict(engine.TrainConfig, cfg["train"]),
             recorded_config(cls.data_config_cls, cfg["data"]), meta["train_shards"], meta.get("val_shards"),
             meta_path.parent, resolved=True)
    built = st.build()
    engine.export_checkpoint(meta_path.parent, built.model, out)
    built.export(Path(out))
    return Path(out)
