"""Shared by the bench scripts (run as `python bench/<name>.py`, so this imports as `common`)."""

import torch

from dalle_ar import threads as th


def pick_threads(threads, device: str) -> tuple[bool, float]:
    """Set torch's CPU threads: `threads` if given, else the package's policy (`dalle_ar.threads`:
    the cores this process may use minus the busy ones, at least 1).

    On oversubscribed cores every small op's OpenMP barrier waits for a descheduled thread:
    measured here, a decoding step went from ~7 ms (1 thread) to ~165 ms (2 threads).
    -> (busy, load average).
    """
    load = th.load_average()
    busy = threads is None and device == "cpu" and load >= th.available_cores()
    if device == "cpu":
        th.set_threads(threads, warn=False)
    elif threads:
        torch.set_num_threads(threads)
    return busy, load
