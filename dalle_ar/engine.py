"""The one training loop: every stage (dVAE, prior, CLIP) trains through `train()` on a DeepSpeed engine.

    summary = train(model, loss_fn, make_batches, TrainConfig(...), out_dir)

The contract for stage authors:

- `model`: an nn.Module with `.save_pretrained(dir, state_dict=None)` (the export writes
  `config.json` + `model.safetensors` through it).
- `loss_fn(model, batch, step) -> (loss, parts)`. `model` is the DeepSpeed engine: call it like the
  module (`model(x, ...)` runs `module.forward` through the engine); attributes and methods pass
  through to the module (`model.config`, `model.encode`). The loss must come from calling
  `model(...)`: under ZeRO the engine's forward installs the backward hooks ZeRO needs (measured:
  a forward through `engine.module(...)` gives wrong ZeRO-3 updates with gradient accumulation).
  `batch` is what `make_batches` yielded with every tensor moved to the engine's device (floating
  tensors cast to bf16/fp16 under `precision=bf16|fp16`). `parts` are scalars to log.
- `make_batches(epoch) -> iterable`: one pass over this rank's data (rank splitting is the
  loader's job); when it ends the engine calls `make_batches(epoch + 1)`. One batch = one
  micro-batch; `cfg.grad_accum` of them make one optimizer step.
- `hooks` (dict or object, every entry optional), called on EVERY rank (ZeRO-3 forwards need all
  ranks); write files only where `writer is not None` (rank 0):
    on_start(step)                     once the engine has accepted the run (fresh, or its checkpoint
                                       loaded), before the first step: a refused run writes nothing
    on_step(step, parts)               after each optimizer step, parts as floats (this rank's mean)
    on_checkpoint(step, model, writer) after each complete checkpoint; `model` is the module (eval
                                       mode, no grad, full weights gathered under ZeRO-3), `writer`
                                       the TensorBoard SummaryWriter or None
    skipped_counts() -> dict           the loader's skip counters; summed over ranks and logged
- `out_dir` receives `checkpoints/step00001000/` (DeepSpeed checkpoints; a tag counts only once it
  holds the `complete` marker), `tb/` (TensorBoard), `export/` (config.json + model.safetensors, fp32).

Non-finite losses are caught before backward on every rank alike: the micro-batch is dropped (with
grad_accum=1 the step is skipped) and counted; `max_nonfinite` in a row raise RuntimeError. Under fp16,
DeepSpeed's dynamic loss scaling skips steps whose gradients overflow; those count as skipped_steps.
SIGTERM/SIGINT finish the current step, checkpoint and return with summary["interrupted"] = True.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch._utils import _unflatten_dense_tensors

from dalle_ar.io import atomic_path, write_json



def _config_dir() -> Path:
    """train/configs: beside the package in a source checkout, inside it (dalle_ar/train) once installed."""
    here = Path(__file__).resolve().parent
    for d in (here / "train" / "configs", here.parent / "train" / "configs"):
        if d.is_dir():
            return d
    return here / "train" / "configs"


CONFIG_DIR = _config_dir()
TAG_RE = re.compile(r"^step(\d{8})$")
COMPLETE = "complete"            # marker file inside a tag dir, written last
STATE_FILE = "trainer_state.json"
FP32_FILE = "fp32_weights.safetensors"  # ZeRO-0 bf16/fp16 only: the fp32 master weights
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "halving", "constant")


@dataclass
class TrainConfig:
    """Everything the loop needs; saved with every checkpoint. DeepSpeed's JSON follows it (see
    `resolve_ds_config`): batch_size, grad_accum, grad_clip, zero_stage and precision are written into it."""

    steps: int = 1000                 # optimizer steps (each = grad_accum micro-batches per rank)
    batch_size: int = 8               # micro-batch per process (train_micro_batch_size_per_gpu)
    grad_accum: int = 1               # micro-batches per optimizer step (gradient_accumulation_steps)
    lr: float = 3e-4                  # peak learning rate
    min_lr: float = 3e-5              # floor of the cosine and halving schedules
    warmup: int = 100                 # linear warm-up steps from 0
    schedule: str = "cosine"          # after warm-up: cosine to min_lr | halving | constant
    halve_every: int = 0              # halving: halve the LR every N steps after warm-up (paper-style)
    restart_at: int = 0               # >0: the schedule starts over here (warm-up, then down to min_lr at
                                      # `steps`), e.g. for the dVAE's final decoder-only phase
    weight_decay: float = 4.5e-2      # paper; applied to weight matrices only
    betas: tuple = (0.9, 0.96)        # paper
    eps: float = 1e-8
    grad_clip: float = 4.0            # paper: clip the global norm at 4 (0 disables)
    seed: int = 0
    save_every: int = 500             # checkpoint every N steps (0: only at the end)
    keep_last: int = 2                # complete checkpoints kept
    log_every: int = 10
    zero_stage: int = 0               # 0 | 1 | 2 | 3
    precision: str = "fp32"           # fp32 | bf16 | fp16 (bf16.enabled / fp16.enabled in DeepSpeed)
    max_nonfinite: int = 10           # consecutive non-finite losses before giving up
    progress: bool = True             # tqdm bar on rank 0 (only when stderr is a terminal)
    tensorboard: bool = True          # SummaryWriter in out_dir/tb on rank 0
    export: bool = True               # write out_dir/export at the end

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "grad_accum", "keep_last", "log_every", "max_nonfinite"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup", "save_every", "seed", "halve_every", "restart_at"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(self.lr > 0, "lr", "> 0")
        need(0 <= self.min_lr <= self.lr, "min_lr", "in [0, lr]")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.grad_clip >= 0, "grad_clip", ">= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        self.betas = tuple(self.betas)
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        need(self.zero_stage in (0, 1, 2, 3), "zero_stage", "0, 1, 2 or 3")
        need(self.schedule != "halving" or self.halve_every > 0, "halve_every", "> 0 with schedule='halving'")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0 to cfg.lr, then cosine down to cfg.min_lr at cfg.steps, or halved every
    cfg.halve_every steps down to cfg.min_lr (the paper halves on plateaus; a fixed period resumes
    exactly), or constant. With cfg.restart_at, [0, restart_at) and [restart_at, steps) each run the
    whole schedule."""
    end = cfg.steps
    if 0 < cfg.restart_at < cfg.steps:
        if step >= cfg.restart_at:
            step, end = step - cfg.restart_at, cfg.steps - cfg.restart_at
        else:
            end = cfg.restart_at
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "halving":
        return max(cfg.min_lr, cfg.lr * 0.5 ** ((step - cfg.warmup) // cfg.halve_every))
    t = min(1.0, (step - cfg.warmup) / max(1, end - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


# ---- overrides and the DeepSpeed config --------------------------------------------------------

def _coerce(key: str, text: str, current):
    """Parse `text` for a field whose current value is `current` (its type decides)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = text  # bare words stay strings: precision=bf16
    if current is None or isinstance(current, dict):
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"override {key!r}: expected true or false, got {text!r}")
        return value
    if isinstance(current, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(current, (int, float)) and value == "auto":
                return value
            raise ValueError(f"override {key!r}: expected a number, got {text!r}")
        if isinstance(current, int) and not (isinstance(value, int) or float(value).is_integer()):
            raise ValueError(f"override {key!r}: expected an integer, got {text!r}")
        return type(current)(value)
    if isinstance(current, (list, tuple)):
        if not isinstance(value, list):
            raise ValueError(f"override {key!r}: expected a JSON list like [0.9, 0.96], got {text!r}")
        return type(current)(value)
    if isinstance(current, str):
        return text if not isinstance(value, str) else value
    return value


def apply_overrides(target, overrides, *, allow_new: bool = False):
    """Apply `a.b=value` overrides to a dict or a dataclass; returns a new object (the input is untouched).

    The value is parsed as JSON and coerced to the type of the value it replaces (`lr=1` -> 1.0,
    `betas=[0.9,0.95]` -> tuple, `precision=bf16` -> "bf16"). An unknown key is a ValueError naming it,
    unless `allow_new` (dicts only; used for DeepSpeed sections, which DeepSpeed validates itself).
    """
    is_dc = dataclasses.is_dataclass(target) and not isinstance(target, type)
    data = dataclasses.asdict(target) if is_dc else json.loads(json.dumps(target))
    for item in overrides or ():
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        node = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if not isinstance(node, dict) or (part not in node and not (allow_new and not is_dc)):
                where = type(target).__name__ if is_dc else "config"
                known = sorted(node) if isinstance(node, dict) else []
                raise ValueError(f"override {key!r}: unknown key {'.'.join(path[:i + 1])!r} in {where}; known: {known}")
            if last:
                node[part] = _coerce(key, text, node.get(part))
            else:
                node = node.setdefault(part, {})
    if is_dc:
        fields = {f.name: f for f in dataclasses.fields(target)}
        kw = {k: tuple(v) if isinstance(fields[k].default, tuple) and isinstance(v, list) else v for k, v in data.items()}
        return type(target)(**kw)
    return data


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_ds_config(path_or_dict=None, overrides=None, cfg: Optional[TrainConfig] = None) -> dict:
    """The user's DeepSpeed config: a JSON file or a dict (None: {}), plus overrides (a nested dict merged
    in, or `key=value` strings with dotted keys). With `cfg`, returns the resolved full config
    (`resolve_ds_config`); without, the explicit part only (`train()` resolves it)."""
    if path_or_dict is None:
        ds = {}
    elif isinstance(path_or_dict, dict):
        ds = json.loads(json.dumps(path_or_dict))
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {path} not found")
        try:
            ds = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"DeepSpeed config {path}: invalid JSON ({e})") from None
    if isinstance(overrides, dict):
        ds = _deep_merge(ds, overrides)
    elif overrides:
        ds = apply_overrides(ds, list(overrides), allow_new=True)
    return resolve_ds_config(cfg, ds)[1] if cfg is not None else ds


def _get(d: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


# TrainConfig field <-> DeepSpeed key, for the keys both describe.
_OWNED = {"batch_size": "train_micro_batch_size_per_gpu", "grad_accum": "gradient_accumulation_steps",
          "grad_clip": "gradient_clipping", "zero_stage": "zero_optimization.stage"}


def resolve_ds_config(cfg: TrainConfig, user_ds: Optional[dict] = None) -> tuple[TrainConfig, dict]:
    """Merge the user's DeepSpeed dict over the packaged `train/configs/zero<stage>.json` and make it agree
    with `cfg`. Returns (cfg, full ds config).

    For each key both describe (batch_size, grad_accum, grad_clip, zero_stage, precision): "auto" or absent
    in the DeepSpeed dict -> the TrainConfig value; an explicit DeepSpeed value equal to it -> fine;
    different while the TrainConfig field is at its default -> the DeepSpeed value is adopted into cfg
    (so `--deepspeed-config zero3.json` alone selects ZeRO-3); different otherwise -> ValueError naming both.
    """
    user = json.loads(json.dumps(user_ds or {}))
    if "scheduler" in user:
        raise ValueError("DeepSpeed config: remove 'scheduler'; the engine owns the LR schedule "
                         "(train.lr, train.min_lr, train.warmup, train.schedule)")
    defaults = TrainConfig()
    changes = {}
    for field, key in _OWNED.items():
        value = _get(user, key, "auto")
        mine = getattr(cfg, field)
        if value == "auto" or value == mine:
            continue
        if mine == getattr(defaults, field):
            try:
                changes[field] = type(mine)(value)
            except (TypeError, ValueError):
                raise ValueError(f"DeepSpeed config {key}={value!r}: expected {type(mine).__name__}") from None
        else:
            raise ValueError(f"DeepSpeed config sets {key}={value!r} but train.{field}={mine!r}; "
                             f"set one of them (or make the DeepSpeed value \"auto\")")
    bf16, fp16 = _get(user, "bf16.enabled", "auto"), _get(user, "fp16.enabled", "auto")
    implied = "bf16" if bf16 is True else "fp16" if fp16 is True else "fp32" if (bf16, fp16) == (False, False) else None
    if bf16 is True and fp16 is True:
        raise ValueError("DeepSpeed config enables both bf16 and fp16")
    if implied and implied != cfg.precision:
        if cfg.precision == defaults.precision:
            changes["precision"] = implied
        else:
            raise ValueError(f"DeepSpeed config implies precision {implied} (bf16.enabled={bf16}, "
                             f"fp16.enabled={fp16}) but train.precision={cfg.precision!r}")
    if implied is None and ((cfg.precision == "bf16" and bf16 is False) or (cfg.precision == "fp16" and fp16 is False)):
        raise ValueError(f"DeepSpeed config disables {cfg.precision} but train.precision={cfg.precision!r}")
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
        if is_rank0():
            print(f"[engine] TrainConfig follows the DeepSpeed config: {changes}", flush=True)

    template = CONFIG_DIR / f"zero{cfg.zero_stage}.json"
    if not template.is_file():
        raise FileNotFoundError(f"packaged DeepSpeed config {template} is missing (a broken install?)")
    ds = _deep_merge(json.loads(template.read_text()), user)
    for field, key in _OWNED.items():
        _set(ds, key, getattr(cfg, field))
    _set(ds, "bf16.enabled", cfg.precision == "bf16")
    _set(ds, "fp16.enabled", cfg.precision == "fp16")
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    # With several micro-batches a step, step() is the accumulation boundary and backward() only
    # accumulates: a dropped (non-finite) micro-batch then cannot desynchronise DeepSpeed's counters.
    ds.setdefault("managed_gradient_accumulation", cfg.grad_accum == 1)
    ds.setdefault("steps_per_print", 10**9)
    if "optimizer" in ds:  # DeepSpeed builds it (e.g. CPU Adam for offload); hyper-parameters from cfg
        params = ds["optimizer"].setdefault("params", {})
        for k, v in (("lr", cfg.lr), ("betas", list(cfg.betas)), ("eps", cfg.eps), ("weight_decay", cfg.weight_decay)):
            if params.get(k, "auto") == "auto":
                params[k] = v
        if str(ds["optimizer"].get("type", "")).lower() in ("adam", "adamw") and not torch.cuda.is_available():
            params.setdefault("torch_adam", True)  # FusedAdam would JIT-compile for ~80 s on CPU
    return cfg, ds


# ---- distributed --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_rank0() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed once: gloo on CPU, nccl on CUDA.

    Without a launcher (no RANK/WORLD_SIZE), runs as a world of one on a free local port. Under a bare
    `srun` (no torchrun/deepspeed launcher), SLURM's task ids are mapped when MASTER_ADDR is set.
    """
    if torch.distributed.is_initialized():
        return
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env.get("SLURM_NTASKS", "1"),
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    if env.get("WORLD_SIZE", "1") == "1":
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            env.setdefault(k, v)
        env.setdefault("MASTER_PORT", str(_free_port()))
    # JIT-built ops land in one reusable cache instead of torch's default per-user dir.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dalle_ar" / "torch_extensions"))

    import warnings

    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    # torch 2.13 flags the collectives DeepSpeed's ZeRO calls every step; not ours to fix.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)

    cpu = get_accelerator().device_name() == "cpu"
    if not cpu and torch.cuda.is_available():  # before any collective: rank k's NCCL traffic on GPU k, not GPU 0
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    if cpu and env.get("DALLE_AR_SHM_COMM", "0") != "1":
        # DeepSpeed JIT-compiles a shared-memory all-reduce (~50 s) at every init on CPU; only inference
        # tensor-parallelism uses it. Marking it incompatible skips the build; gloo does the training comms.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", verbose=False)


def _world() -> tuple[int, int]:
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _small_tensor(values: list, dtype) -> torch.Tensor:
    """A tensor for a control collective: NCCL reduces only CUDA tensors (on the rank's own GPU)."""
    return torch.tensor(values, dtype=dtype, device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")


def _all_true(flag: bool, world: int) -> bool:
    """True only if `flag` is True on every rank (every rank gets the same answer)."""
    if world == 1:
        return flag
    t = _small_tensor([1 if flag else 0], torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ---- seeds and the per-rank state --------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """RNG states as JSON-able values (no pickle)."""
    np_state = np.random.get_state()
    py = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [py[0], list(py[1]), py[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---- checkpoints ---------------------------------------------------------------------------------

def _tags(ckpt_dir: Path) -> list[tuple[int, str, bool]]:
    """(step, tag, complete) of every tag dir, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = [(int(m.group(1)), p.name, (p / COMPLETE).is_file())
           for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(out)


def latest_checkpoint(ckpt_dir) -> Optional[str]:
    """The newest tag with a `complete` marker (DeepSpeed's `latest` file is not trusted: it can name a
    checkpoint whose write was interrupted)."""
    done = [tag for _, tag, ok in _tags(Path(ckpt_dir)) if ok]
    return done[-1] if done else None


def _checkpoint_dir(path) -> Path:
    """A run dir (holding checkpoints/) or the checkpoints dir itself."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    tags = _tags(ckpt_dir)
    done = [t for t in tags if t[2]]
    keep = {tag for _, tag, _ in done[-keep_last:]}
    newest = done[-1][0] if done else -1
    for step, tag, ok in tags:
        # old complete ones beyond keep_last, and interrupted ones older than the newest complete one
        if tag not in keep and (ok or step < newest):
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def _param_shapes(module) -> dict:
    """name -> shape of every parameter (the full shape under ZeRO-3, where the live tensor is a shard)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()}


def _check_resumable(tag_dir: Path, cfg: TrainConfig, world: int, shapes: dict) -> None:
    """ValueError, before DeepSpeed reads a byte, if the checkpoint cannot continue this run: other
    parameter shapes (a changed model config), or another batch size, accumulation or process count
    (the saved data position counts batches, so it would point elsewhere in the data)."""
    path = tag_dir / STATE_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    theirs = saved.get("param_shapes")
    if theirs is not None and theirs != shapes:
        bad = [f"{k} {theirs.get(k)} -> {shapes.get(k)}" for k in sorted(set(theirs) | set(shapes))
               if theirs.get(k) != shapes.get(k)]
        raise ValueError(f"--resume: checkpoint {tag_dir} holds another model ({len(bad)} parameter(s) differ, "
                         f"e.g. {bad[:3]}); resume with the run's model config, or train into a new output directory")
    old = saved.get("cfg", {})
    then = (old.get("batch_size"), old.get("grad_accum"), saved.get("world_size"))
    if None not in then and then != (cfg.batch_size, cfg.grad_accum, world):
        raise ValueError(f"--resume: checkpoint {tag_dir} was written with train.batch_size={then[0]}, "
                         f"train.grad_accum={then[1]} on {then[2]} process(es); this run has {cfg.batch_size}, "
                         f"{cfg.grad_accum} on {world}. The saved data position counts batches, so it would not "
                         f"continue where the run stopped: resume with the same values, or train into a new "
                         f"output directory")


# ---- batches -------------------------------------------------------------------------------------

class _Batches:
    """make_batches(epoch) as one endless stream that knows its position (epoch, batch within it)."""

    def __init__(self, make_batches, epoch: int = 0, batch_in_epoch: int = 0, skipped_counts=None):
        self.make_batches, self.epoch, self.batch_in_epoch = make_batches, epoch, 0
        self.skipped_counts = skipped_counts  # the loader's skip counters, to say why an epoch was empty
        self.it = iter(make_batches(epoch))
        for _ in range(batch_in_epoch):  # resume: replay the part of the epoch already trained on
            self.next()

    def next(self):
        for fresh in (False, True):
            try:
                batch = next(self.it)
                self.batch_in_epoch += 1
                return batch
            except StopIteration:
                if fresh:
                    raise ValueError(f"make_batches({self.epoch}) yielded no batches: {self._why_empty()}") from None
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self.it = iter(self.make_batches(self.epoch))


    def _why_empty(self) -> str:
        skipped = {k: v for k, v in (self.skipped_counts() if self.skipped_counts else {}).items() if v}
        if any(k.startswith("shard") for k in skipped):
            return (f"shards were missing or unreadable and every sample was skipped (skipped so far: {skipped}); "
                    f"check the shard paths")
        if skipped:
            return f"every sample was skipped as bad (skipped so far: {skipped}); check the data"
        return ("the data holds no samples, or fewer than one batch per process (the last partial batch is "
                "dropped in training): use more data or a smaller batch size")


def _to_device(batch, device, dtype):
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.to(dtype) if dtype is not None and batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in batch):
        return type(batch)(_to_device(v, device, dtype) for v in batch)
    return batch


def _batch_len(batch) -> int:
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
        if isinstance(v, (list, tuple)):
            return len(v)
    return 1


# ---- optimizer -----------------------------------------------------------------------------------

_NO_DECAY_MODULES = (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.LocalResponseNorm,
                     torch.nn.modules.batchnorm._NormBase) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norms, embeddings (modules or parameters
    named *emb*), nor names listed by an optional `model.no_weight_decay()`."""
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, seen = [], [], set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            skip = (p.dim() < 2 or isinstance(module, _NO_DECAY_MODULES) or "emb" in pname.lower()
                    or type(module).__name__.endswith(("Norm", "Embedding")) or full in extra)
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ---- export --------------------------------------------------------------------------------------

def _save_export(model, state_dict: dict, out_dir) -> Path:
    """model.save_pretrained into out_dir, atomically (a crash leaves the previous export or nothing)."""
    out_dir = Path(out_dir)
    sd = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
          for k, v in state_dict.items()}
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=sd)
    return out_dir


def _deepspeed_checkpoint_globals() -> list:
    """The classes DeepSpeed 0.19's checkpoint files pickle besides tensors and plain containers, measured
    with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0/1/2/3 x fp32/bf16 x 1/2 processes
    (docs/checkpoints.md). Each is rebuilt from its fields; none runs code on load. DynamicLossScaler is
    the fp16 twin of LossScaler (fp16 cannot run on a CPU to measure it)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every torch.load (DeepSpeed's too, which pass weights_only=False) is a weights_only load
    allowing only `_deepspeed_checkpoint_globals()`: a run folder from elsewhere cannot run code here. A file
    that asks for anything else is a ValueError naming the file and the global."""
    import pickle

    real = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return real(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            what = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
            raise ValueError(f"{f}: refused to unpickle {what.group(1) if what else 'it'}: checkpoint files may "
                             f"hold tensors and DeepSpeed's own state only (a pickle can run code; see "
                             f"docs/checkpoints.md)") from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
            yield
    finally:
        torch.load = real


def _state_dict_from_checkpoint(ckpt_dir: Path, tag: str) -> dict:
    """fp32 weights of one checkpoint tag, whatever the ZeRO stage that wrote it."""
    tag_dir = ckpt_dir / tag
    if (tag_dir / FP32_FILE).is_file():
        return load_file(str(tag_dir / FP32_FILE))
    state = json.loads((tag_dir / STATE_FILE).read_text()) if (tag_dir / STATE_FILE).is_file() else {}
    if state.get("cfg", {}).get("zero_stage", 1) == 0 or not list(tag_dir.glob("*optim_states.pt")):
        # ZeRO-0: the module's weights are in the model-states file (weights_only: no pickle code).
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def export_checkpoint(ckpt_dir, model: torch.nn.Module, out_dir, tag: Optional[str] = None) -> Path:
    """Consolidate the newest complete checkpoint (or `tag`) of a run into `out_dir` as config.json +
    model.safetensors (fp32), through `model.save_pretrained`. `ckpt_dir` is a run dir or its
    checkpoints/. The weights are also loaded into `model` (strictly: a model of another shape fails).
    Needs no distributed setup; ZeRO-1/2/3 shards are merged with DeepSpeed's zero_to_fp32."""
    ckpt = _checkpoint_dir(ckpt_dir)
    tag = tag or latest_checkpoint(ckpt)
    if tag is None or not (ckpt / tag / COMPLETE).is_file():
        raise FileNotFoundError(f"no complete checkpoint in {ckpt}" + (f" with tag {tag}" if tag else ""))
    sd = _state_dict_from_checkpoint(ckpt, tag)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {ckpt / tag} does not fit the model: {str(e)[:400]}") from None
    return _save_export(model, sd, out_dir)


def _full_state_dict(engine, cfg: TrainConfig, ckpt: Path, tag: Optional[str], rank: int) -> Optional[dict]:
    """The trained fp32 weights on rank 0 (None elsewhere). Collective under ZeRO-3: call on all ranks."""
    if cfg.precision != "fp32" and cfg.zero_stage > 0 and tag is not None:
        # Mixed precision: the fp32 master weights live in the optimizer shards of the checkpoint.
        return _state_dict_from_checkpoint(ckpt, tag) if rank == 0 else None
    if cfg.zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # gathers layer by layer onto rank 0
    return _zero0_state_dict(engine, cfg) if rank == 0 else None


def _zero0_state_dict(engine, cfg: TrainConfig) -> dict:
    """The module's weights under ZeRO-0; with bf16/fp16 the module is 16-bit and the fp32 master copies
    live in DeepSpeed's FP16 optimizer, so those replace the parameters."""
    sd = engine.module.state_dict()
    if cfg.precision != "fp32":
        opt = engine.optimizer
        masters = getattr(opt, "fp32_groups", None) or [  # FP16_UnfusedOptimizer, else the fused one
            _unflatten_dense_tensors(flat, group) for flat, group in zip(opt.fp32_groups_flat, opt.fp16_groups)]
        fp32 = {id(p): m for group, ms in zip(opt.fp16_groups, masters) for p, m in zip(group, ms)}
        sd.update({name: fp32[id(p)] for name, p in engine.module.named_parameters() if id(p) in fp32})
    return sd


# ---- logging -------------------------------------------------------------------------------------

def _hook(hooks, name) -> Optional[Callable]:
    fn = hooks.get(name) if isinstance(hooks, dict) else getattr(hooks, name, None)
    return fn if callable(fn) else None


def _sum_dicts(d: dict, world: int) -> dict:
    if world == 1:
        return dict(d)
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, dict(d))
    total = {}
    for part in everyone:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def _mean_over_ranks(values: dict, world: int) -> dict:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = _small_tensor([values[k] for k in keys], torch.float64)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, (t / world).tolist()))


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and returns after the current step. A second
    SIGINT interrupts at once."""

    def __init__(self):
        self.stop, self.old = False, {}
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old[sig] = signal.signal(sig, self._handle)

    def _handle(self, sig, frame):
        if self.stop and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True
        print(f"[engine] {signal.Signals(sig).name}: finishing this step, checkpointing, then exiting", flush=True)

    def restore(self):
        for sig, old in self.old.items():
            signal.signal(sig, old)


# ---- the loop --------------------------------------------------------------------------------------

def train(model: torch.nn.Module, loss_fn, make_batches, cfg: TrainConfig, out_dir, ds_config=None,
          hooks=None, resume: bool = False) -> dict:
    """Train `model` for cfg.steps optimizer steps on a DeepSpeed engine (see the module docstring).

    Returns a summary: steps, start_step, first_loss, final_loss, nonfinite (dropped micro-batches),
    skipped_steps (steps without an update), interrupted, checkpoint (newest complete tag dir),
    export_dir (None if interrupted or cfg.export is False), samples_seen, epoch, skipped_samples
    (from hooks.skipped_counts), world_size, zero_stage, precision, seconds.
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    import deepspeed

    t_start = time.time()
    out = Path(out_dir)
    ckpt = out / "checkpoints"
    hooks = hooks or {}
    init_distributed()
    rank, world = _world()
    cfg, ds = resolve_ds_config(cfg, ds_config if isinstance(ds_config, dict) else load_ds_config(ds_config))
    seed_everything(cfg.seed + rank)  # different dropout per rank; DeepSpeed broadcasts rank 0's weights

    groups = param_groups(model, cfg.weight_decay)
    optimizer = None if "optimizer" in ds else torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                                                 weight_decay=cfg.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds,
                                      model_parameters=groups if optimizer is None else None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    # ---- state: fresh or resumed
    st = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "nonfinite": 0, "skipped_steps": 0}
    last_tag = rng = None
    try:  # a refused run frees its engine (another may start in this process)
        if resume:
            last_tag = latest_checkpoint(ckpt)
            if last_tag is None:
                if rank == 0:
                    print(f"[engine] resume: no complete checkpoint in {ckpt}; starting fresh", flush=True)
            else:
                _check_resumable(ckpt / last_tag, cfg, world, _param_shapes(engine.module))
                try:
                    with weights_only_loads():
                        path, client = engine.load_checkpoint(str(ckpt), tag=last_tag)
                except RuntimeError as e:  # a checkpoint of older versions, which recorded no shapes
                    if "state_dict" not in str(e) and "size mismatch" not in str(e):
                        raise
                    raise ValueError(f"checkpoint {ckpt / last_tag} does not fit this model (was the model config "
                                     f"changed?): {str(e)[:400]}") from None
                if path is None:
                    raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt / last_tag}")
                st.update({k: client[k] for k in st if k in client})
                rank_file = ckpt / last_tag / f"rank{rank}.json"
                if rank_file.is_file():  # this rank's RNG and data position
                    mine = json.loads(rank_file.read_text())
                    st.update(epoch=mine["epoch"], batch_in_epoch=mine["batch_in_epoch"])
                    rng = mine["rng"]  # restored after the data replay below, which may draw random numbers
                if rank == 0:
                    print(f"[engine] resumed from {ckpt / last_tag}: step {st['step']}, epoch {st['epoch']}, "
                          f"batch {st['batch_in_epoch']}", flush=True)
            _barrier(world)
            if rank == 0:  # interrupted writes are never resumed from; clear them
                for _, tag, ok in _tags(ckpt):
                    if not ok:
                        shutil.rmtree(ckpt / tag, ignore_errors=True)

        elif latest_checkpoint(ckpt) is not None:
            raise ValueError(f"{ckpt} already holds checkpoints: pass resume=True (--resume) to continue that run, "
                             f"or use a new output directory")
    except BaseException:
        engine.destroy()
        raise

    if (fn := _hook(hooks, "on_start")) is not None:  # the run is accepted: its metadata may be written now
        fn(st["step"])
    writer = bar = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tb"))
        if cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=st["step"], unit="step", dynamic_ncols=True)
    say = (bar.write if bar else lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)

    def save_checkpoint():
        nonlocal last_tag
        tag = f"step{st['step']:08d}"
        client = dict(st, cfg=dataclasses.asdict(cfg), world_size=world)
        engine.save_checkpoint(str(ckpt), tag=tag, client_state=client, save_latest=True)
        write_json(ckpt / tag / f"rank{rank}.json",
                   {"epoch": st["epoch"], "batch_in_epoch": st["batch_in_epoch"], "rng": _rng_state()})
        if rank == 0 and cfg.zero_stage == 0 and cfg.precision != "fp32":  # DeepSpeed saves the module in 16 bits
            save_file({k: v.detach().float().contiguous() for k, v in _zero0_state_dict(engine, cfg).items()},
                      str(ckpt / tag / FP32_FILE))
        _barrier(world)  # every rank's shards are on disk before the marker
        if rank == 0:
            write_json(ckpt / tag / STATE_FILE, dict(client, param_shapes=shapes))
            write_json(ckpt / tag / COMPLETE, {"step": st["step"], "time": time.time()})
            _prune(ckpt, cfg.keep_last)
        _barrier(world)
        last_tag = tag
        if (fn := _hook(hooks, "on_checkpoint")) is not None:
            was = engine.module.training
            engine.module.eval()
            with torch.no_grad(), _gathered(engine.module, cfg):
                fn(st["step"], engine.module, writer)
            engine.module.train(was)
            if writer:
                writer.flush()

    shapes = _param_shapes(engine.module)
    stop = _StopFlag()
    first_loss = final_loss = grad_norm = None
    window = {"t": time.time(), "samples": 0, "steps": 0, "parts": {}, "t0": time.time(), "step0": st["step"]}
    start_step, consecutive, interrupted, ok = st["step"], 0, False, False
    try:
        batches = (_Batches(make_batches, st["epoch"], st["batch_in_epoch"], _hook(hooks, "skipped_counts"))
                   if st["step"] < cfg.steps else None)
        if rng is not None:
            _set_rng_state(rng)
        engine.train()
        for step in range(st["step"], cfg.steps):
            lr = lr_at(step, cfg)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            sums, used = {}, 0
            for _ in range(cfg.grad_accum):
                batch = batches.next()
                n = _batch_len(batch)
                loss, parts = loss_fn(engine, _to_device(batch, engine.device, dtype), step)
                if not _all_true(bool(torch.isfinite(loss.detach()).all()), world):
                    # Decided on all ranks alike, before backward: nothing reaches the weights.
                    st["nonfinite"] += 1
                    consecutive += 1
                    say(f"[engine] step {step}: non-finite loss ({loss.item()}), micro-batch skipped "
                        f"({consecutive} in a row, {st['nonfinite']} in all)")
                    del loss, parts
                    if consecutive >= cfg.max_nonfinite:
                        raise RuntimeError(
                            f"{consecutive} consecutive non-finite losses (limit train.max_nonfinite="
                            f"{cfg.max_nonfinite}) at step {step}: lower train.lr, check the data, or use fp32/bf16")
                    continue
                consecutive = 0
                engine.backward(loss)
                used += 1
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
                window["samples"] += n * world
            if used:  # with grad_accum=1 step() follows the boundary backward; else step() is the boundary
                own_norm = _zero0_grad_norm(engine, cfg)
                engine.step()
                norm = engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else own_norm
            if not used or not engine.was_step_applied():  # all dropped, or an fp16 overflow
                st["skipped_steps"] += 1
            st.update(step=step + 1, epoch=batches.epoch, batch_in_epoch=batches.batch_in_epoch)
            st["samples_seen"] += cfg.grad_accum * world * n
            parts_now = {k: v / used for k, v in sums.items()} if used else {}
            if parts_now:
                final_loss = parts_now["loss"]
                first_loss = final_loss if first_loss is None else first_loss
                window["steps"] += 1
            for k, v in parts_now.items():
                window["parts"][k] = window["parts"].get(k, 0.0) + v
            if (fn := _hook(hooks, "on_step")) is not None:
                fn(step, parts_now)
            if bar:
                bar.update(1)
            if st["step"] % cfg.log_every == 0 or st["step"] == cfg.steps:
                _log(cfg, st, window, hooks, writer, bar, say, world, lr, grad_norm, engine)
            stopping = not _all_true(not stop.stop, world)
            if stopping or (cfg.save_every and st["step"] % cfg.save_every == 0) or st["step"] == cfg.steps:
                save_checkpoint()
            if stopping:
                interrupted = True
                say(f"[engine] stopped by signal at step {st['step']}; checkpoint {ckpt / last_tag}")
                break
        if not interrupted and last_tag != f"step{st['step']:08d}":
            save_checkpoint()  # e.g. resumed at or past cfg.steps with no end checkpoint

        export_dir = None
        if not interrupted and cfg.export:
            sd = _full_state_dict(engine, cfg, ckpt, last_tag, rank)
            if rank == 0:
                _save_export(engine.module, sd, out / "export")
                say(f"[engine] exported {out / 'export'}")
            _barrier(world)
            export_dir = str(out / "export")
        final = _mean_over_ranks({"loss": final_loss} if final_loss is not None else {}, world)
        skipped = _sum_dicts(fn(), world) if (fn := _hook(hooks, "skipped_counts")) else {}
        ok = True
    finally:
        stop.restore()
        if bar:
            bar.close()
        if writer:
            writer.close()
        if not ok:
            engine.destroy()
    _release(engine, cfg)
    return {"steps": st["step"], "start_step": start_step, "first_loss": first_loss, "final_loss": final.get("loss"),
            "nonfinite": st["nonfinite"], "skipped_steps": st["skipped_steps"], "interrupted": interrupted,
            "checkpoint": str(ckpt / last_tag) if last_tag else None, "export_dir": export_dir,
            "samples_seen": st["samples_seen"], "epoch": st["epoch"], "skipped_samples": skipped,
            "world_size": world, "zero_stage": cfg.zero_stage, "precision": cfg.precision,
            "seconds": round(time.time() - t_start, 3)}


def _zero0_grad_norm(engine, cfg) -> Optional[float]:
    """DeepSpeed reports no grad norm for ZeRO-0 fp32: take it from .grad before step() (with grad_accum > 1
    the gradients are reduced inside step(), so this is the rank's own norm)."""
    if cfg.zero_stage != 0 or cfg.precision != "fp32":
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def _log(cfg, st, window, hooks, writer, bar, say, world, lr, norm, engine):
    """TensorBoard scalars and the tqdm postfix (or, without a bar, one log line) for the steps since the
    last call. Collective: all ranks."""
    steps = max(window["steps"], 1)
    parts = _mean_over_ranks({k: v / steps for k, v in window["parts"].items()}, world)
    skipped = _sum_dicts(fn(), world) if (fn := _hook(hooks, "skipped_counts")) else {}
    rate = window["samples"] / max(time.time() - window["t"], 1e-9)
    scale = getattr(engine.optimizer, "loss_scale", None) if cfg.precision == "fp16" else None
    if writer:
        scalars = {**{f"train/{k}": v for k, v in parts.items()}, "train/lr": lr, "train/samples_per_s": rate,
                   "train/nonfinite": st["nonfinite"], "train/skipped_steps": st["skipped_steps"],
                   **{f"data/skipped/{k}": v for k, v in skipped.items()}}
        if norm is not None and math.isfinite(norm):
            scalars["train/grad_norm"] = norm
        if scale is not None:
            scalars["train/loss_scale"] = float(scale)
        for tag, v in scalars.items():
            writer.add_scalar(tag, v, st["step"])
    window.update(t=time.time(), samples=0, steps=0, parts={})
    if bar:
        bar.set_postfix(loss=f"{parts.get('loss', float('nan')):.4f}", samples_s=f"{rate:.1f}")
        return
    per_step = (time.time() - window["t0"]) / max(st["step"] - window["step0"], 1)
    eta = int(per_step * (cfg.steps - st["step"]))
    text = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
    extra = f" grad_norm {norm:.3f}" if norm is not None else ""
    extra += f" loss_scale {scale:g}" if scale is not None else ""
    extra += f" nonfinite {st['nonfinite']}" if st["nonfinite"] else ""
    extra += f" skipped_steps {st['skipped_steps']}" if st["skipped_steps"] else ""
    extra += f" skipped {skipped}" if any(skipped.values()) else ""
    say(f"[engine] step {st['step']}/{cfg.steps} {text} lr {lr:.3g}{extra} {rate:.1f} samples/s "
        f"epoch {st['epoch']} eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


def _gathered(module, cfg):
    """Under ZeRO-3, the module's full weights for the duration (collective: every rank enters), so that
    hooks may use parameters outside a forward (sampling with a KV cache reads embeddings directly)."""
    if cfg.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()))


def _release(engine, cfg) -> None:
    """Hand the module back usable: under ZeRO-3 gather the full weights into it before removing the hooks
    (collective), then free the engine so another one can start in this process."""
    module = engine.module
    full = None
    if cfg.zero_stage == 3:
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            full = [p.detach().clone() for p in params]
    engine.destroy()
    if full is not None:
        for p, data in zip(module.parameters(), full):
            p.data = data
