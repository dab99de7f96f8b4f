"""Checkpoints: `step%08d` tags that count once they hold the `complete` marker, per-rank RNG state
and data position, and the export to a plain config.json + model.safetensors (fp32)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch._utils import _unflatten_dense_tensors

from dalle_ar.io import atomic_path, write_json

from .config import TrainConfig
from .dist import barrier

TAG_RE = re.compile(r"^step(\d{8})$")
COMPLETE = "complete"            # marker file inside a tag dir, written last
STATE_FILE = "trainer_state.json"
AUX_TAG = "aux"                  # an auxiliary engine's checkpoint (e.g. a discriminator): <tag>/aux/
FP32_FILE = "fp32_weights.safetensors"  # ZeRO-0 bf16/fp16 only: the fp32 master weights


@dataclasses.dataclass
class RunState:
    """Where a run stands; saved in every checkpoint (trainer_state.json and DeepSpeed's client state)."""

    step: int = 0            # optimizer steps done
    epoch: int = 0           # this rank's data position: make_batches(epoch), batch_in_epoch batches in
    batch_in_epoch: int = 0
    samples_seen: int = 0
    nonfinite: int = 0       # micro-batches dropped for a non-finite loss
    skipped_steps: int = 0   # steps without an update


def tag_of(step: int) -> str:
    return f"step{step:08d}"


# ---- seeds and the per-rank RNG state ------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as JSON-able values (no pickle)."""
    np_state = np.random.get_state()
    py = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [py[0], list(py[1]), py[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---- tags ------------------------------------------------------------------------------------------

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


def param_shapes(module) -> dict:
    """name -> shape of every parameter (the full shape under ZeRO-3, where the live tensor is a shard)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()}


def check_resumable(tag_dir: Path, cfg: TrainConfig, world: int, shapes: dict, aux_shapes: Optional[dict] = None) -> None:
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
    if aux_shapes is not None:  # a run with an auxiliary model (a discriminator) resumes only with the same one
        if not (tag_dir / AUX_TAG).is_dir():
            raise ValueError(f"--resume: checkpoint {tag_dir} holds no auxiliary model ({AUX_TAG}/) but this run trains "
                             f"one (e.g. a discriminator switched on): train into a new output directory")
        theirs = saved.get("aux_param_shapes")
        if theirs is not None and theirs != aux_shapes:
            raise ValueError(f"--resume: checkpoint {tag_dir} holds another auxiliary model (e.g. a discriminator of "
                             f"another size): resume with the run's config, or train into a new output directory")
    old = saved.get("cfg", {})
    then = (old.get("batch_size"), old.get("grad_accum"), saved.get("world_size"))
    if None not in then and then != (cfg.batch_size, cfg.grad_accum, world):
        raise ValueError(f"--resume: checkpoint {tag_dir} was written with train.batch_size={then[0]}, "
                         f"train.grad_accum={then[1]} on {then[2]} process(es); this run has {cfg.batch_size}, "
                         f"{cfg.grad_accum} on {world}. The saved data position counts batches, so it would not "
                         f"continue where the run stopped: resume with the same values, or train into a new "
                         f"output directory")


# ---- untrusted pickles -----------------------------------------------------------------------------

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


class Checkpoints:
    """The checkpoints/ folder of one run, as seen from one rank of a DeepSpeed engine."""

    def __init__(self, ckpt_dir: Path, cfg: TrainConfig, rank: int, world: int):
        self.dir, self.cfg, self.rank, self.world = Path(ckpt_dir), cfg, rank, world
        self.last_tag: Optional[str] = None

    def start(self, engine, resume: bool, say, aux=None) -> tuple[RunState, Optional[dict]]:
        """(state, this rank's RNG state or None): resumed from the newest complete tag, or fresh. `aux`: an
        auxiliary engine, restored from the tag's aux/ folder."""
        state, rng = RunState(), None
        if not resume:
            if latest_checkpoint(self.dir) is not None:
                raise ValueError(f"{self.dir} already holds checkpoints: pass resume=True (--resume) to continue "
                                 f"that run, or use a new output directory")
            return state, rng
        self.last_tag = latest_checkpoint(self.dir)
        if self.last_tag is None:
            say(f"[engine] resume: no complete checkpoint in {self.dir}; starting fresh")
        else:
            check_resumable(self.dir / self.last_tag, self.cfg, self.world, param_shapes(engine.module),
                            param_shapes(aux.module) if aux is not None else None)
            try:
                with weights_only_loads():
                    path, client = engine.load_checkpoint(str(self.dir), tag=self.last_tag)
                    if aux is not None and path is not None:
                        aux_path, _ = aux.load_checkpoint(str(self.dir / self.last_tag), tag=AUX_TAG)
                        path = path if aux_path is not None else None
            except RuntimeError as e:  # a checkpoint of older versions, which recorded no shapes
                if "state_dict" not in str(e) and "size mismatch" not in str(e):
                    raise
                raise ValueError(f"checkpoint {self.dir / self.last_tag} does not fit this model (was the model "
                                 f"config changed?): {str(e)[:400]}") from None
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / self.last_tag}")
            state = RunState(**{f.name: client[f.name] for f in dataclasses.fields(RunState) if f.name in client})
            rank_file = self.dir / self.last_tag / f"rank{self.rank}.json"
            if rank_file.is_file():  # this rank's RNG and data position
                mine = json.loads(rank_file.read_text())
                state.epoch, state.batch_in_epoch = mine["epoch"], mine["batch_in_epoch"]
                rng = mine["rng"]  # restored after the data replay, which may draw random numbers
            say(f"[engine] resumed from {self.dir / self.last_tag}: step {state.step}, epoch {state.epoch}, "
                f"batch {state.batch_in_epoch}")
        barrier(self.world)
        if self.rank == 0:  # interrupted writes are never resumed from; clear them
            for _, tag, ok in _tags(self.dir):
                if not ok:
                    shutil.rmtree(self.dir / tag, ignore_errors=True)
        return state, rng

    def save(self, engine, state: RunState, aux=None) -> str:
        """Write tag step%08d on every rank (an auxiliary engine `aux` into its aux/ folder); the `complete`
        marker goes last, once all shards are on disk."""
        tag, cfg = tag_of(state.step), self.cfg
        client = dict(dataclasses.asdict(state), cfg=dataclasses.asdict(cfg), world_size=self.world)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client, save_latest=True)
        if aux is not None:
            aux.save_checkpoint(str(self.dir / tag), tag=AUX_TAG, save_latest=False)
        write_json(self.dir / tag / f"rank{self.rank}.json",
                   {"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "rng": rng_state()})
        if self.rank == 0 and cfg.zero_stage == 0 and cfg.precision != "fp32":  # DeepSpeed saves 16-bit weights
            save_file({k: v.detach().float().contiguous() for k, v in zero0_state_dict(engine, cfg).items()},
                      str(self.dir / tag / FP32_FILE))
        barrier(self.world)
        if self.rank == 0:
            write_json(self.dir / tag / STATE_FILE, dict(client, param_shapes=param_shapes(engine.module),
                                                         **({"aux_param_shapes": param_shapes(aux.module)} if aux else {})))
            write_json(self.dir / tag / COMPLETE, {"step": state.step, "time": time.time()})
            _prune(self.dir, cfg.keep_last)
        barrier(self.world)
        self.last_tag = tag
        return tag

    def export(self, engine, out_dir: Path) -> None:
        """The trained weights as config.json + model.safetensors in out_dir (collective under ZeRO-3)."""
        sd = full_state_dict(engine, self.cfg, self.dir, self.last_tag, self.rank)
        if self.rank == 0:
            save_export(engine.module, sd, out_dir)
        barrier(self.world)


# ---- weights ---------------------------------------------------------------------------------------

def save_export(model, state_dict: dict, out_dir) -> Path:
    """model.save_pretrained into out_dir, atomically (a crash leaves the previous export or nothing)."""
    out_dir = Path(out_dir)
    sd = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
          for k, v in state_dict.items()}
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=sd)
    return out_dir


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
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # DeepSpeed only for ZeRO

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
    return save_export(model, sd, out_dir)


def full_state_dict(engine, cfg: TrainConfig, ckpt: Path, tag: Optional[str], rank: int) -> Optional[dict]:
    """The trained fp32 weights on rank 0 (None elsewhere). Collective under ZeRO-3: call on all ranks."""
    if cfg.precision != "fp32" and cfg.zero_stage > 0 and tag is not None:
        # Mixed precision: the fp32 master weights live in the optimizer shards of the checkpoint.
        return _state_dict_from_checkpoint(ckpt, tag) if rank == 0 else None
    if cfg.zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # gathers layer by layer onto rank 0
    return zero0_state_dict(engine, cfg) if rank == 0 else None


def zero0_state_dict(engine, cfg: TrainConfig) -> dict:
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
