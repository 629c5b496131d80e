"""Argument checks shared by every module that validates its input: what counts as an integer, a
number, a flag and a usable device.

The predicates accept NumPy scalars and refuse ``bool`` (``True`` is an ``int`` in Python, but a flag
given where a count is meant is a mistake)::

    >>> import numpy as np
    >>> is_integer(np.int64(3)), is_integer(True), is_number(2.5), is_number("2.5"), is_flag(np.True_)
    (True, False, True, False, True)
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_real_array", "check_device", "check_ordered", "is_flag", "is_integer", "is_number"]


def is_integer(value: object) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A Python or NumPy real number (integer or float), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_flag(value: object) -> bool:
    """``True`` or ``False`` (Python's or NumPy's), not a truthy stand-in such as ``'no'`` or ``1``."""
    return isinstance(value, (bool, np.bool_))


def check_ordered(values: object, label: str) -> None:
    """Refuse a ``set`` of names where their order matters (which family or optimiser a seed draws, which
    action entry sets which hyperparameter): a set of strings iterates in an order that changes from one
    Python process to the next (string hashing is salted, ``PYTHONHASHSEED``), so the same seed would give
    another run."""
    if isinstance(values, (set, frozenset)):
        raise TypeError(
            f"{label} must be a list or tuple, got a {type(values).__name__} {sorted(map(str, values))}: a set's "
            "order changes between Python processes, so the same seed would give other results; pass a list "
            "(sorted(...) if the order does not matter to you)"
        )


def as_real_array(values: object, label: str = "actions") -> np.ndarray:
    """``values`` as a float64 array, refusing what only looks numeric to NumPy: strings (which it would
    parse), booleans, complex numbers and arbitrary objects.

    >>> as_real_array([1, -0.5])
    array([ 1. , -0.5])
    >>> as_real_array(["0.1"])
    Traceback (most recent call last):
    ...
    TypeError: actions must be real numbers (floats or integers), got ['0.1'] (dtype <U3)
    """
    array = values if isinstance(values, np.ndarray) else np.asarray(values)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{label} must be real numbers (floats or integers), got {values!r} (dtype {array.dtype})")
    return array.astype(np.float64, copy=False)


def check_device(device: str | torch.device, label: str = "device=") -> torch.device:
    """``device`` as a ``torch.device``, or a ValueError saying what is wrong (``label`` prefixes the value).

    Refuses strings that are not devices and CUDA devices this machine does not have, so that a command
    fails before it starts rather than deep inside a run.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"{label}{device!r} is not a torch device ({err}); use e.g. 'cpu', 'cuda' or 'cuda:1'"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{label}{device!r}: no CUDA device is available on this machine; use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{label}{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
