"""Shared by the bench scripts (run as `python bench/<name>.py`, so this imports as `common`)."""

import os

import torch


def pick_threads(threads, device: str) -> tuple[bool, float]:
    """Set torch's CPU threads: `threads` if given, else 1 when the CPU is already busy, else torch's.

    On oversubscribed cores every small op's OpenMP barrier waits for a descheduled thread:
    measured here, a decoding step went from ~7 ms (1 thread) to ~165 ms (2 threads).
    -> (busy, load average).
    """
    load = os.getloadavg()[0]
    busy = threads is None and device == "cpu" and load >= (os.cpu_count() or 1)
    if busy:
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    return busy, load
