"""HPOSubprocVecEnv: the slots of one HPOVecEnv stepped by worker processes, the same slots as in one process."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

from hpo_env import ActionDecoder, HPOVecEnv, ToyTaskDistribution, make_distribution
from hpo_env.subproc import HPOSubprocVecEnv, shard_sizes, sigint_blocked


class _BecomesALock:
    """Sent to a worker as a plain object, unpickled there as a ``threading.Lock``."""

    def __reduce__(self):
        return (threading.Lock, ())


class _FailsWhileAFileExists(ToyTaskDistribution):
    """Toy tasks, except that drawing one raises while ``path`` exists (in whichever process draws it)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def sample(self, rng):
        if os.path.exists(self.path):
            raise ValueError("no task today")
        return super().sample(rng)


def _step_both(one: HPOVecEnv, split: HPOSubprocVecEnv, actions: np.ndarray):
    a, b = one.step(actions), split.step(actions)
    np.testing.assert_array_equal(a[2], b[2])  # the same episodes end at the same decision
    np.testing.assert_allclose(b[0], a[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b[1], a[1], rtol=1e-3, atol=1e-5)
    for ia, ib in zip(a[3], b[3]):
        assert ia.keys() == ib.keys() and ia["task_id"] == ib["task_id"] and ia["decision"] == ib["decision"]
        if "terminal_observation" in ia:
            np.testing.assert_allclose(ib["terminal_observation"], ia["terminal_observation"], rtol=1e-4, atol=1e-5)
            assert ia["TimeLimit.truncated"] == ib["TimeLimit.truncated"]
    return a


def test_the_split_slots_are_the_slots_of_one_process_across_automatic_resets():
    # 6 slots in groups of 2: workers of 4 and 2 slots; every slot draws the tasks it draws in one process.
    kwargs = dict(task_group_size=2, seed=11)
    one = HPOVecEnv(6, "toy", **kwargs)
    with HPOSubprocVecEnv(6, "toy", workers=2, **kwargs) as split:
        assert split.sizes == [4, 2] and split.feature_names == one.feature_names
        assert split.observation_space == one.observation_space and split.action_space == one.action_space
        np.testing.assert_allclose(split.reset(), one.reset(), rtol=1e-5, atol=1e-6)
        assert split.tasks() == one.tasks() and split.reset_infos == one.reset_infos
        rng = np.random.default_rng(0)
        ended = 0
        for _ in range(30):
            dones = _step_both(one, split, rng.uniform(-1, 1, (6, 2)).astype(np.float32))[2]
            ended += int(dones.sum())
            assert split.tasks() == one.tasks()
            assert [i["hparams"] for i in split.reset_infos] == [i["hparams"] for i in one.reset_infos]
        assert ended >= 6  # every slot restarted at least once (toy episodes are 9 decisions)
        # Bad actions are refused before any worker steps: the slots stay in step with one process.
        with pytest.raises(ValueError, match=r"expected actions of shape \(6, 2\) .* got an array of shape \(5, 2\)"):
            split.step(np.zeros((5, 2), np.float32))
        nan = np.zeros((6, 2), np.float32)
        nan[4, 1] = np.nan
        with pytest.raises(ValueError, match=r"actions must be finite; slot\(s\) \[4\]"):
            split.step(nan)
        _step_both(one, split, np.zeros((6, 2), np.float32))
        assert split.get_attr("task", [1, 4]) == [one.tasks()[1], one.tasks()[4]]
        assert split.get_attr("decoder")[0].names == one.decoder.names
        assert split.env_method("tasks") == [one.tasks()[:4]] * 4 + [one.tasks()[4:]] * 2  # run once per worker


def test_seeds_options_and_a_divergence_in_the_workers():
    dist = make_distribution("toy")
    spec = dist.sample(np.random.default_rng(5))
    with HPOSubprocVecEnv(4, dist, workers=2, task_group_size=2) as split:
        split.seed(100)
        split.set_options([{}, {}, {"task": spec}, {"task": spec}])
        split.reset()
        tasks = split.tasks()
        assert tasks[2:] == [spec, spec]
        reference = HPOVecEnv(4, dist, seed=100, task_group_size=2)
        reference.reset()
        assert tasks[:2] == reference.tasks()[:2]
        split.reset()  # no seed, no options now: slot 2 draws from its own generator
        assert split.tasks()[2] != spec
        before = split.tasks()
        split.set_options([{}, {}, {}, {"task": spec}])  # a group member alone: refused, nothing restarted
        with pytest.raises(ValueError, match="slot 3 shares the task of slot 2"):
            split.reset()
        assert split.tasks() == before
        split.set_options(None)
        split.env_method("seed", 7)  # the environment's seeds, taken by the workers at the next reset
        split.reset()
        reference.seed(7)
        reference.reset()
        assert split.tasks() == reference.tasks()
        assert split.get_attr("num_envs") == [4] * 4 and split.get_attr("reset_infos")[0] == split.reset_infos

        # A divergence ends the group's episode with its penalty, as in one process.
        sgd = dataclasses.replace(spec, optimizer="sgd", lr=0.1)
        split.set_options([{}, {}, {"task": sgd}, {"task": sgd}])
        split.reset()
        up = np.array([[0, 0], [0, 0], [1, 0], [-0.5, 0]], np.float32)  # slot 2 raises SGD's rate until it diverges
        for _ in range(sgd.num_decisions):
            _, rewards, dones, infos = split.step(up)
            if dones[2:].any():
                break
        assert dones[2] and dones[3] and infos[2]["diverged"] and infos[3]["TimeLimit.truncated"]
        assert np.isfinite(rewards).all() and split.tasks()[2] != sgd


def test_errors_are_the_environments_errors_and_a_dead_worker_closes_it():
    with pytest.raises(ValueError, match="workers must be between 1 and the number of task groups"):
        HPOSubprocVecEnv(4, "toy", workers=3, task_group_size=2)  # refused before any process starts
    with pytest.raises(ValueError, match="task_group_size must be a positive integer that divides"):
        HPOSubprocVecEnv(3, "toy", workers=2, task_group_size=2)  # HPOVecEnv's own check
    with pytest.raises(ValueError, match="threads must be >= 1"):
        HPOSubprocVecEnv(2, "toy", workers=2, threads=0)
    assert shard_sizes(10, 3, 2) == [4, 4, 2] and shard_sizes(5, 5) == [1] * 5
    split = HPOSubprocVecEnv(2, "toy", workers=2, seed=0)
    split.set_options({"bogus": 1})
    with pytest.raises(ValueError, match=r"unknown reset options \['bogus'\]"):
        split.reset()  # (checked here, before any worker resets)
    split.set_options(None)  # (a reset that raised leaves its options, as in HPOVecEnv)
    with pytest.raises(RuntimeError, match=r"step_async\(\) must be called before step_wait\(\)") as caught:
        split.env_method("step_wait")  # an error in the workers: raised here, with the worker's traceback
    assert "environment worker 0 of 2 (slots 0-0)" in str(caught.value.__cause__)
    obs = split.reset()  # every worker answered: the pipes are still in step
    assert obs.shape == (2, split.observation_space.shape[0])
    with pytest.raises(ValueError, match="apply to every slot; call it without indices"):
        split.set_attr("divergence_penalty", 2.0, indices=[0])
    split.set_attr("some_flag", 3)
    assert split.get_attr("some_flag") == [3, 3]
    with pytest.raises(AttributeError):
        split.get_attr("no_such_attribute")
    split.set_attr("lock", _BecomesALock())  # in the workers: a lock, which pickle cannot send back
    with pytest.raises(TypeError, match=r"get_attr\('lock'\): the value cannot be sent from a worker process"):
        split.get_attr("lock")
    assert split.get_attr("trainer")[0].__class__.__name__ == "BatchedTrainer"  # (the trainer itself is sendable)
    split.step_async(np.zeros((2, 2), np.float32))
    with pytest.raises(RuntimeError, match=r"get_attr\(\) while a step is in flight: call step_wait\(\) first"):
        split.get_attr("task")
    split.reset()  # drops the step in flight, as HPOVecEnv drops the actions it was given
    assert split.get_attr("task", [1])[0] is not None
    # What cannot change is refused by the workers before anything changes here; what can takes effect there.
    decoder = split.decoder
    with pytest.raises(ValueError, match="decoder is fixed at construction"):
        split.set_attr("decoder", ActionDecoder(("lr",)))
    assert split.decoder is decoder
    split.set_attr("task_distribution", "toy")  # a split name, made a distribution here and in the workers
    assert isinstance(split.task_distribution, ToyTaskDistribution)
    assert all(isinstance(d, ToyTaskDistribution) for d in split.get_attr("task_distribution"))
    split.set_attr("divergence_penalty", 2.0)
    assert split.get_attr("divergence_penalty") == [2.0, 2.0]
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        split.seed(-1)

    os.kill(split._processes[1].pid, signal.SIGKILL)
    split._processes[1].join()
    with pytest.raises(RuntimeError, match=r"environment worker 1 of 2 stopped \(exit code -9\)"):
        split.step(np.zeros((2, 2), np.float32))
    assert split.closed and not any(p.is_alive() for p in split._processes)
    with pytest.raises(RuntimeError, match="closed"):
        split.reset()
    split.close()  # twice is fine


def test_a_worker_error_in_a_step_asks_for_a_reset_before_the_next(tmp_path):
    """A worker that raised while stepping (here drawing its next task) left the others' results unread:
    the workers' episodes no longer agree, so stepping again is refused until a reset."""
    flag = tmp_path / "fail"
    split = HPOSubprocVecEnv(2, _FailsWhileAFileExists(str(flag)), workers=2, seed=0)
    try:
        split.reset()
        flag.touch()
        with pytest.raises(ValueError, match="no task today"):
            for _ in range(200):  # until an episode ends and its worker draws the next task
                split.step(np.zeros((2, 2), np.float32))
        with pytest.raises(RuntimeError, match=r"a worker raised ValueError during step\(\), so .* call reset\(\)"):
            split.step(np.zeros((2, 2), np.float32))
        flag.unlink()
        split.reset()
        assert split.step(np.zeros((2, 2), np.float32))[0].shape[0] == 2
    finally:
        split.close()


class _InterruptedPipe:
    """A pipe whose next read is interrupted, as Ctrl-C interrupts a wait in a notebook."""

    def __init__(self, pipe) -> None:
        self.pipe, self.interrupt = pipe, True

    def recv(self):
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt
        return self.pipe.recv()

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def test_an_interrupted_wait_closes_the_environment_instead_of_answering_out_of_step():
    split = HPOSubprocVecEnv(2, "toy", workers=2, seed=0)
    split.reset()
    split._pipes[1] = _InterruptedPipe(split._pipes[1])
    with pytest.raises(KeyboardInterrupt):
        split.step(np.zeros((2, 2), np.float32))
    assert split.closed and not any(p.is_alive() for p in split._processes)
    with pytest.raises(RuntimeError, match=r"closed \(a wait for its workers was interrupted by KeyboardInterrupt\)"):
        split.step(np.zeros((2, 2), np.float32))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_ignore_ctrl_c_from_their_start_and_a_ctrl_c_meanwhile_reaches_this_process():
    with HPOSubprocVecEnv(2, "toy", workers=2) as split:
        for process in split._processes:  # SIGINT (signal 2) is bit 1 of the ignored set
            ignored = next(line for line in open(f"/proc/{process.pid}/status") if line.startswith("SigIgn"))
            assert int(ignored.split()[1], 16) & (1 << (signal.SIGINT - 1))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a CI runner may start us ignoring it)
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigint_blocked():  # as while workers start: ignored for them, kept pending for this process
                # (sent to this thread: a process-wide one may go to another thread of the test process)
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)
                time.sleep(0.05)
            pytest.fail("the Ctrl-C sent while the workers started was lost")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
