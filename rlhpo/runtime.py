"""Process-level settings for running training work on small CPU machines."""

from __future__ import annotations

import os

import torch


def limit_threads(n: int | None = None) -> int:
    """Give torch one intra-op thread (or ``RLHPO_THREADS``) in this process.

    On 2-core machines, torch with 2 threads while anything else runs was measured
    40-180x slower than with 1: rlhpo runs one thread per worker process.
    Returns the thread count now in force.
    """
    if n is None:
        n = int(os.environ.get("RLHPO_THREADS", "1"))
    if n < 1:
        raise ValueError(f"RLHPO_THREADS must be >= 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
