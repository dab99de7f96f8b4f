"""The one training loop, `train()`: lr, micro-batches, step, log, checkpoint (the contract is in
`dalle_ar.engine`'s docstring)."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from .checkpoint import Checkpoints, RunState, seed_everything, set_rng_state, tag_of
from .config import TrainConfig, fit_to_run, lr_at
from .deepspeed_config import load_ds_config, resolve_ds_config
from .dist import all_true, init_distributed, mean_over_ranks, sum_dicts, world
from .optim import param_groups, zero0_grad_norm


@dataclass
class Auxiliary:
    """A second model trained beside the main one (a GAN's discriminator): its own DeepSpeed engine (same
    DeepSpeed config: ZeRO stage, precision, clipping) and its own optimizer, on the same LR schedule.

    loss_fn(aux, batch, step) -> (loss, parts) runs after the main loss's backward on the same micro-batch
    (which the main loss_fn may have added entries to, e.g. detached reconstructions); `aux` is its engine.
    active(step): whether the auxiliary trains at this optimizer step (the same on every rank); when it does
    not, its loss is not computed and the main loss_fn gets aux=None. `name` prefixes its logged loss.
    """

    model: torch.nn.Module
    loss_fn: Callable
    active: Callable[[int], bool] = lambda step: True
    name: str = "aux"


def train(model: torch.nn.Module, loss_fn, make_batches, cfg: TrainConfig, out_dir, ds_config=None,
          hooks=None, resume: bool = False, aux: Optional[Auxiliary] = None) -> dict:
    """Train `model` for cfg.steps optimizer steps on a DeepSpeed engine (see `dalle_ar.engine`), and `aux`
    (an `Auxiliary`) beside it on a second engine.

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
    cfg, warnings = fit_to_run(cfg)
    for text in warnings if rank == 0 else ():
        print(f"[engine] {text}", flush=True)
    seed_everything(cfg.seed + rank)  # different dropout per rank; DeepSpeed broadcasts rank 0's weights
    engine = _deepspeed_engine(model, cfg, ds)
    aux_engine = _deepspeed_engine(aux.model, cfg, ds) if aux is not None else None
    engines = [e for e in (engine, aux_engine) if e is not None]
    on_step, on_checkpoint, on_eval, skipped_counts = (_hook(hooks, n) for n in
                                                        ("on_step", "on_checkpoint", "on_eval", "skipped_counts"))

    ckpts = Checkpoints(out / "checkpoints", cfg, rank, world_size)
    try:
        state, rng = ckpts.start(engine, resume, say=(lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None),
                                 aux=aux_engine)
    except BaseException:  # a refused run frees its engines (another may start in this process)
        for e in engines:
            e.destroy()
        raise
    if (on_start := _hook(hooks, "on_start")) is not None:  # accepted: the run's metadata may be written now
        on_start(state.step)
    meter = Meter(cfg, out, rank, world_size, state.step, skipped_counts)
    stepper = _Stepper(engine, loss_fn, cfg, world_size, meter.say, aux, aux_engine)
    stop, start_step, interrupted, export_dir, ok = _StopFlag(), state.step, False, None, False
    try:
        batches = (_Batches(make_batches, state.epoch, state.batch_in_epoch, skipped_counts)
                   if state.step < cfg.steps else None)
        if rng is not None:
            set_rng_state(rng)
        for e in engines:
            e.train()
        for step in range(state.step, cfg.steps):
            lr = lr_at(step, cfg)
            for group in (g for e in engines for g in e.optimizer.param_groups):
                group["lr"] = lr
            parts = stepper(batches, step, state)
            meter.update(parts, stepper.samples)
            if on_step is not None:
                on_step(step, parts)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                meter.log(state, lr, stepper.grad_norm, engine)
            interrupted = not all_true(not stop.stop, world_size)
            if interrupted or (cfg.save_every and state.step % cfg.save_every == 0) or state.step == cfg.steps:
                _checkpoint(ckpts, engine, state, on_checkpoint, meter.writer, aux_engine)
            if on_eval is not None and cfg.eval_every and not interrupted and (
                    state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                meter.log_eval(state.step, _in_eval_mode(engine, lambda m: on_eval(state.step, m, meter.writer)))
            if interrupted:
                meter.say(f"[engine] stopped by signal at step {state.step}; checkpoint {ckpts.dir / ckpts.last_tag}")
                break
        if not interrupted and ckpts.last_tag != tag_of(state.step):
            _checkpoint(ckpts, engine, state, on_checkpoint, meter.writer, aux_engine)  # e.g. resumed at or past cfg.steps
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
            for e in engines:
                e.destroy()
    for e in engines:
        _release(e, cfg)
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


def _checkpoint(ckpts: Checkpoints, engine, state: RunState, on_checkpoint, writer, aux_engine=None) -> None:
    """Save a complete checkpoint, then run the on_checkpoint hook on the module (eval mode, no grad, and
    under ZeRO-3 its full weights gathered: collective, every rank enters; sampling with a KV cache reads
    embeddings outside a forward, which ZeRO-3 would leave partitioned)."""
    ckpts.save(engine, state, aux=aux_engine)
    if on_checkpoint is not None:
        _in_eval_mode(engine, lambda m: on_checkpoint(state.step, m, writer))
        if writer:
            writer.flush()


def _in_eval_mode(engine, fn):
    """fn(module) with the module in eval mode, no grad and under ZeRO-3 its full weights gathered (a hook's
    sampling or validation; collective: every rank enters)."""
    was = engine.module.training
    engine.module.eval()
    gathered = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed  # heavy: see _deepspeed_engine

        gathered = deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
    try:
        with torch.no_grad(), gathered:
            return fn(engine.module)
    finally:
        engine.module.train(was)


class _Stepper:
    """One optimizer step: cfg.grad_accum micro-batches, then engine.step() (and the auxiliary's step after
    it). Non-finite losses are caught before backward on every rank alike, so nothing reaches the weights;
    they are counted."""

    def __init__(self, engine, loss_fn, cfg: TrainConfig, world_size: int, say, aux=None, aux_engine=None):
        self.engine, self.loss_fn, self.cfg, self.world, self.say = engine, loss_fn, cfg, world_size, say
        self.aux, self.aux_engine = aux, aux_engine
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.consecutive = 0       # non-finite losses in a row
        self.grad_norm = None      # of the last applied step
        self.samples = 0           # samples (all ranks) the last step trained on

    def _finite(self, loss, step, state, what) -> bool:
        if all_true(bool(torch.isfinite(loss.detach()).all()), self.world):
            return True
        state.nonfinite += 1
        self.consecutive += 1
        self.say(f"[engine] step {step}: non-finite {what} ({loss.item()}), micro-batch skipped "
                 f"({self.consecutive} in a row, {state.nonfinite} in all)")
        if self.consecutive >= self.cfg.max_nonfinite:
            raise RuntimeError(
                f"{self.consecutive} consecutive non-finite losses (limit train.max_nonfinite="
                f"{self.cfg.max_nonfinite}) at step {step}: lower train.lr, check the data, or use fp32/bf16")
        return False

    def __call__(self, batches: "_Batches", step: int, state: RunState) -> dict:
        """Mean loss parts of the step (empty if every micro-batch was dropped); updates `state`."""
        engine, cfg, aux = self.engine, self.cfg, self.aux
        aux_on = aux is not None and bool(aux.active(step))
        extra = () if aux is None else (self.aux_engine if aux_on else None,)
        sums, counts, used, aux_used, self.samples = {}, {}, 0, 0, 0
        for _ in range(cfg.grad_accum):
            batch = batches.next()
            n = _batch_len(batch)
            batch = _to_device(batch, engine.device, self.dtype)
            with _frozen(self.aux_engine.module if aux_on else None):  # its gradients come from its own loss only
                loss, parts = self.loss_fn(engine, batch, step, *extra)
                if not self._finite(loss, step, state, "loss"):
                    del loss, parts
                    continue
                engine.backward(loss)
            self.consecutive = 0
            used += 1
            self.samples += n * self.world
            values = {"loss": loss, **parts}
            if aux_on:
                a_loss, a_parts = aux.loss_fn(self.aux_engine, batch, step)
                if self._finite(a_loss, step, state, f"{aux.name} loss"):
                    self.consecutive = 0
                    self.aux_engine.backward(a_loss)
                    aux_used += 1
                    values.update({f"{aux.name}_loss": a_loss, **a_parts})
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
                counts[k] = counts.get(k, 0) + 1
        if used:  # with grad_accum=1 step() follows the boundary backward; else step() is the boundary
            own_norm = zero0_grad_norm(engine, cfg.zero_stage, cfg.precision)
            engine.step()
            norm = engine.get_global_grad_norm()
            self.grad_norm = float(norm) if norm is not None else own_norm
        if aux_used:  # after the main step, as taming's two optimizers
            self.aux_engine.step()
        if not used or not engine.was_step_applied():  # all dropped, or an fp16 overflow
            state.skipped_steps += 1
        state.step, state.epoch, state.batch_in_epoch = step + 1, batches.epoch, batches.batch_in_epoch
        state.samples_seen += cfg.grad_accum * self.world * n
        return {k: v / counts[k] for k, v in sums.items()}  # each part over the micro-batches that gave it


@contextlib.contextmanager
def _frozen(module):
    """The module's trainable parameters with requires_grad off inside: a loss that runs through it (the
    generator's GAN loss through the discriminator) gives it no gradient. Under ZeRO-2 a gradient reaching
    another engine's parameters would fire that engine's reduction hooks outside its backward."""
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


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
        self.t, self.samples, self.sums, self.counts = time.time(), 0, {}, {}

    def update(self, parts: dict, samples: int) -> None:
        self.samples += samples
        if parts:
            self.last_loss = parts["loss"]
            self.first_loss = self.last_loss if self.first_loss is None else self.first_loss
        for k, v in parts.items():  # a part may be missing from some steps (an auxiliary not yet active)
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        if self.bar:
            self.bar.update(1)

    def log(self, state: RunState, lr: float, norm: Optional[float], engine) -> None:
        cfg = self.cfg
        parts = mean_over_ranks({k: v / self.counts[k] for k, v in self.sums.items()}, self.world)
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

    def log_eval(self, step: int, metrics) -> None:
        """The on_eval hook's metrics ({name: number}, the same on every rank) as val/<name> scalars and a line."""
        metrics = {k.removeprefix("val_"): float(v) for k, v in (metrics or {}).items()}
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(f"val/{k}", v, step)
            self.writer.flush()
        if metrics:
            self.say(f"[engine] step {step}/{self.cfg.steps} validation " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

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
        # Fresh Parameters: the old ones keep ZeRO-3's attributes and gather methods, so a later forward
        # on one rank alone (e.g. rank 0's evaluation) would all-gather with ranks that have exited.
        fresh = {id(p): torch.nn.Parameter(data, requires_grad=p.requires_grad)
                 for p, data in zip(module.parameters(), full)}
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and id(p) in fresh:
                    sub._parameters[name] = fresh[id(p)]
