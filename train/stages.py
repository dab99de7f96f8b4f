"""The trainers. Each stage is one class that joins one model, one data pipeline and the shared engine.

A stage's config file is JSON with three sections, each a dataclass:

    {"model": {... DVAEConfig | VQGANConfig | DALLEConfig | SmallCLIPConfig ...},
     "train": {... dalle_ar.engine.TrainConfig ...},
     "data":  {... the stage's DataConfig ...}}

`key=value` overrides name a field as `section.field` (`model.dim=256`, `train.lr=3e-4`) or just
`field` where only one section has it; `ds.<key>` overrides the DeepSpeed JSON.

The stage contract (adding a stage = one class + one line in STAGES):

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
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from dalle_ar import engine
from dalle_ar.clip import SmallCLIPConfig, build_small_clip, clip_inputs, clip_loss, retrieval_accuracy
from dalle_ar.dalle import DALLE, DALLEConfig
from dalle_ar.data import ShardLoader, expand_shards, iter_raw_samples, preprocess_image, shards_have_codes
from dalle_ar.dvae import DiscreteVAE, DVAEConfig, codebook_usage, psnr
from dalle_ar.image_tokenizer import load_image_tokenizer, load_image_tokenizer_config
from dalle_ar.images import image_grid, to_pil
from dalle_ar.io import config_from_dict, load_config, write_json
from dalle_ar.threads import set_threads
from dalle_ar.tokenizer import TextTokenizer
from dalle_ar.vqgan import VQGAN
from dalle_ar.vqgan_loss import LastLayer, PatchDiscriminator, VQGANTrainingConfig, discriminator_loss, \
    generator_terms, load_perceptual

from . import find_config
from .init_from import init_from_export
from .stage_config import CLIPDataConfig, DALLEDataConfig, DataConfig, route_overrides

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


# ---- config ------------------------------------------------------------------------------------

def _stage_class(stage: str) -> type["Stage"]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    return STAGES[stage]


def load_stage_config(stage: str, config_file=None, overrides=(), base=None):
    """-> (model config, TrainConfig, data config, DeepSpeed overrides as a list of `key=value`).
    `base` ({section: dict}, a resumed run's record) is what the file's sections and overrides go over."""
    cls = _stage_class(stage)
    classes = {"model": cls.model_config_cls, "train": engine.TrainConfig, "data": cls.data_config_cls}
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


# ---- the contract ------------------------------------------------------------------------------

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


# ---- stages -------------------------------------------------------------------------------------

class DVAEStage(Stage):
    name = "dvae"
    summary = "the image tokenizer (discrete VAE) on image shards"
    model_config_cls = DVAEConfig

    @classmethod
    def resolve(cls, model_cfg, train_cfg, data_cfg):
        # The decoder-only phase wants a fresh LR schedule: restart it there unless train.restart_at says.
        hard = model_cfg.hard_codes_from_step
        if hard and not train_cfg.restart_at:
            train_cfg = dataclasses.replace(train_cfg, restart_at=hard)
        return model_cfg, train_cfg, dataclasses.replace(data_cfg, image_size=model_cfg.image_size)

    def warnings(self):
        """The dVAE's own schedules count steps too: on a run shorter than them, say what will not happen."""
        m, steps = self.model_cfg, self.train_cfg.steps
        what = {"kl_warmup_steps": "the KL weight never reaches model.kl_weight",
                "temp_anneal_steps": "the Gumbel temperature never reaches model.temp_end",
                "hard_codes_from_step": "the decoder-only phase on hard codes never starts"}
        value = {k: getattr(m, k) or 0 for k in what}  # hard_codes_from_step may be None (no such phase)
        longest = max(value.values())  # suggestions keep the proportions, the longest at 80% of the run
        return [f"WARNING: model.{k}={value[k]} >= train.steps={steps}: {text}; scale it to the run "
                f"(e.g. model.{k}={max(1, steps // 10, value[k] * steps * 4 // (5 * longest))})"
                for k, text in what.items() if value[k] >= steps > 0 and value[k]]

    def build_model(self):
        self.val_codes = []  # every val batch's codes, for codebook usage
        return DiscreteVAE(self.model_cfg)

    def loss_fn(self, model, batch, step):
        # Channels-last activations run faster on CPU; the weights stay contiguous for DeepSpeed's
        # broadcast and ZeRO's flat buffers.
        return model(batch["image"].contiguous(memory_format=torch.channels_last), step=step)

    @torch.no_grad()
    def on_checkpoint(self, step, model, writer):
        x = self.fixed_batch(self.data.sample_count)["image"].to(next(model.parameters()).device)
        recon = model.decode(model.encode(x))
        save_grid(torch.cat([x, recon.float()]).cpu(), x.shape[0], self.out / "samples" / f"step{step:08d}.png",
                  writer, "dvae/originals_vs_reconstructions", step)

    def eval_batch(self, model, batch):
        x = batch["image"].to(next(model.parameters()).device)
        codes = model.encode(x)
        self.val_codes.append(codes.cpu())
        return {"psnr": psnr(model.decode(codes).float(), x)}, x.shape[0]

    def eval_summary(self, n):
        usage = codebook_usage(torch.cat(self.val_codes), self.model_cfg.vocab_size) if self.val_codes else {}
        self.val_codes = []
        return {"val_images": n, **{f"codebook_{k}": float(v) for k, v in usage.items()}}


class VQGANStage(Stage):
    """The VQ image tokenizer: reconstruction (L1/L2, edge-weighted) + the quantizer's loss, optionally an
    LPIPS-style perceptual term and a patch-GAN discriminator (dalle_ar/vqgan_loss.py), trained by the
    engine as an `Auxiliary` with its own optimizer. The model section takes both the tokenizer's and the
    loss's keys (VQGANTrainingConfig); the export holds the tokenizer only."""

    name = "vqgan"
    summary = "the VQ image tokenizer (VQGAN / FSQ; optionally a patch-GAN discriminator) on image shards"
    model_config_cls = VQGANTrainingConfig

    @classmethod
    def resolve(cls, model_cfg, train_cfg, data_cfg):
        return model_cfg, train_cfg, dataclasses.replace(data_cfg, image_size=model_cfg.image_size)

    def build_model(self):
        self.val_codes = []
        self.loss_cfg = lc = self.model_cfg.loss_config()
        self.perceptual = load_perceptual(lc.perceptual_weights) if lc.perceptual_weight else None
        model = VQGAN(self.model_cfg.tokenizer_config())
        self.last_layer = LastLayer(model.decoder.conv_out) if lc.gan and lc.adaptive_weight else None
        return model

    def build(self):
        built = super().build()
        if self.loss_cfg.gan:
            built.aux = engine.Auxiliary(PatchDiscriminator(self.loss_cfg, self.model_cfg.out_ch), self.disc_loss_fn,
                                         active=self.loss_cfg.gan_on, name="d")
        return built

    def loss_fn(self, model, batch, step, disc=None):
        """The generator's loss; with `disc` (the discriminator's engine, from model.disc_start on) + the GAN
        term, computed inside the tokenizer's engine forward with the discriminator's module (frozen by the
        engine); the real and detached reconstructed images are left in `batch` for `disc_loss_fn`."""
        if self.perceptual is None and disc is None:
            return model(batch["image"], step=step)
        dtype = batch["image"].dtype

        def extra_loss(recon, target, nll):
            if disc is not None:
                batch["real"], batch["fake"] = target.to(dtype), recon.detach().to(dtype)
            return generator_terms(self.loss_cfg, recon, target, nll, self.perceptual,
                                   disc.module if disc is not None else None, self.last_layer, dtype)

        return model(batch["image"], step=step, extra_loss=extra_loss)

    def disc_loss_fn(self, disc, batch, step):
        return discriminator_loss(self.loss_cfg, disc, batch["real"], batch["fake"])

    @torch.no_grad()
    def on_checkpoint(self, step, model, writer):
        x = self.fixed_batch(self.data.sample_count)["image"].to(next(model.parameters()).device)
        recon = model.decode(model.encode(x))
        save_grid(torch.cat([x, recon.float()]).cpu(), x.shape[0], self.out / "samples" / f"step{step:08d}.png",
                  writer, "vqgan/originals_vs_reconstructions", step)

    eval_batch = DVAEStage.eval_batch

    def eval_summary(self, n):
        usage = codebook_usage(torch.cat(self.val_codes), self.model_cfg.n_embed) if self.val_codes else {}
        self.val_codes = []
        return {"val_images": n, **{f"codebook_{k}": float(v) for k, v in usage.items()}}


class DALLEStage(Stage):
    name = "dalle"
    summary = "the prior (transformer) on image or code shards, with a trained tokenizer and dVAE"
    needs = {"data.tokenizer": "a trained tokenizer directory (dalle-ar tokenizer train --out)",
             "data.dvae": "a trained image tokenizer directory: a dVAE or a VQGAN (RUN/export of `train dvae` / `train vqgan`, or `convert openai-dvae` / `convert taming-vqgan`)"}
    model_config_cls = DALLEConfig
    data_config_cls = DALLEDataConfig

    @classmethod
    def resolve(cls, model_cfg, train_cfg, data_cfg):
        """The model's vocabularies and grid follow the tokenizer and the image tokenizer unless set."""
        cls.check_needs(data_cfg)
        text_vocab = TextTokenizer.from_pretrained(data_cfg.tokenizer).vocab_size
        dvae = load_image_tokenizer_config(data_cfg.dvae)
        fill = {k: v for k, v in (("text_vocab_size", text_vocab), ("image_vocab_size", dvae.vocab_size),
                                  ("image_grid", dvae.grid_size)) if not getattr(model_cfg, k)}
        model_cfg = dataclasses.replace(model_cfg, **fill)
        if model_cfg.image_vocab_size != dvae.vocab_size or model_cfg.image_grid != dvae.grid_size:
            raise ValueError("model.image_vocab_size / model.image_grid disagree with the image tokenizer")
        if text_vocab > model_cfg.text_vocab_size:
            raise ValueError(f"model.text_vocab_size={model_cfg.text_vocab_size} < tokenizer vocab {text_vocab}")
        return model_cfg, train_cfg, dataclasses.replace(data_cfg, image_size=dvae.image_size)

    def build_model(self):
        self.tokenizer = TextTokenizer.from_pretrained(self.data.tokenizer)
        self.dvae = load_image_tokenizer(self.data.dvae).eval().requires_grad_(False)
        self.codes = shards_have_codes(self.train_shards)  # pre-encoded by `dalle-ar encode`
        return DALLE(self.model_cfg)

    def loader_kwargs(self):
        return {"decode_images": not self.codes,
                "text_encoder": self.tokenizer.encoder(self.model_cfg.text_len, dropout=self.data.bpe_dropout)}

    def batch_codes(self, batch, device):
        if "codes" in batch:
            return batch["codes"].to(device)
        self.dvae.to(device)
        with torch.no_grad():
            return self.dvae.encode(batch["image"].to(device).float())

    def loss_fn(self, model, batch, step):
        return model(batch["text"], self.batch_codes(batch, batch["text"].device))

    def prompts(self):
        if self.data.sample_prompts:
            return list(self.data.sample_prompts)
        return list(self.fixed_batch(self.data.sample_count)["caption"])

    @torch.no_grad()
    def on_checkpoint(self, step, model, writer):
        prompts = self.prompts()
        dev = next(model.parameters()).device
        text = self.tokenizer.encode(prompts, length=self.model_cfg.text_len).to(dev)
        g = torch.Generator(device=dev).manual_seed(0)
        codes = model.generate(text.repeat_interleave(4, 0), generator=g)
        self.dvae.to(dev)
        images = self.dvae.decode(codes).float().cpu()
        save_grid(images, 4, self.out / "samples" / f"step{step:08d}.png", writer, "dalle/samples", step,
                  captions=prompts)

    def eval_loader_kwargs(self):
        return {"decode_images": not shards_have_codes(self.val_shards)}

    def eval_batch(self, model, batch):
        dev = next(model.parameters()).device
        text = batch["text"].to(dev)
        _, parts = model(text, self.batch_codes(batch, dev))
        return {k: parts[k] for k in ("loss_text", "loss_image")}, text.shape[0]

    def eval_summary(self, n):
        return {"val_samples": n}


class CLIPStage(Stage):
    name = "clip"
    summary = "the reranker (a small CLIP) on image shards, with a trained tokenizer"
    needs = {"data.tokenizer": "a trained tokenizer directory (dalle-ar tokenizer train --out)"}
    model_config_cls = SmallCLIPConfig
    data_config_cls = CLIPDataConfig

    @classmethod
    def resolve(cls, model_cfg, train_cfg, data_cfg):
        cls.check_needs(data_cfg)
        return model_cfg, train_cfg, data_cfg

    def build_model(self):
        tokenizer = TextTokenizer.from_pretrained(self.data.tokenizer)
        model, self.clip_tokenizer, self.processor = build_small_clip(
            tokenizer, self.model_cfg, image_size=self.data.image_size, text_len=self.data.text_len)
        return model

    def inputs(self, images, captions):
        return clip_inputs(images, captions, self.clip_tokenizer, self.processor, text_len=self.data.text_len)

    def loss_fn(self, model, batch, step):
        return clip_loss(model, **self.inputs(batch["image"], batch["caption"]))

    def finish_export(self, export_dir):
        self.clip_tokenizer.save_pretrained(export_dir)
        self.processor.save_pretrained(export_dir)

    def eval_batch(self, model, batch):
        inputs = self.inputs(batch["image"].to(next(model.parameters()).device), batch["caption"])
        return {"retrieval_top1": retrieval_accuracy(model, **inputs)}, len(batch["caption"])

    def eval_summary(self, n):
        return {"val_batch": self.train_cfg.batch_size, "val_samples": n}


STAGES = {"dvae": DVAEStage, "vqgan": VQGANStage, "dalle": DALLEStage, "clip": CLIPStage}


def describe_stage(stage: str) -> str:
    """What `dalle-ar train STAGE --help` adds to the options: what the stage needs, the shipped configs
    for it, and every config key with its default (the `key=value` overrides and `--config` sections)."""
    from . import shipped_configs

    cls = _stage_class(stage)
    lines = [f"the {stage} stage: {cls.summary}", "", "needs: --train-shards and --out"
             + "".join(f"; {k}=DIR: {what}" for k, what in cls.needs.items())]
    shipped = [n for n in shipped_configs() if n.startswith(f"{stage}-")]
    if shipped:
        lines.append(f"shipped configs (--config NAME; `dalle-ar configs --show NAME`): {', '.join(shipped)}")
    lines += ["", "config keys and their defaults (set them in --config's sections or as key=value):"]
    for section, c in (("model", cls.model_config_cls), ("train", engine.TrainConfig), ("data", cls.data_config_cls)):
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


# What a `--resume` may change: how long, how often to save/log/evaluate, what the sample grids show. The rest
# (model, optimiser, schedule shape, batch, data order) is the run's, recorded in its stage.json.
RESUME_MAY_CHANGE = ("train.steps", "train.save_every", "train.keep_last", "train.log_every", "train.eval_every",
                     "train.progress", "train.tensorboard", "train.export", "train.max_nonfinite",
                     "data.sample_count", "data.sample_prompts", "data.tokenizer", "data.dvae")


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
            stage, meta, out, config_file, overrides, train_shards, val_shards, ds_config)
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


def resume_configs(stage: str, meta: dict, out, config_file, overrides, train_shards, val_shards, ds_config):
    """The configs of a resumed run: its stage.json, with `config_file` and `overrides` applied on top and
    resolved again; a value that differs from the recorded one is accepted only for RESUME_MAY_CHANGE
    keys, else a ValueError names it. Shards not given are the recorded ones (given ones may differ);
    the DeepSpeed config must be the recorded one. Returns ((model, train, data, ds overrides),
    train_shards, val_shards, ds_config)."""
    where = Path(out) / STAGE_FILE
    if meta.get("stage") != stage:
        raise ValueError(f"--resume: {where} records a {meta.get('stage')} run, not {stage}")
    cls, rec = _stage_class(stage), meta["config"]
    classes = {"model": cls.model_config_cls, "train": engine.TrainConfig, "data": cls.data_config_cls}
    recorded = {name: _recorded(c, rec[name]) for name, c in classes.items()}
    *asked, ds_over = load_stage_config(stage, config_file, overrides,
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


def _recorded(cls: type, d: dict):
    """A config from stage.json; runs recorded before the data configs were split per stage carry
    other stages' (unused) data fields, which are dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    return config_from_dict(cls, {k: v for k, v in d.items() if k in names})


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
             _recorded(cls.data_config_cls, cfg["data"]), meta["train_shards"], meta.get("val_shards"),
             meta_path.parent, resolved=True)
    built = st.build()
    engine.export_checkpoint(meta_path.parent, built.model, out)
    built.export(Path(out))
    return Path(out)
