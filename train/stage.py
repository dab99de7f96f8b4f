"""What every trainer is: one class that joins one model, one data pipeline and the shared engine
(a module each: stage_dvae.py, stage_vqgan.py, stage_dalle.py, stage_clip.py; stages.py lists them).

A stage's config file is JSON with three sections, each a dataclass:

    {"model": {... DVAEConfig | VQGANConfig | DALLEConfig | SmallCLIPConfig ...},
     "train": {... dalle_ar.engine.TrainConfig ...},
     "data":  {... the stage's DataConfig ...}}

`key=value` overrides name a field as `section.field` (`model.dim=256`, `train.lr=3e-4`) or just
`field` where only one section has it; `ds.<key>` overrides the DeepSpeed JSON.

The stage contract (adding a stage = one class in a module of its own + one line in stages.STAGES):

    resolve(model_cfg, train_cfg, data_cfg) -> (model_cfg, train_cfg, data_cfg)
        classmethod, pure: fills what the inputs decide (vocab sizes, grid, restart step). Its result
        is what the run's stage.json records and what `dalle-ar export` rebuilds the model from.
    build() -> Built(model, loss_fn, make_batches, hooks, export, aux=None)
        everything the engine needs, together; `export(dir)` adds what besides config.json +
        model.safetensors the export needs; `aux` an optional second model with its own optimizer
        (engine.Auxiliary: the VQGAN's discriminator).
    eval_batch(model, batch) -> ({metric: batch mean}, batch size), plus optional eval_loader_kwargs()
        and eval_summary(): one shared evaluation loop (`evaluate`) runs them over the val shards, every
        train.eval_every steps through the engine's on_eval hook (TensorBoard val/*) and at the end
        (metrics.json).
    on_checkpoint(step, model, writer): sample grids (PNG + TensorBoard).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from dalle_ar import engine
from dalle_ar.data import ShardLoader, iter_raw_samples, preprocess_image
from dalle_ar.dvae import codebook_usage, psnr
from dalle_ar.images import image_grid, to_pil
from dalle_ar.io import config_from_dict

from . import find_config
from .stage_config import DataConfig, route_overrides


@dataclass
class Built:
    """What `Stage.build()` hands the engine (and the export)."""

    model: torch.nn.Module
    loss_fn: Callable
    make_batches: Callable
    hooks: dict
    export: Callable[[Path], None]
    aux: Optional[engine.Auxiliary] = None  # a second model with its own optimizer (a GAN's discriminator)


def save_grid(images: torch.Tensor, nrow: int, path: Path, writer=None, tag: str = "", step: int = 0,
              captions=None):
    """Save float [B,3,H,W] images as one PNG grid (and to TensorBoard when a writer is given), on rank 0
    only; `captions` go to a .txt beside it, one per row."""
    if not engine.is_rank0():
        return None
    pil = to_pil(images)
    sheet = image_grid([pil[i:i + nrow] for i in range(0, len(pil), nrow)])
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    if captions is not None:
        path.with_suffix(".txt").write_text("\n".join(captions) + "\n")
    if writer is not None:
        writer.add_image(tag, np.asarray(sheet), step, dataformats="HWC")
    return path



class Stage:
    """One trainer: see the module docstring for the contract."""

    name = ""
    summary = ""                       # one line for `dalle-ar train --help`
    needs: dict = {}                   # config keys the stage cannot run without -> what they are
    model_config_cls: type = object
    data_config_cls: type = DataConfig

    def __init__(self, model_cfg, train_cfg, data_cfg, train_shards, val_shards, out, resolved: bool = False):
        if not resolved:
            model_cfg, train_cfg, data_cfg = self.resolve(model_cfg, train_cfg, data_cfg)
        self.model_cfg, self.train_cfg, self.data = model_cfg, train_cfg, data_cfg
        self.train_shards, self.val_shards = train_shards, val_shards
        self.out = Path(out)
        self.loader = None

    @classmethod
    def resolve(cls, model_cfg, train_cfg, data_cfg):
        return model_cfg, train_cfg, data_cfg

    @classmethod
    def config_classes(cls) -> dict:
        """The config file's sections and their dataclasses."""
        return {"model": cls.model_config_cls, "train": engine.TrainConfig, "data": cls.data_config_cls}

    @classmethod
    def load_config(cls, config_file=None, overrides=(), base=None):
        """-> (model config, TrainConfig, data config, DeepSpeed overrides as a list of `key=value`).
        `base` ({section: dict}, a resumed run's record) is what the file's sections and overrides go over."""
        classes = cls.config_classes()
        raw = {}
        if config_file:
            config_file = find_config(config_file)
            try:
                raw = json.loads(config_file.read_text())
            except ValueError as e:
                raise ValueError(f"config file {config_file}: invalid JSON ({e})") from None
            if not isinstance(raw, dict):
                raise ValueError(f"config file {config_file}: expected a JSON object with model/train/data sections")
        unknown = set(raw) - set(classes)
        if unknown:
            raise ValueError(f"config {config_file}: unknown section(s) {sorted(unknown)}; use model/train/data")
        routed = route_overrides(list(overrides), {name: {f.name for f in dataclasses.fields(c)}
                                                   for name, c in classes.items()})
        configs = [engine.apply_overrides(config_from_dict(c, {**(base or {}).get(name, {}), **raw.get(name, {})}),
                                          routed[name]) for name, c in classes.items()]
        return (*configs, routed["ds"])

    @classmethod
    def check_needs(cls, data_cfg) -> None:
        missing = [k for k in cls.needs if not getattr(data_cfg, k.split(".", 1)[1])]
        if missing:
            raise ValueError(f"the {cls.name} stage needs " + "; ".join(f"{k}=DIR ({cls.needs[k]})" for k in missing))

    def warnings(self) -> list[str]:
        """What a user should know before the run starts (e.g. model schedules longer than the run)."""
        return []

    def record(self) -> dict:
        """The resolved configs, as stage.json keeps them."""
        return {"model": dataclasses.asdict(self.model_cfg), "train": dataclasses.asdict(self.train_cfg),
                "data": dataclasses.asdict(self.data)}

    def build(self) -> Built:
        model = self.build_model()
        return Built(model, self.loss_fn, self.make_batches,
                     {"on_checkpoint": self.on_checkpoint, "on_eval": self.on_eval, "skipped_counts": self.skipped_counts},
                     self.finish_export)

    # subclasses: build_model, loss_fn, eval_batch, on_checkpoint
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def loss_fn(self, model, batch, step):
        raise NotImplementedError

    def finish_export(self, export_dir: Path) -> None:
        """Anything besides config.json + model.safetensors that the export needs."""

    def on_checkpoint(self, step, model, writer):
        pass

    # ---- data
    def loader_kwargs(self) -> dict:
        return {}

    def make_loader(self, shards, training=True, **extra):
        d = self.data
        kw = dict(batch_size=self.train_cfg.batch_size, image_size=d.image_size, num_workers=d.num_workers,
                  shuffle_buffer=d.shuffle_buffer if training else 0, shardshuffle=training,
                  seed=self.train_cfg.seed, random_crop=d.random_crop and training,
                  resampled=d.resampled and training, epoch_samples=d.epoch_samples if training else None,
                  drop_last=training)
        kw.update(self.loader_kwargs())
        kw.update(extra)
        return ShardLoader(shards, **kw)

    def make_batches(self, epoch: int):
        if self.loader is None:
            self.loader = self.make_loader(self.train_shards)
        self.loader.set_epoch(epoch)
        return iter(self.loader)

    def skipped_counts(self) -> dict:
        return dict(self.loader.skipped) if self.loader is not None else {}

    def fixed_batch(self, n: int) -> dict:
        """The first n samples of the validation shards (train shards if none), for sample grids.

        Read without rank splitting, so every rank holds the same batch (ZeRO-3 hooks run on all ranks).
        """
        images, captions = [], []
        for sample in iter_raw_samples(self.val_shards or self.train_shards):
            if sample["image"] is not None:
                images.append(preprocess_image(sample["image"], self.data.image_size))
            captions.append(sample["captions"][0])
            if len(captions) == n:
                break
        return {"image": torch.stack(images) if images else None, "caption": captions}

    # ---- evaluation: one loop, per-stage batch metrics
    def eval_loader_kwargs(self) -> dict:
        return {}

    def eval_batch(self, model, batch) -> tuple[dict, int]:
        raise NotImplementedError

    def eval_summary(self, n: int) -> dict:
        return {}

    def on_eval(self, step, model, writer) -> dict:
        """The engine's periodic validation (train.eval_every): the metrics, and the sample grid unless this
        step's checkpoint already drew it. Every rank reads all val batches, so ZeRO-3 ranks stay in step."""
        if not self.val_shards:
            return {}
        metrics = self.evaluate(model)
        if not (self.train_cfg.save_every and step % self.train_cfg.save_every == 0) and step != self.train_cfg.steps:
            self.on_checkpoint(step, model, writer)
        return metrics

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Size-weighted means of eval_batch over the val shards, as val_<metric> (+ eval_summary)."""
        if not self.val_shards:
            return {}
        model.eval()
        sums, n = {}, 0
        for batch in self.make_loader(self.val_shards, training=False, num_workers=0, split_by_rank=False,
                                      **self.eval_loader_kwargs()):
            metrics, size = self.eval_batch(model, batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * size
            n += size
        return {f"val_{k}": v / max(n, 1) for k, v in sums.items()} | self.eval_summary(n)


class ImageTokenizerStage(Stage):
    """A stage that trains an image tokenizer (dVAE, VQGAN): the images are the model's size,
    checkpoints draw originals over reconstructions, evaluation is PSNR + codebook usage."""

    @classmethod
    def resolve(cls, model_cfg, train_cfg, data_cfg):
        return model_cfg, train_cfg, dataclasses.replace(data_cfg, image_size=model_cfg.image_size)

    def build(self) -> Built:
        self.val_codes = []  # every val batch's codes, for codebook usage
        return super().build()

    @torch.no_grad()
    def on_checkpoint(self, step, model, writer):
        x = self.fixed_batch(self.data.sample_count)["image"].to(next(model.parameters()).device)
        recon = model.decode(model.encode(x))
        save_grid(torch.cat([x, recon.float()]).cpu(), x.shape[0], self.out / "samples" / f"step{step:08d}.png",
                  writer, f"{self.name}/originals_vs_reconstructions", step)

    def eval_batch(self, model, batch):
        x = batch["image"].to(next(model.parameters()).device)
        codes = model.encode(x)
        self.val_codes.append(codes.cpu())
        return {"psnr": psnr(model.decode(codes).float(), x)}, x.shape[0]

    def eval_summary(self, n):
        usage = codebook_usage(torch.cat(self.val_codes), self.model_cfg.vocab_size) if self.val_codes else {}
        self.val_codes = []
        return {"val_images": n, **{f"codebook_{k}": float(v) for k, v in usage.items()}}
