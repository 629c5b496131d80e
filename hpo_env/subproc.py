""":class:`HPOSubprocVecEnv`: the slots of an :class:`~hpo_env.HPOVecEnv` split across processes.

One :class:`~hpo_env.HPOVecEnv` steps its N slots as one batched program on one core (one torch
thread is the fastest for these small tensors). On a machine with more cores, the slots can be
split into P worker processes, each holding an ``HPOVecEnv`` of about N / P slots, stepped at the
same time: SB3's ``SubprocVecEnv`` idea, with a batched environment in each process instead of one
episode.

Slot ``i`` is the same slot as in one ``HPOVecEnv``: it draws its tasks from a generator seeded with
``seed + i`` and task groups are never split, so the environment samples the same tasks and trains
them the same way. The numbers agree up to float rounding (which slots share a batched kernel changes
its summation order), and a rerun with the same number of workers is bitwise identical.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import pickle
import signal
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices

from hpo_env.core import checked_actions
from hpo_env.envs import make_distribution
from hpo_env.vec_env import HPOVecEnv, _count, check_reset_options, checked_seed

__all__ = ["HPOSubprocVecEnv", "WorkerStoppedError", "ignore_sigint", "shard_sizes", "sigint_blocked"]


class WorkerStoppedError(RuntimeError):
    """A worker process of an :class:`HPOSubprocVecEnv` stopped (killed, or a signal sent to every process
    of the program); the environment is closed."""


def shard_sizes(num_envs: int, workers: int, task_group_size: int = 1) -> list[int]:
    """Slots per worker: whole task groups, spread as evenly as they go (the first workers get one more).

    >>> shard_sizes(32, 2, 2)
    [16, 16]
    >>> shard_sizes(10, 3, 2)
    [4, 4, 2]
    """
    groups = num_envs // task_group_size
    if not 1 <= workers <= groups:
        raise ValueError(
            f"workers must be between 1 and the number of task groups ({num_envs} slots / task_group_size "
            f"{task_group_size} = {groups}): each worker steps whole groups; got {workers}"
        )
    per, extra = divmod(groups, workers)
    return [(per + (k < extra)) * task_group_size for k in range(workers)]


#: Attributes every slot shares that the main process holds too: ``get_attr`` answers them here (the
#: slot count and reset infos of the whole environment, not a worker's), and ``set_attr`` sets them here too.
_SHARED_HERE = frozenset(
    {
        "render_mode",
        "decoder",
        "task_distribution",
        "task_group_size",
        "gradient_features",
        "epochs_feature",
        "num_envs",
        "reset_infos",
    }
)

#: Methods of the whole environment: ``env_method`` runs them here (the workers' seeds and options are the
#: main process's, sent with each reset).
_METHODS_HERE = frozenset({"seed", "set_options"})


class HPOSubprocVecEnv(VecEnv):
    """An :class:`~hpo_env.HPOVecEnv` of ``num_envs`` slots, stepped by ``workers`` processes.

    Args:
        num_envs, task_distribution, seed, task_group_size and the keyword arguments: as for
            :class:`~hpo_env.HPOVecEnv` (checked here, with its errors, before a process starts).
        workers: processes; each steps whole task groups (:func:`shard_sizes`).
        threads: torch CPU threads of each worker (one is the fastest for these small models; keep
            ``workers * threads`` within the machine's cores).
        start_method: multiprocessing start method; ``spawn`` (the default) never forks a process that
            holds torch's thread pools. A script that builds this environment at import time needs the
            ``if __name__ == "__main__":`` guard, as any spawned worker does.

    The attribute protocol is :class:`~hpo_env.HPOVecEnv`'s: ``get_attr("task")`` is per slot, other
    attributes and methods are shared by every slot (``set_attr`` and ``env_method`` apply to all of
    them, in every worker). Actions and reset options are checked here before any worker changes, as
    one ``HPOVecEnv`` checks them before any slot changes. Close it (or use it as a context manager) to
    stop the workers; they are daemons, so they also end with the main process, and they ignore
    Ctrl-C, which the main process handles. A wait for the workers that is interrupted (Ctrl-C in a
    notebook) closes the environment: its workers would be a step ahead of what the caller saw.
    """

    def __init__(
        self,
        num_envs: int,
        task_distribution: Any = None,
        *,
        workers: int = 2,
        threads: int = 1,
        seed: int | None = None,
        start_method: str = "spawn",
        **kwargs: Any,
    ) -> None:
        # One HPOVecEnv of all the slots checks every argument (it builds no model before a reset).
        probe = HPOVecEnv(num_envs, task_distribution, seed=seed, **kwargs)
        workers, threads = _count("workers", workers), _count("threads", threads)
        if threads < 1:
            raise ValueError(f"threads must be >= 1 (torch threads per worker), got {threads}")
        self.sizes = shard_sizes(probe.num_envs, workers, probe.task_group_size)
        self.offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self.decoder = probe.decoder
        self.task_distribution = probe.task_distribution
        self.task_group_size = probe.task_group_size
        self.gradient_features = probe.gradient_features
        self.epochs_feature = probe.epochs_feature
        self.feature_names = probe.feature_names
        self.render_mode = None
        super().__init__(probe.num_envs, probe.observation_space, probe.action_space)
        self.reset_infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        self._kwargs = {"task_distribution": probe.task_distribution, **kwargs}
        self._stepping = False  # step_async() sent actions that step_wait() has not collected
        self._out_of_step: str | None = None  # why the workers' episodes no longer agree (reset() mends it)
        self._pending: set[int] = set()  # workers whose answer has not been read
        self.closed = False
        self._closed_because = "close() was called"

        context: Any = multiprocessing.get_context(start_method)
        self._pipes: list[multiprocessing.connection.Connection] = []
        self._processes: list[Any] = []
        try:
            with sigint_blocked():  # the workers ignore Ctrl-C from their first instruction
                for size in self.sizes:
                    here, there = context.Pipe()
                    process = context.Process(
                        target=_worker, args=(there, size, self._kwargs, threads), daemon=True, name="hpo-env-worker"
                    )
                    process.start()
                    there.close()
                    self._pipes.append(here)
                    self._processes.append(process)
            self._pending = set(range(len(self._pipes)))
            self._receive_all()  # each worker's "ready", or the error that stopped it
        except BaseException:
            self.close()
            raise
        if seed is not None:
            self.seed(int(seed))

    # -- the VecEnv protocol ---------------------------------------------------------------------------
    def reset(self) -> np.ndarray:
        check_reset_options(self._options, self.task_group_size)  # before any worker changes
        if self._stepping:  # a step in flight is dropped, as one HPOVecEnv drops the actions it was given
            self.step_wait()
        seeds, options = list(self._seeds), list(self._options)
        for k, (o, n) in enumerate(zip(self.offsets, self.sizes)):
            self._send(k, "reset", (seeds[o : o + n], options[o : o + n]))
        try:
            results = self._receive_all()
        except Exception as err:
            self._out_of_step = f"a worker raised {type(err).__name__} during reset()"
            raise
        self._out_of_step = None
        self.reset_infos = [info for _, infos in results for info in infos]
        self._reset_seeds()
        self._reset_options()
        return np.concatenate([obs for obs, _ in results])

    def step_async(self, actions: np.ndarray) -> None:
        if self._stepping:
            raise RuntimeError("step_async() was called twice: call step_wait() for the step in flight first")
        if self._out_of_step is not None:
            raise RuntimeError(
                f"{self._out_of_step}, so its workers' episodes are out of step with each other (the others' "
                "results were dropped): call reset() before stepping again"
            )
        actions = checked_actions(actions, range(self.num_envs), self.decoder)  # before any worker steps
        for w, (o, n) in enumerate(zip(self.offsets, self.sizes)):
            self._send(w, "step", actions[o : o + n])
        self._stepping = True

    def step_wait(self):
        if not self._stepping:
            raise RuntimeError("step_async() must be called before step_wait()")
        try:
            results = self._receive_all()
        except Exception as err:
            self._out_of_step = f"a worker raised {type(err).__name__} during step()"
            raise
        finally:
            self._stepping = False
        infos: list[dict[str, Any]] = []
        for o, (_, _, _, shard_infos, reset_infos) in zip(self.offsets, results):
            infos += shard_infos
            for j, info in reset_infos.items():
                self.reset_infos[o + j] = info
        obs, rewards, dones = (np.concatenate([r[i] for r in results]) for i in range(3))
        return obs, rewards, dones, infos

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for k, pipe in enumerate(self._pipes):
            try:
                if k in self._pending and pipe.poll(10):
                    pipe.recv()  # the answer in flight, so that the worker reads the close
                pipe.send(("close", None))
            except Exception:  # (a dead worker, an answer that cannot be read: it is stopped below)
                pass
        self._pending.clear()
        for process in self._processes:
            process.join(5)
            for stop in (process.terminate, process.kill):
                if process.is_alive():
                    stop()
                    process.join(5)
        for pipe in self._pipes:
            pipe.close()

    def __enter__(self) -> HPOSubprocVecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tasks(self) -> list[Any]:
        """The task currently running in each slot."""
        return self.get_attr("task")

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        wanted = list(self._get_indices(indices))
        if attr_name in _SHARED_HERE:  # (also read by VecEnv.__init__, before the workers start)
            return [getattr(self, attr_name) for _ in wanted]
        for k in range(len(self._pipes)):
            self._send(k, "get_attr", attr_name)
        values = [value for shard in self._receive_all() for value in shard]
        return [values[i] for i in wanted]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._all_slots(indices, f"set_attr({attr_name!r})")
        for k in range(len(self._pipes)):
            self._send(k, "set_attr", (attr_name, value))
        self._receive_all()  # (the workers refuse what HPOVecEnv.set_attr refuses, before anything here changes)
        if attr_name in _SHARED_HERE:
            setattr(self, attr_name, make_distribution(value) if attr_name == "task_distribution" else value)

    def seed(self, seed: int | None = None) -> Sequence[None | int]:
        return super().seed(checked_seed(seed))

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        """Runs the method once in every worker (on its slots); returns each slot's worker's result.
        ``seed`` and ``set_options`` run here: the workers take the seeds and options with the next reset."""
        self._all_slots(indices, f"env_method({method_name!r})")
        if method_name in _METHODS_HERE:
            result = getattr(self, method_name)(*method_args, **method_kwargs)
            return [result for _ in range(self.num_envs)]
        for k in range(len(self._pipes)):
            self._send(k, "env_method", (method_name, method_args, method_kwargs))
        results = self._receive_all()
        return [result for result, n in zip(results, self.sizes) for _ in range(n)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]

    # -- plumbing ------------------------------------------------------------------------------------
    def _all_slots(self, indices: VecEnvIndices, what: str) -> None:
        if sorted(set(self._get_indices(indices))) != list(range(self.num_envs)):
            raise ValueError(
                f"HPOSubprocVecEnv.{what} with indices={indices!r}: its slots are batched programs that share "
                "their attributes and methods, so they apply to every slot; call it without indices"
            )

    def _send(self, k: int, command: str, payload: Any) -> None:
        if self.closed:
            raise RuntimeError(f"this HPOSubprocVecEnv is closed ({self._closed_because}): build a new one")
        if k in self._pending:
            raise RuntimeError(f"HPOSubprocVecEnv.{command}() while a step is in flight: call step_wait() first")
        try:
            self._pipes[k].send((command, payload))
        except (BrokenPipeError, ConnectionResetError) as err:
            self._worker_died(k, err)
        self._pending.add(k)

    def _receive_all(self) -> list[Any]:
        """Every worker's answer to the last command; the first worker's error is raised once all answered.

        A wait that does not end with every answer read (Ctrl-C, an answer that cannot be unpickled) closes
        the environment: the workers would answer out of step from then on."""
        answers = []
        try:
            for k, pipe in enumerate(self._pipes):
                try:
                    answers.append(pipe.recv())
                except (EOFError, ConnectionResetError) as err:
                    self._worker_died(k, err)
                self._pending.discard(k)
        except BaseException as err:
            if not self.closed:
                self._closed_because = f"a wait for its workers was interrupted by {type(err).__name__}"
                self.close()
            raise
        for k, (status, payload) in enumerate(answers):
            if status == "error":
                error, trace = payload
                o, n = self.offsets[k], self.sizes[k]
                raise error from _RemoteTraceback(
                    f"raised in environment worker {k} of {len(self._pipes)} (slots {o}-{o + n - 1}):\n{trace}"
                )
        return [payload for _, payload in answers]

    def _worker_died(self, k: int, err: BaseException) -> NoReturn:
        self._closed_because = f"environment worker {k} stopped"
        self.close()  # (which also waits for it: its exit code is known after)
        code = self._processes[k].exitcode if k < len(self._processes) else None
        raise WorkerStoppedError(
            f"environment worker {k} of {len(self._pipes)} stopped (exit code {code}); the environment is closed"
        ) from err


class _RemoteTraceback(Exception):
    """A worker's traceback, chained to the error it raised (as ``concurrent.futures`` does)."""

    def __str__(self) -> str:
        return str(self.args[0])


@contextmanager
def sigint_blocked() -> Iterator[None]:
    """Start child processes in this block so that they never see a Ctrl-C, and this process still does.

    The children start with SIGINT ignored (an ignored signal stays ignored across ``exec``, so a Ctrl-C
    while they import torch prints no traceback); :func:`ignore_sigint` keeps it so. Here SIGINT is
    blocked meanwhile too: a blocked signal is kept pending rather than dropped, and reaches this
    process's own handler when the block ends. The block lasts the few milliseconds the starts take; a
    Ctrl-C in them that the kernel hands to another thread of this process (one that does not block it)
    is dropped, and a second Ctrl-C is needed. Outside the main thread, or where signal masks do not
    exist (Windows), it does nothing."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C pending since the block began arrives now


def ignore_sigint() -> None:
    """In a child process started under :func:`sigint_blocked`: keep ignoring Ctrl-C (the parent handles it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker(pipe: multiprocessing.connection.Connection, size: int, kwargs: Mapping[str, Any], threads: int) -> None:
    """An environment worker: one HPOVecEnv of ``size`` slots, driven by commands on ``pipe``."""
    ignore_sigint()  # the main process handles Ctrl-C and closes the workers
    try:
        import torch

        torch.set_num_threads(threads)
        env = HPOVecEnv(size, **kwargs)
        pipe.send(("ok", None))
    except BaseException as err:
        _send_error(pipe, err)
        return
    while True:
        try:
            command, payload = pipe.recv()
        except (EOFError, OSError):  # the main process has gone
            return
        try:
            if command == "close":
                env.close()
                return
            if command == "step":
                env.step_async(payload)
                obs, rewards, dones, infos = env.step_wait()
                restarted = {int(j): env.reset_infos[j] for j in np.flatnonzero(dones)}
                result: Any = (obs, rewards, dones, infos, restarted)
            elif command == "reset":
                env._seeds, env._options = payload  # this worker's slice of the main process's
                result = (env.reset(), env.reset_infos)
            elif command == "get_attr":
                result = _sendable(env.get_attr(payload), f"get_attr({payload!r})")
            elif command == "set_attr":
                env.set_attr(*payload)
                result = None
            elif command == "env_method":
                name, args, kw = payload
                result = _sendable(env.env_method(name, *args, **kw)[0], f"env_method({name!r})")
            else:
                raise ValueError(f"unknown command {command!r}")
            pipe.send(("ok", result))
        except (BrokenPipeError, ConnectionResetError):  # the main process has gone
            return
        except BaseException as err:
            _send_error(pipe, err)


def _sendable(value: Any, what: str) -> Any:
    """``value`` if it can be sent to the main process; else a TypeError that says so."""
    try:
        pickle.dumps(value)
    except Exception as err:
        raise TypeError(
            f"{what}: the value cannot be sent from a worker process ({type(err).__name__}: {err}); read it from "
            "one HPOVecEnv instead"
        ) from None
    return value


def _send_error(pipe: multiprocessing.connection.Connection, err: BaseException) -> None:
    """Send ``err`` and its traceback to the main process (as a RuntimeError where it would not arrive intact)."""
    trace = traceback.format_exc()
    try:
        pickle.loads(pickle.dumps(err))  # an error that cannot be unpickled would stop the main process's read
        pipe.send(("error", (err, trace)))
    except (BrokenPipeError, ConnectionResetError):
        pass
    except Exception:
        pipe.send(("error", (RuntimeError(f"{type(err).__name__}: {err}"), trace)))
