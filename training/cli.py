"""What the command-line scripts share: argparse types for counts, and one way to report errors.

The package's commands (``hpo-train``, ``hpo-bench``, ...) and the scripts under ``benchmarks/`` and
``examples/`` all end the same way on bad input: ``prog: error: message`` on stderr and exit status
2 (argparse's convention), 130 on Ctrl-C, never a traceback for a mistake on the command line. Their
warnings read ``prog: warning: message``, without Python's file, line and source echo (which name
library internals, not the user's command).

>>> positive_int("3")
3
>>> positive_int("0")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: must be an integer >= 1, got '0'
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "HelpFormatter",
    "NameList",
    "StopRequest",
    "Terminated",
    "cannot_write",
    "interrupted_status",
    "launch",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "readable_warnings",
    "replace_file",
    "run_script",
    "sigterm_as_interrupt",
]


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with each option's default, where it has one worth showing that its help does not
    already state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (
            action.required
            or "(default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default in ("", [])
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


class NameList(argparse.Action):
    """An option taking names space- or comma-separated (``--families a b`` or ``--families a,b``), stored
    as one flat list; a list with no name in it (``--families ,``) is an error, not the default."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None):
        given = [values] if isinstance(values, str) else list(values)
        names = [name.strip() for value in given for name in str(value).split(",") if name.strip()]
        if not names:
            parser.error(f"{option} needs at least one name, got {' '.join(map(str, given))!r}")
        setattr(namespace, self.dest, names)


def _integer_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


#: argparse ``type=`` for counts (tasks, seeds, steps, threads, ...).
positive_int = _integer_at_least(1)
positive_int.__name__ = "positive_int"
#: argparse ``type=`` for seeds and counts that may be 0.
non_negative_int = _integer_at_least(0)
non_negative_int.__name__ = "non_negative_int"


def positive_float(text: str) -> float:
    """argparse ``type=`` for a positive, finite number (seconds, factors, ...)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


@contextlib.contextmanager
def readable_warnings(prog: str) -> Iterator[None]:
    """Within the block, warnings print as ``prog: warning: message`` (with the category when it is not a
    plain ``UserWarning``), the way command-line tools report, instead of Python's
    ``path/to/module.py:123: UserWarning: message`` and the source line. Filters are unchanged: this
    only formats what would be shown anyway.

    >>> import warnings
    >>> with readable_warnings("hpo-bench"):
    ...     print(warnings.formatwarning("K = 2 is coarse", UserWarning, "benchmark.py", 1), end="")
    hpo-bench: warning: K = 2 is coarse
    """
    original = warnings.formatwarning

    def format_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
        kind = "" if category is UserWarning else f" ({category.__name__})"
        return f"{prog}: warning{kind}: {message}\n"

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = original


def run_script(
    main: Callable[[list[str] | None], Any],
    argv: list[str] | None = None,
    *,
    ok: Callable[[Any], bool] | None = None,
) -> int:
    """Run a script's ``main(argv)`` and return its exit status: 0, or 1 where ``ok(result)`` is false; a
    bad configuration (``ValueError``, which includes :class:`agents.BundleError`, or a missing file) is
    reported as ``prog: error: ...`` with status 2, and Ctrl-C as status 130."""
    prog = Path(sys.argv[0]).name
    try:
        with readable_warnings(prog):
            result = main(argv)
    except KeyboardInterrupt:
        return _interrupted(prog)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 1 if ok is not None and not ok(result) else 0


def launch(module: str, prog: str) -> int:
    """Import a command's module and return the exit status of its ``main()``: the installed commands
    start here, so that a Ctrl-C while torch and the rest import (a few seconds), or in a command that
    does not catch it itself, ends with ``prog: interrupted`` and status 130, not a traceback.

    During the imports a Ctrl-C is held until they finish: raised inside a C extension's import it
    would surface as that library's ``ImportError`` (numpy's "Importing the numpy C-extensions failed").
    A Python handler that only records it holds it (it runs in the main thread, whichever thread the
    kernel hands the signal to); :func:`hpo_env.subproc.sigint_blocked`, which masks the signal for the
    milliseconds of a process start, would import the very packages this waits for."""
    interrupted: list[int] = []
    hold = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) not in (
        signal.SIG_IGN,
        None,
    )
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum)) if hold else None
    try:
        main = importlib.import_module(module).main
    finally:
        if hold:
            signal.signal(signal.SIGINT, previous)
    try:
        if interrupted:
            raise KeyboardInterrupt
        status = main()
    except KeyboardInterrupt:  # the commands that handle it themselves (hpo-train, hpo-bench) return 130 first
        return _interrupted(prog)
    return 0 if status is None else int(status)


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised as Ctrl-C's ``KeyboardInterrupt`` is (see :func:`sigterm_as_interrupt`)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Handle SIGTERM as Ctrl-C in this block: raise :class:`Terminated` (a ``KeyboardInterrupt``) in the
    main thread.

    ``kill PID`` and cluster schedulers (Slurm, Kubernetes) send SIGTERM before they stop a job. Python's
    default for it ends the process on the spot: no ``finally`` runs, so the TensorBoard events not yet
    flushed are lost, worker processes are left to finish their batch, and nothing says how to resume. A
    command that handles Ctrl-C handles SIGTERM the same way with this. Outside the main thread, or where
    SIGTERM already has a handler (the caller's own), it does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


class StopRequest:
    """A stop asked for by a first Ctrl-C or SIGTERM, for work that can only stop cleanly at some points.

    Within :meth:`listening`, a first Ctrl-C (or SIGTERM, where :func:`sigterm_as_interrupt` handles it) prints
    ``message`` and is only recorded in :attr:`requested`: the work checks it at its next clean stopping point
    and raises it there. A second one raises at once, as without this (``KeyboardInterrupt``, :class:`Terminated`).
    A signal whose handler is another one (the caller's own), or a block outside the main thread, is left as it is.
    """

    def __init__(self, message: str) -> None:
        self.message = message
        #: the exception the first signal would have raised (KeyboardInterrupt or Terminated); None: no request
        self.requested: type[KeyboardInterrupt] | None = None

    @contextlib.contextmanager
    def listening(self) -> Iterator[StopRequest]:
        handled: dict[int, type[KeyboardInterrupt]] = {}
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                handled[signal.SIGINT] = KeyboardInterrupt
            if signal.getsignal(signal.SIGTERM) is _raise_terminated:
                handled[signal.SIGTERM] = Terminated

        def request(signum: int, frame: Any) -> None:
            if self.requested is not None:
                raise handled[signum]
            self.requested = handled[signum]
            try:
                print(f"\n{self.message}", file=sys.stderr, flush=True)
            except RuntimeError:  # (a reentrant write: the signal came in the middle of one to stderr)
                os.write(2, f"\n{self.message}\n".encode())

        previous = {signum: signal.signal(signum, request) for signum in handled}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def interrupted_status(err: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by ``err``: 130 for Ctrl-C, 143 (128 + SIGTERM) for
    :class:`Terminated`, as the shell reports a process that the signal ended."""
    return 128 + signal.SIGTERM if isinstance(err, Terminated) else 130


#: ``errno`` values of an output that can no longer be written: full, read-only, over quota, no permission.
UNWRITABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def cannot_write(err: BaseException) -> bool:
    """Whether ``err`` is an ``OSError`` saying the output can no longer be written (:data:`UNWRITABLE_ERRNOS`),
    which a command reports in a line (what is saved, how to go on) rather than a traceback."""
    return isinstance(err, OSError) and err.errno in UNWRITABLE_ERRNOS


def replace_file(path: Path, write: Callable[[Path], Any]) -> None:
    """Write a file with ``write(tmp)`` into a temporary sibling, then rename it over ``path`` (atomic): a kill
    or a full disk meanwhile leaves the previous file, never a truncated one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _interrupted(prog: str) -> int:
    """Report a Ctrl-C as the commands do, and return its exit status."""
    print(f"\n{prog}: interrupted", file=sys.stderr)
    return 130


# The installed commands (``[project.scripts]`` in pyproject.toml). This module imports nothing heavy.
def hpo_train() -> int:
    return launch("training.train", "hpo-train")


def hpo_bench() -> int:
    return launch("training.benchmark", "hpo-bench")


def hpo_average() -> int:
    return launch("training.averaging", "hpo-average")


def hpo_ensemble() -> int:
    return launch("agents.bundle", "hpo-ensemble")


def hpo_demo() -> int:
    return launch("hpo_env.__main__", "hpo-demo")
