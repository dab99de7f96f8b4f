"""The three trainers. Each joins one model, one data pipeline and the shared engine.

A stage's config file is JSON with three sections, each a dataclass:

    {"model": {... DVAEConfig | DALLEConfig | CLIP sizes ...},
     "train": {... dalle_ar.engine.TrainConfig ...},
     "data":  {... DataConfig ...}}

`key=value` overrides name a field as `section.field` (`model.dim=256`, `train.lr=3e-4`) or just
`field` where only one section has it; `ds.<key>` overrides the DeepSpeed JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dalle_ar.io import config_from_dict, write_json

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


@dataclass
class DataConfig:
    """How a stage reads its shards (model-independent)."""

    image_size: int = 64
    num_workers: int = 0
    shuffle_buffer: int = 1000
    random_crop: bool = False
    resampled: bool = False          # infinite resampling (multi-node: equal steps per rank)
    epoch_samples: Optional[int] = None
    tokenizer: Optional[str] = None  # dalle, clip: tokenizer directory
    dvae: Optional[str] = None       # dalle: frozen dVAE (encodes raw shards; gives grid and vocab)
    text_len: int = 32               # clip: caption length in tokens (dalle uses model.text_len)
    bpe_dropout: bool = False        # dalle: BPE dropout on training captions (paper: 0.1)
    sample_prompts: tuple = ()       # prompts of the PNG/TensorBoard sample grids
    sample_count: int = 8            # images per sample grid row / reconstructions shown


# ---- config ------------------------------------------------------------------------------------

def _model_config_cls(stage: str):
    if stage == "dvae":
        from dalle_ar.dvae import DVAEConfig
        return DVAEConfig
    if stage == "dalle":
        from dalle_ar.dalle import DALLEConfig
        return DALLEConfig
    if stage == "clip":
        from dalle_ar.rerank import SmallCLIPConfig
        return SmallCLIPConfig
    raise ValueError(f"stage must be one of dvae, dalle, clip; got {stage!r}")


def route_overrides(overrides, sections: dict[str, set]) -> dict[str, list[str]]:
    """Sort `key=value` overrides by section: `section.key`, `ds.<dotted key>`, or a bare `key`
    that exactly one section has. Returns {section: ["key=value", ...]} (ds keys keep their dots)."""
    routed: dict[str, list[str]] = {name: [] for name in (*sections, "ds")}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        head, _, rest = key.partition(".")
        if head == "ds" and rest:
            routed["ds"].append(f"{rest}={text}")
        elif head in sections and rest:
            routed[head].append(f"{rest}={text}")
        else:
            owners = [name for name, fields in sections.items() if key in fields]
            if len(owners) != 1:
                raise ValueError(f"override {key!r}: " + ("unknown key" if not owners else
                                 f"ambiguous, name the section: {[o + '.' + key for o in owners]}"))
            routed[owners[0]].append(item)
    return routed


def load_stage_config(stage: str, config_file=None, overrides=()):
    """-> (model config, TrainConfig, DataConfig, DeepSpeed overrides as a list of `key=value`)."""
    from dalle_ar.engine import TrainConfig, apply_overrides

    classes = {"model": _model_config_cls(stage), "train": TrainConfig, "data": DataConfig}
    raw = {}
    if config_file:
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"config file {config_file} not found")
        try:
            raw = json.loads(Path(config_file).read_text())
        except ValueError as e:
            raise ValueError(f"config file {config_file}: invalid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {config_file}: expected a JSON object with model/train/data sections")
    unknown = set(raw) - set(classes)
    if unknown:
        raise ValueError(f"config {config_file}: unknown section(s) {sorted(unknown)}; use model/train/data")
    routed = route_overrides(list(overrides), {name: {f.name for f in dataclasses.fields(cls)}
                                               for name, cls in classes.items()})
    configs = [apply_overrides(config_from_dict(cls, raw.get(name, {})), routed[name])
               for name, cls in classes.items()]
    return (*configs, routed["ds"])


# ---- helpers shared by the stages -------------------------------------------------------------

def check_shards(shards, option: str) -> None:
    """Before any training: `shards` must name at least one shard, and every local one must exist
    (URLs and `pipe:` commands are left to the loader)."""
    from dalle_ar.data import expand_shards

    try:
        urls = expand_shards(shards)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise ValueError(f"{option}: {len(missing)} of {len(urls)} shard(s) not found, e.g. {missing[:3]}")


def shards_have_codes(shards) -> bool:
    """True if the first shard's first sample carries pre-encoded `codes.npy`."""
    import tarfile

    from dalle_ar.data import expand_shards

    first = expand_shards(shards)[0]
    if first.startswith("pipe:"):
        return False
    with tarfile.open(first) as tar:
        for member in tar:
            if member.name.endswith(".codes.npy"):
                return True
            if member.name.endswith((".png", ".jpg", ".jpeg", ".txt")):
                continue
    return False


def save_grid(images: torch.Tensor, nrow: int, path: Path, writer=None, tag: str = "", step: int = 0,
              captions=None):
    """Save float [B,3,H,W] images as one PNG grid (and to TensorBoard when a writer is given), on rank 0
    only; `captions` go to a .txt beside it, one per row."""
    from dalle_ar.engine import is_rank0
    from dalle_ar.pipeline import image_grid, to_pil

    if not is_rank0():
        return None

    pil = to_pil(images)
    rows = [pil[i:i + nrow] for i in range(0, len(pil), nrow)]
    sheet = image_grid(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    if captions is not None:
        path.with_suffix(".txt").write_text("\n".join(captions) + "\n")
    if writer is not None:
        import numpy as np
        writer.add_image(tag, np.asarray(sheet), step, dataformats="HWC")
    return path


# ---- stages -------------------------------------------------------------------------------------

class Stage:
    """What the engine needs from a stage: a model, a loss, batches, hooks, and an export step."""

    name = ""

    def __init__(self, model_cfg, train_cfg, data_cfg, train_shards, val_shards, out):
        self.model_cfg, self.train_cfg, self.data = model_cfg, train_cfg, data_cfg
        self.train_shards, self.val_shards = train_shards, val_shards
        self.out = Path(out)
        self.loader = None

    # subclasses: build_model, loss_fn, on_checkpoint, evaluate
    def loader_kwargs(self) -> dict:
        return {}

    def make_loader(self, shards, training=True, **extra):
        from dalle_ar.data import ShardLoader

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
        from dalle_ar.data import iter_raw_samples
        from dalle_ar.data.loader import preprocess_image

        images, captions = [], []
        for sample in iter_raw_samples(self.val_shards or self.train_shards):
            if sample["image"] is not None:
                images.append(preprocess_image(sample["image"], self.data.image_size))
            captions.append(sample["captions"][0])
            if len(captions) == n:
                break
        return {"image": torch.stack(images) if images else None, "caption": captions}

    def finish_export(self, export_dir: Path) -> None:
        """Anything besides config.json + model.safetensors that the export needs."""

    def evaluate(self, model) -> dict:
        return {}

    def hooks(self):
        return {"on_checkpoint": self.on_checkpoint, "skipped_counts": self.skipped_counts}

    def on_checkpoint(self, step, model, writer):
        pass


class DVAEStage(Stage):
    name = "dvae"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # The decoder-only phase wants a fresh LR schedule: restart it there unless train.restart_at says.
        hard = self.model_cfg.hard_codes_from_step
        if hard and not self.train_cfg.restart_at:
            self.train_cfg = dataclasses.replace(self.train_cfg, restart_at=hard)

    def build_model(self):
        from dalle_ar.dvae import DiscreteVAE

        if self.model_cfg.image_size != self.data.image_size:
            self.data = dataclasses.replace(self.data, image_size=self.model_cfg.image_size)
        return DiscreteVAE(self.model_cfg)

    def loss_fn(self, model, batch, step):
        # Channels-last activations: ~1.15x faster dVAE steps on this 2-core CPU. (Channels-last weights
        # would be faster still, but DeepSpeed's broadcast and ZeRO's flat buffers want contiguous ones.)
        return model(batch["image"].contiguous(memory_format=torch.channels_last), step=step)

    def loader_kwargs(self):
        return {"image_size": self.model_cfg.image_size}

    @torch.no_grad()
    def on_checkpoint(self, step, model, writer):
        batch = self.fixed_batch(self.data.sample_count)
        x = batch["image"].to(next(model.parameters()).device)
        was = model.training
        model.eval()
        recon = model.decode(model.encode(x))
        model.train(was)
        save_grid(torch.cat([x, recon.float()]).cpu(), x.shape[0], self.out / "samples" / f"step{step:08d}.png",
                  writer, "dvae/originals_vs_reconstructions", step)

    @torch.no_grad()
    def evaluate(self, model):
        from dalle_ar.dvae import codebook_usage, psnr

        if not self.val_shards:
            return {}
        model.eval()
        dev = next(model.parameters()).device
        scores, codes = [], []
        for batch in self.make_loader(self.val_shards, training=False, num_workers=0):
            x = batch["image"].to(dev)
            c = model.encode(x)
            codes.append(c.cpu())
            scores.append(float(psnr(model.decode(c).float(), x)) * x.shape[0])
        n = sum(c.shape[0] for c in codes)
        usage = codebook_usage(torch.cat(codes), model.config.vocab_size)
        return {"val_psnr": sum(scores) / max(n, 1), "val_images": n, **{f"codebook_{k}": float(v) for k, v in usage.items()}}


class DALLEStage(Stage):
    name = "dalle"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        from dalle_ar.dvae import DiscreteVAE
        from dalle_ar.tokenizer import TextTokenizer

        if not self.data.tokenizer or not self.data.dvae:
            raise ValueError("the dalle stage needs data.tokenizer and data.dvae (paths to trained ones)")
        self.tokenizer = TextTokenizer.from_pretrained(self.data.tokenizer)
        self.dvae = DiscreteVAE.from_pretrained(self.data.dvae).eval().requires_grad_(False)
        # The model's vocabularies and grid follow the tokenizer and the dVAE unless set.
        fill = {}
        if not self.model_cfg.text_vocab_size:
            fill["text_vocab_size"] = self.tokenizer.vocab_size
        if not self.model_cfg.image_vocab_size:
            fill["image_vocab_size"] = self.dvae.config.vocab_size
        if not self.model_cfg.image_grid:
            fill["image_grid"] = self.dvae.grid_size
        self.model_cfg = dataclasses.replace(self.model_cfg, **fill)
        if self.model_cfg.image_vocab_size != self.dvae.config.vocab_size or self.model_cfg.image_grid != self.dvae.grid_size:
            raise ValueError("model.image_vocab_size / model.image_grid disagree with the dVAE")
        if self.tokenizer.vocab_size > self.model_cfg.text_vocab_size:
            raise ValueError(f"model.text_vocab_size={self.model_cfg.text_vocab_size} < tokenizer vocab "
                             f"{self.tokenizer.vocab_size}")
        self.data = dataclasses.replace(self.data, image_size=self.dvae.config.image_size)
        self.codes = shards_have_codes(self.train_shards)

    def build_model(self):
        from dalle_ar.dalle import DALLE

        return DALLE(self.model_cfg)

    def loader_kwargs(self):
        return {"decode_images": not self.codes,
                "text_encoder": self.tokenizer.encoder(self.model_cfg.text_len, dropout=self.data.bpe_dropout)}

    def batch_codes(self, batch, device):
        if "codes" in batch:
            return batch["codes"]
        self.dvae.to(device)
        with torch.no_grad():
            return self.dvae.encode(batch["image"].float())

    def loss_fn(self, model, batch, step):
        return model(batch["text"], self.batch_codes(batch, batch["text"].device))

    def prompts(self):
        if self.data.sample_prompts:
            return list(self.data.sample_prompts)
        batch = self.fixed_batch(self.data.sample_count)
        return list(batch["caption"])

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

    @torch.no_grad()
    def evaluate(self, model):
        if not self.val_shards:
            return {}
        model.eval()
        dev = next(model.parameters()).device
        tot = {"loss_text": 0.0, "loss_image": 0.0}
        n = 0
        loader = self.make_loader(self.val_shards, training=False, num_workers=0,
                                  decode_images=not shards_have_codes(self.val_shards))
        for batch in loader:
            text = batch["text"].to(dev)
            codes = batch["codes"].to(dev) if "codes" in batch else self.batch_codes({"image": batch["image"].to(dev)}, dev)
            _, parts = model(text, codes)
            for k in tot:
                tot[k] += float(parts[k]) * text.shape[0]
            n += text.shape[0]
        return {f"val_{k}": v / max(n, 1) for k, v in tot.items()} | {"val_samples": n}


class CLIPStage(Stage):
    name = "clip"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        from dalle_ar.tokenizer import TextTokenizer

        if not self.data.tokenizer:
            raise ValueError("the clip stage needs data.tokenizer (a trained tokenizer directory)")
        self.tokenizer = TextTokenizer.from_pretrained(self.data.tokenizer)

    def build_model(self):
        from dalle_ar.rerank import build_small_clip

        self.model, self.clip_tokenizer, self.processor = build_small_clip(
            self.tokenizer, self.model_cfg, image_size=self.data.image_size, text_len=self.data.text_len)
        return self.model

    def loss_fn(self, model, batch, step):
        from dalle_ar.rerank import clip_inputs, clip_loss

        return clip_loss(model, **clip_inputs(batch["image"], batch["caption"], self.clip_tokenizer,
                                              self.processor, text_len=self.data.text_len))

    def finish_export(self, export_dir):
        self.clip_tokenizer.save_pretrained(export_dir)
        self.processor.save_pretrained(export_dir)

    @torch.no_grad()
    def evaluate(self, model):
        from dalle_ar.rerank import clip_inputs, retrieval_accuracy

        if not self.val_shards:
            return {}
        model.eval()
        dev = next(model.parameters()).device
        acc, n = 0.0, 0
        for batch in self.make_loader(self.val_shards, training=False, num_workers=0):
            inputs = clip_inputs(batch["image"].to(dev), batch["caption"], self.clip_tokenizer, self.processor,
                                 text_len=self.data.text_len)
            acc += retrieval_accuracy(model, **inputs) * len(batch["caption"])
            n += len(batch["caption"])
        return {"val_retrieval_top1": acc / max(n, 1), "val_batch": self.train_cfg.batch_size, "val_samples": n}


STAGES = {"dvae": DVAEStage, "dalle": DALLEStage, "clip": CLIPStage}


def run_stage(stage: str, train_shards, out, *, val_shards=None, config_file=None, ds_config=None,
              overrides=(), steps=None, batch_size=None, save_every=None, resume=False) -> dict:
    """Train one stage through the shared engine, export it to OUT/export, evaluate; returns a summary."""
    from dalle_ar import engine

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    overrides = list(overrides)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("save_every", save_every)):
        if value is not None:
            overrides.append(f"train.{name}={value}")
    model_cfg, train_cfg, data_cfg, ds_over = load_stage_config(stage, config_file, overrides)
    check_shards(train_shards, "--train-shards")  # every input checked before the first step
    if val_shards:
        check_shards(val_shards, "--val-shards")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder")
    st = STAGES[stage](model_cfg, train_cfg, data_cfg, train_shards, val_shards, out)
    train_cfg = st.train_cfg  # as the stage completed it
    engine.seed_everything(train_cfg.seed)  # initial weights follow train.seed
    model = st.build_model()
    out.mkdir(parents=True, exist_ok=True)

    def on_start(step):  # only once the engine accepted the run: a refused one leaves the old stage.json
        if engine.is_rank0():
            write_json(out / STAGE_FILE, {
                "stage": stage, "train_shards": train_shards, "val_shards": val_shards,
                "config": {"model": dataclasses.asdict(st.model_cfg), "train": dataclasses.asdict(train_cfg),
                           "data": dataclasses.asdict(st.data)}})

    result = engine.train(model, st.loss_fn, st.make_batches, train_cfg, out,
                          ds_config=engine.load_ds_config(ds_config, ds_over), hooks={**st.hooks(), "on_start": on_start},
                          resume=resume)
    if result.get("export_dir") and engine.is_rank0():
        st.finish_export(Path(result["export_dir"]))
        metrics = st.evaluate(model)
        if metrics:
            write_json(out / "metrics.json", metrics)
            result["metrics"] = metrics
    return result


def export_run(run_dir, out) -> Path:
    """`dalle-ar export`: consolidate the newest complete checkpoint of a run into OUT."""
    from dalle_ar import engine

    run_dir = Path(run_dir)
    meta_path = next((p / STAGE_FILE for p in (run_dir, run_dir.parent) if (p / STAGE_FILE).is_file()), None)
    if meta_path is None:
        raise ValueError(f"{run_dir} is not a training run: no {STAGE_FILE} in it or its parent")
    meta = json.loads(meta_path.read_text())
    model_cfg, train_cfg, data_cfg, _ = load_stage_config(meta["stage"])
    cfg = meta["config"]
    model_cfg = config_from_dict(type(model_cfg), cfg["model"])
    train_cfg = config_from_dict(type(train_cfg), cfg["train"])
    data_cfg = config_from_dict(DataConfig, cfg["data"])
    st = STAGES[meta["stage"]](model_cfg, train_cfg, data_cfg, meta["train_shards"], meta.get("val_shards"),
                               meta_path.parent)
    model = st.build_model()
    engine.export_checkpoint(meta_path.parent, model, out)
    st.finish_export(Path(out))
    return Path(out)
