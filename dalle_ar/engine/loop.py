"""The one training loop, `train()`: lr, micro-batches, step, log, checkpoint (the contract is in
`dalle_ar.engine`'s docstring)."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from .checkpoint import Checkpoints, RunState, seed_everything, set_rng_state, tag_of
from .config import TrainConfig, lr_at
from .deepspeed_config import load_ds_config, resolve_ds_config
from .dist import all_true, init_distributed, mean_over_ranks, sum_dicts, world
from .optim import param_groups, zero0_grad_norm


def train(model: torch.nn.Module, loss_fn, make_batches, cfg: TrainConfig, out_dir, ds_config=None,
          hooks=None, resume: bool = False) -> dict:
    """Train `model` for cfg.steps optimizer steps on a DeepSpeed engine (see `dalle_ar.engine`).

    Returns a summary: steps, start_step, first_loss, final_loss, nonfinite (dropped micro-batches),
    skipped_steps (steps without an update), interrupted, checkpoint (newest complete tag dir),
    export_dir (None if interrupted or cfg.export is False), samples_seen, epoch, skipped_samples
    (from hooks.skipped_counts), world_size, zero_stage, precision, seconds.
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    t_start, out = time.time(), Path(out_dir)
    init_distributed()
    rank, world_size = world()
    cfg, ds = resolve_ds_config(cfg, ds_config if isinstance(ds_config, dict) else load_ds_config(ds_config))
    seed_everything(cfg.seed + rank)  # different dropout per rank; DeepSpeed broadcasts rank 0's weights
    engine = _deepspeed_engine(model, cfg, ds)
    on_step, on_checkpoint, skipped_counts = (_hook(hooks, n) for n in ("on_step", "on_checkpoint", "skipped_counts"))

    ckpts = Checkpoints(out / "checkpoints", cfg, rank, world_size)
    state, rng = ckpts.start(engine, resume, say=(lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None))
    meter = Meter(cfg, out, rank, world_size, state.step, skipped_counts)
    stepper = _Stepper(engine, loss_fn, cfg, world_size, meter.say)
    stop, start_step, interrupted, export_dir, ok = _StopFlag(), state.step, False, None, False
    try:
        batches = _Batches(make_batches, state.epoch, state.batch_in_epoch) if state.step < cfg.steps else None
        if rng is not None:
            set_rng_state(rng)
        engine.train()
        for step in range(state.step, cfg.steps):
            lr = lr_at(step, cfg)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            parts = stepper(batches, step, state)
            meter.update(parts, stepper.samples)
            if on_step is not None:
                on_step(step, parts)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                meter.log(state, lr, stepper.grad_norm, engine)
            interrupted = not all_true(not stop.stop, world_size)
            if interrupted or (cfg.save_every and state.step % cfg.save_every == 0) or state.step == cfg.steps:
                _checkpoint(ckpts, engine, state, on_checkpoint, meter.writer)
            if interrupted:
                meter.say(f"[engine] stopped by signal at step {state.step}; checkpoint {ckpts.dir / ckpts.last_tag}")
                break
        if not interrupted and ckpts.last_tag != tag_of(state.step):
            _checkpoint(ckpts, engine, state, on_checkpoint, meter.writer)  # e.g. resumed at or past cfg.steps
        if not interrupted and cfg.export:
            ckpts.export(engine, out / "export")
            meter.say(f"[engine] exported {out / 'export'}")
            export_dir = str(out / "export")
        final = mean_over_ranks({"loss": meter.last_loss} if meter.last_loss is not None else {}, world_size)
        skipped = sum_dicts(skipped_counts(), world_size) if skipped_counts else {}
        ok = True
    finally:
        stop.restore()
        meter.close()
        if not ok:
            engine.destroy()
    _release(engine, cfg)
    return {"steps": state.step, "start_step": start_step, "first_loss": meter.first_loss,
            "final_loss": final.get("loss"), "nonfinite": state.nonfinite, "skipped_steps": state.skipped_steps,
            "interrupted": interrupted, "checkpoint": str(ckpts.dir / ckpts.last_tag) if ckpts.last_tag else None,
            "export_dir": export_dir, "samples_seen": state.samples_seen, "epoch": state.epoch,
            "skipped_samples": skipped, "world_size": world_size, "zero_stage": cfg.zero_stage,
            "precision": cfg.precision, "seconds": round(time.time() - t_start, 3)}


def _deepspeed_engine(model, cfg: TrainConfig, ds: dict):
    import deepspeed  # heavy: loaded by the first training call, not by importing the engine

    groups = param_groups(model, cfg.weight_decay)
    optimizer = None if "optimizer" in ds else torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                                                 weight_decay=cfg.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds,
                                      model_parameters=groups if optimizer is None else None)
    return engine


def _checkpoint(ckpts: Checkpoints, engine, state: RunState, on_checkpoint, writer) -> None:
    """Save a complete checkpoint, then run the on_checkpoint hook on the module (eval mode, no grad)."""
    ckpts.save(engine, state)
    if on_checkpoint is None:
        return
    was = engine.module.training
    engine.module.eval()
    with torch.no_grad():
        on_checkpoint(state.step, engine.module, writer)
    engine.module.train(was)
    if writer:
        writer.flush()


class _Stepper:
    """One optimizer step: cfg.grad_accum micro-batches, then engine.step(). Non-finite losses are
    caught before backward on every rank alike, so nothing reaches the weights; they are counted."""

    def __init__(self, engine, loss_fn, cfg: TrainConfig, world_size: int, say):
        self.engine, self.loss_fn, self.cfg, self.world, self.say = engine, loss_fn, cfg, world_size, say
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.consecutive = 0       # non-finite losses in a row
        self.grad_norm = None      # of the last applied step
        self.samples = 0           # samples (all ranks) the last step trained on

    def __call__(self, batches: "_Batches", step: int, state: RunState) -> dict:
        """Mean loss parts of the step (empty if every micro-batch was dropped); updates `state`."""
        engine, cfg = self.engine, self.cfg
        sums, used, self.samples = {}, 0, 0
        for _ in range(cfg.grad_accum):
            batch = batches.next()
            n = _batch_len(batch)
            loss, parts = self.loss_fn(engine, _to_device(batch, engine.device, self.dtype), step)
            if not all_true(bool(torch.isfinite(loss.detach()).all()), self.world):
                state.nonfinite += 1
                self.consecutive += 1
                self.say(f"[engine] step {step}: non-finite loss ({loss.item()}), micro-batch skipped "
                         f"({self.consecutive} in a row, {state.nonfinite} in all)")
                del loss, parts
                if self.consecutive >= cfg.max_nonfinite:
                    raise RuntimeError(
                        f"{self.consecutive} consecutive non-finite losses (limit train.max_nonfinite="
                        f"{cfg.max_nonfinite}) at step {step}: lower train.lr, check the data, or use fp32/bf16")
                continue
            self.consecutive = 0
            engine.backward(loss)
            used += 1
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
            self.samples += n * self.world
        if used:  # with grad_accum=1 step() follows the boundary backward; else step() is the boundary
            own_norm = zero0_grad_norm(engine, cfg.zero_stage, cfg.precision)
            engine.step()
            norm = engine.get_global_grad_norm()
            self.grad_norm = float(norm) if norm is not None else own_norm
        if not used or not engine.was_step_applied():  # all dropped, or an fp16 overflow
            state.skipped_steps += 1
        state.step, state.epoch, state.batch_in_epoch = step + 1, batches.epoch, batches.batch_in_epoch
        state.samples_seen += cfg.grad_accum * self.world * n
        return {k: v / used for k, v in sums.items()} if used else {}


class Meter:
    """Step losses averaged over each log window, written as TensorBoard scalars and shown as the tqdm
    postfix (or, without a terminal, one log line). `log` is collective: call it on every rank."""

    def __init__(self, cfg: TrainConfig, out: Path, rank: int, world_size: int, start_step: int,
                 skipped_counts: Optional[Callable] = None):
        self.cfg, self.world, self.skipped_counts = cfg, world_size, skipped_counts
        self.writer = self.bar = None
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # loads TensorBoard only when asked for
                self.writer = SummaryWriter(str(out / "tb"))
            if cfg.progress and sys.stderr.isatty():
                self.bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.say = (self.bar.write if self.bar else lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)
        self.t0, self.step0 = time.time(), start_step
        self.first_loss = self.last_loss = None
        self._reset()

    def _reset(self):
        self.t, self.samples, self.steps, self.sums = time.time(), 0, 0, {}

    def update(self, parts: dict, samples: int) -> None:
        self.samples += samples
        if parts:
            self.last_loss = parts["loss"]
            self.first_loss = self.last_loss if self.first_loss is None else self.first_loss
            self.steps += 1
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if self.bar:
            self.bar.update(1)

    def log(self, state: RunState, lr: float, norm: Optional[float], engine) -> None:
        cfg = self.cfg
        parts = mean_over_ranks({k: v / max(self.steps, 1) for k, v in self.sums.items()}, self.world)
        skipped = sum_dicts(self.skipped_counts(), self.world) if self.skipped_counts else {}
        rate = self.samples / max(time.time() - self.t, 1e-9)
        scale = getattr(engine.optimizer, "loss_scale", None) if cfg.precision == "fp16" else None
        if self.writer:
            scalars = {**{f"train/{k}": v for k, v in parts.items()}, "train/lr": lr, "train/samples_per_s": rate,
                       "train/nonfinite": state.nonfinite, "train/skipped_steps": state.skipped_steps,
                       **{f"data/skipped/{k}": v for k, v in skipped.items()}}
            if norm is not None and math.isfinite(norm):
                scalars["train/grad_norm"] = norm
            if scale is not None:
                scalars["train/loss_scale"] = float(scale)
            for tag, v in scalars.items():
                self.writer.add_scalar(tag, v, state.step)
        self._reset()
        if self.bar:
            self.bar.set_postfix(loss=f"{parts.get('loss', float('nan')):.4f}", samples_s=f"{rate:.1f}")
            return
        eta = int((time.time() - self.t0) / max(state.step - self.step0, 1) * (cfg.steps - state.step))
        text = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
        extra = f" grad_norm {norm:.3f}" if norm is not None else ""
        extra += f" loss_scale {scale:g}" if scale is not None else ""
        extra += f" nonfinite {state.nonfinite}" if state.nonfinite else ""
        extra += f" skipped_steps {state.skipped_steps}" if state.skipped_steps else ""
        extra += f" skipped {skipped}" if any(skipped.values()) else ""
        self.say(f"[engine] step {state.step}/{cfg.steps} {text} lr {lr:.3g}{extra} {rate:.1f} samples/s "
                 f"epoch {state.epoch} eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.close()


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and returns after the current step. A second
    SIGINT interrupts at once."""

    def __init__(self):
        self.stop, self.old = False, {}
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


class _Batches:
    """make_batches(epoch) as one endless stream that knows its position (epoch, batch within it)."""

    def __init__(self, make_batches, epoch: int = 0, batch_in_epoch: int = 0):
        self.make_batches, self.epoch, self.batch_in_epoch = make_batches, epoch, 0
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
                    raise ValueError(f"make_batches({self.epoch}) yielded no batches") from None
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self.it = iter(self.make_batches(self.epoch))


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


def _hook(hooks, name) -> Optional[Callable]:
    fn = hooks.get(name) if isinstance(hooks, dict) else getattr(hooks, name, None)
    return fn if callable(fn) else None


def _release(engine, cfg) -> None:
    """Hand the module back usable: under ZeRO-3 gather the full weights into it before removing the hooks
    (collective), then free the engine so another one can start in this process."""
    module = engine.module
    full = None
    if cfg.zero_stage == 3:
        import deepspeed  # heavy: see _deepspeed_engine

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            full = [p.detach().clone() for p in params]
    engine.destroy()
    if full is not None:
        for p, data in zip(module.parameters(), full):
            p.data = data
