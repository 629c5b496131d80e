"""Torch's CPU thread count for the length of a job, given back afterwards.

Meta-training and the benchmark train many small models: one thread per process is the fastest on the
reference machine (more threads spin-wait on tensors of a few thousand weights), and the thread count
is part of what an inner run computes (convolutions sum in another order with more threads). Library
code never changes it for good: :func:`torch_threads` sets it for a block and restores the caller's.

    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block on ``n`` torch threads (None: leave the count as it is); yields the count in use."""
    import torch

    from hpo_env.checks import is_integer

    previous = torch.get_num_threads()
    if n is not None:
        if not is_integer(n) or n < 1:
            raise ValueError(f"threads must be a positive integer, got {n!r}")
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
