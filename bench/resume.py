"""Crash recovery of a multi-process ZeRO-3 run: kill -9 the whole process group at random moments, resume.

    python bench/resume.py [--kills 10] [--stage dalle_codes] [--zero 3] [--nproc 2] [--steps 40]
                           [--save-every 4] [--seed 0] [--out DIR] [--no-reference] [--no-val]

One run (tiny model, shards written by `dalle-ar data shapes` / `dalle-ar encode`, launched like a job:
`deepspeed --num_gpus 2 train/train_<stage>.py` in a session of its own) is killed `--kills` times with
SIGKILL to its process group, each time at a random moment of one of three kinds:
  startup    before the first step: a random part of the time the last launch took to reach its
             first step (imports, DeepSpeed's initialisation, loading the checkpoint, data replay);
  training   after 1..save_every+2 more steps and a random part of a step;
  in-write   inside a checkpoint write: as soon as a tag dir without its `complete` marker appears.
After each kill: `dalle-ar export RUN` of the newest complete checkpoint must load with the model's
from_pretrained, and the next `--resume` launch must start from that checkpoint and continue the step
counter (every later step logged once, steps redone after the kill log the same loss/LR/grad norm/epoch).
The last resume runs to the end; its export must equal `dalle-ar export RUN`, and the checkpoint trail
must show the data position advancing one batch a step on every rank. Unless --no-reference, the final
weights are compared with an uninterrupted run of the same command.

A resume counts as ok when its start, its steps, and the export of what it left (the next kill's
export, or the final one) all check out. Last line: resumes_ok=K/N.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from run_harness import (STAGES, check_continues, check_data_position, check_export, cli, complete_tags,  # noqa: E402
                         kill_group, make_data, resumed_from, run_env, run_to_end, same_tensors, start,
                         step_lines, tags, train_cmd, wait_for)
from safetensors.torch import load_file  # noqa: E402

SHARDS, SHARD_SIZE, BATCH = 4, 16, 8
LAUNCH_TIMEOUT = 900


def moments(n: int, rng: random.Random) -> list[str]:
    """About 3 in 10 inside a checkpoint write, 2 in 10 during start-up, the rest while training."""
    kinds = ["in-write"] * round(0.3 * n) + ["startup"] * round(0.2 * n)
    kinds += ["training"] * (n - len(kinds))
    rng.shuffle(kinds)
    return kinds


class Writes:
    """Checkpoint writes in progress that this launch started: tag dirs without a `complete` marker,
    not counting those an earlier kill left (the resume deletes those; once they are gone, any
    unmarked tag dir is this launch's)."""

    def __init__(self, run: Path):
        self.run = run
        self.stale = {s for s, ok in tags(run) if not ok}

    def __call__(self) -> list[int]:
        open_ = [s for s, ok in tags(self.run) if not ok]
        if self.stale and not self.stale & set(open_):
            self.stale = set()
        return [s for s in open_ if s not in self.stale]


STARTUP_S = [20.0]  # seconds from a launch to its first step, as last measured


def kill_at(kind, proc, log, rng, save_every, steps, writes: Writes) -> dict:
    """Wait for the moment, kill -9 the group; -> what was seen."""
    t0 = time.time()
    if kind == "startup":
        time.sleep(rng.uniform(0, STARTUP_S[0]))
    elif kind == "training":
        first = lambda: step_lines(log.read_text())  # noqa: E731
        wait_for(proc, log, lambda: bool(first()), "a first step", LAUNCH_TIMEOUT)
        STARTUP_S[0] = time.time() - t0
        target = min(steps - 1, min(first()) + rng.randint(1, save_every + 2))
        wait_for(proc, log, lambda: max(first()) >= target, f"step {target}", LAUNCH_TIMEOUT)
        time.sleep(rng.uniform(0, 1.0))
    else:
        wait_for(proc, log, lambda: bool(writes()), "a checkpoint write", LAUNCH_TIMEOUT, poll=0.005)
    kill_group(proc)
    return {"kind": kind, "after_s": time.time() - t0, "inside_write": bool(writes())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--stage", default="dalle_codes", choices=sorted(STAGES))
    p.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--no-reference", action="store_true", help="skip the uninterrupted run")
    p.add_argument("--no-val", action="store_true", help="no --val-shards (no evaluation after the export)")
    args = p.parse_args(argv)

    t_start = time.time()
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    spec = STAGES[args.stage]
    data = make_data(work / "data", SHARDS, SHARD_SIZE)
    env = run_env(work / "torch_extensions")
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)

    def cmd(out, *extra):
        return train_cmd(spec, data, out, args.zero, args.nproc, steps=args.steps, save_every=args.save_every,
                         batch=BATCH, extra=extra, val=not args.no_val)

    loads = [os.getloadavg()[0]]
    rows, prev_log = [], None
    for i, kind in enumerate(moments(args.kills, rng)):
        log = work / f"launch{i:02d}.log"
        writes = Writes(run)
        proc = start(cmd(run, *(["--resume"] if i else [])), env, log)
        row = {"launch": i, "ok": True, "why": ""}
        try:
            row.update(kill_at(kind, proc, log, rng, args.save_every, args.steps, writes))
        except AssertionError as e:
            row.update(kind=kind, ok=False, why=f"no kill: {str(e).splitlines()[0]}")
        done = complete_tags(run)
        row["newest"] = max(done) if done else 0
        text = log.read_text()
        lines = step_lines(text)
        row["steps"] = f"{min(lines)}-{max(lines)}" if lines else "-"
        if i and resumed_from(text) is None and not lines:
            row["from"] = "killed before resuming"  # nothing to check; the next launch resumes instead
        elif i:  # this launch was resume number i: it continued from where kill i-1 left the run
            try:
                redone = check_continues(prev_log.read_text(), text, rows[-1]["newest"], args.steps)
                row["redone"] = len(redone)
            except AssertionError as e:
                row.update(ok=False, why=f"continuity: {str(e).splitlines()[0]}")
            row["from"] = resumed_from(text)
        if done:  # what the kill left is usable: the consolidated newest checkpoint loads
            try:
                cli("export", run, "--out", work / f"export{i:02d}")
                check_export(spec, work / f"export{i:02d}")
                row["export"] = "ok"
            except Exception as e:  # noqa: BLE001  (a row of the table, not a crash of the bench)
                row.update(export="FAIL", ok=False, why=f"export: {str(e).splitlines()[0][:120]}")
        else:
            row["export"] = "none yet"
        rows.append(row)
        if lines or resumed_from(text) is not None:
            prev_log = log  # the steps a later resume may redo are in the last launch that trained
        loads.append(os.getloadavg()[0])
        print(f"kill {i + 1}/{args.kills}: {row}", flush=True)

    # the last resume: to the end
    final = {"launch": args.kills, "kind": "finish", "ok": True, "why": ""}
    log = work / f"launch{args.kills:02d}.log"
    try:
        text = run_to_end(cmd(run, "--resume"), env, log, LAUNCH_TIMEOUT)
        final["from"] = resumed_from(text)
        final["redone"] = len(check_continues(prev_log.read_text(), text, rows[-1]["newest"], args.steps))
        assert max(step_lines(text)) == args.steps
        final["steps"] = f"{min(step_lines(text))}-{args.steps}"
        check_data_position(run, args.nproc, SHARDS * SHARD_SIZE, BATCH)
        cli("export", run, "--out", work / "export_final")
        check_export(spec, run / "export", work / "export_final")
        final.update(newest=args.steps, export="ok")
    except Exception as e:  # noqa: BLE001
        final.update(ok=False, why=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    rows.append(final)
    loads.append(os.getloadavg()[0])

    reference = "skipped"
    if not args.no_reference:
        try:
            run_to_end(cmd(work / "reference"), env, work / "reference.log", LAUNCH_TIMEOUT)
            same = same_tensors(load_file(str(work / "reference" / "export" / "model.safetensors")),
                                load_file(str(run / "export" / "model.safetensors")))
            reference = "equal" if same else "DIFFERENT"
        except Exception as e:  # noqa: BLE001
            reference = f"failed ({type(e).__name__})"
        loads.append(os.getloadavg()[0])

    # resume k (k = 1..kills) is launch k; it is ok when its own row and the row of what it left are ok
    ok = sum(rows[k]["ok"] for k in range(1, len(rows)))
    cols = ["launch", "kind", "after_s", "inside_write", "newest", "steps", "from", "redone", "export", "ok", "why"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print("| " + " | ".join(cells) + " |")
    in_write = sum(bool(r.get("inside_write")) for r in rows)
    trained = sum(isinstance(r.get("from"), int) for r in rows[1:])
    print(f"\nstage={args.stage} zero={args.zero} nproc={args.nproc} steps={args.steps} "
          f"save_every={args.save_every} val_shards={not args.no_val} kills={args.kills} "
          f"kills_inside_a_write={in_write} resumes_past_startup={trained}")
    print(f"final_export_vs_uninterrupted={reference}")
    print(f"load_avg min/max={min(loads):.1f}/{max(loads):.1f} cores={os.cpu_count()} "
          f"seconds={time.time() - t_start:.0f}")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    print(f"resumes_ok={ok}/{args.kills}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
