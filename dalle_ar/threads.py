"""How many CPU threads torch uses: one policy for the pipeline, `dalle-ar generate`, the trainers
and the server.

On a CPU shared with other jobs, OpenMP threads that outnumber the free cores spin in barriers
waiting for descheduled peers, and small ops (a decoding step is ~70 of them) get many times
slower. So the default takes the cores this process may run on (`os.sched_getaffinity`, which
honours `taskset`, cgroups' cpusets and SLURM's binding), shared by the processes of one launch on
the node (`LOCAL_WORLD_SIZE`, set by torchrun and the deepspeed launcher), less those the 1-minute
load average says other jobs keep busy (the load less this process's own CPU use since its previous
pick: a long run's next stage or a busy server must not count itself), at least 1, and warns once
when the machine is busy. An explicit count (`num_threads=`,
`--threads N`) or a set `OMP_NUM_THREADS` is obeyed as given.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Optional

import torch

log = logging.getLogger(__name__)
_warned_busy = False
_own = {"at": None, "cpu": 0.0, "load": 0.0}  # this process's CPU clock at its previous pick


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def own_load() -> float:
    """Cores this process kept busy (all its threads) since its previous pick at least a second ago:
    its own part of the load average. 0 at the first pick."""
    wall, cpu = time.monotonic(), time.process_time()
    at = _own["at"]
    if at is None or wall - at >= 1.0:
        if at is not None:
            _own["load"] = (cpu - _own["cpu"]) / (wall - at)
        _own.update(at=wall, cpu=cpu)
    return _own["load"]


def check_threads(num_threads, name: str = "num_threads") -> Optional[int]:
    if num_threads is not None and (not isinstance(num_threads, int) or isinstance(num_threads, bool)
                                    or num_threads < 1):
        raise ValueError(f"{name} must be None (automatic) or an int >= 1, got {num_threads!r}")
    return num_threads


def pick_threads(num_threads: Optional[int] = None, *, warn: bool = True) -> int:
    """The thread count the policy gives (see the module docstring); sets nothing."""
    num_threads = check_threads(num_threads)
    cores = available_cores()
    if num_threads is not None:
        if num_threads > cores and warn:
            log.warning("%d threads on %d available cores: oversubscribed, small ops will wait on "
                        "descheduled threads", num_threads, cores)
        return num_threads
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # the user chose, through the environment
    global _warned_busy
    load = max(0.0, load_average() - own_load())  # other jobs' load
    # Processes of one launch on this node (torchrun / deepspeed set LOCAL_WORLD_SIZE) share the cores.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = max(1, min(cores // max(local, 1), cores - int(load)))
    if load >= cores and warn and not _warned_busy:
        _warned_busy = True  # once a process: a server or a long run would repeat it at every call
        log.warning("the CPU is busy (load average %.1f on %d cores): using %d thread(s); pass "
                    "num_threads= / --threads N to override", load, cores, threads)
    return threads


def set_threads(num_threads: Optional[int] = None, *, warn: bool = True) -> int:
    """Apply the policy to torch (process-wide) -> the thread count set."""
    n = pick_threads(num_threads, warn=warn)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


@contextmanager
def threads(num_threads: Optional[int] = None, *, warn: bool = True):
    """Run a block with the policy's thread count, then restore torch's previous one."""
    before = torch.get_num_threads()
    n = set_threads(num_threads, warn=warn)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
