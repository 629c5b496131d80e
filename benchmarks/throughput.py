"""Meta-training throughput benchmark: how close the inner trainer and PPO get to the machine's limit.

Measures, side by side in one process (the machine is shared, so ratios matter more than absolutes):

* the dense float32 matmul peak (GFLOP/s) with 1 and 2 torch threads, the reference ceiling;
* inner optimiser steps per second of :class:`~hpo_env.HPOVecEnv` at several slot counts N, per task
  family, against the naive reference (N separate :class:`~hpo_env.HPOEnv` in SB3's ``DummyVecEnv``),
  and the ratio batched/naive;
* the achieved GFLOP/s of the inner training (forward+backward matmul FLOPs of the padded stacks,
  :func:`hpo_env.models.step_flops`) as a fraction of the peak, and the useful (unpadded) fraction;
* the share of an env step spent outside the tensor work (features, rewards, Python, grouping, resets);
* the same on a wide benchmark task (wide MLPs and batches), where matmuls can dominate;
* end-to-end meta-training timesteps/s (sb3_contrib RecurrentPPO over ``VecNormalize(HPOVecEnv)``) and
  the share of wall time in the environments, in PPO's rollout-side inference and in the PPO update,
  for torch threads, LSTM size, batch size and n_envs.

It prints a table last and writes every number as JSON (``--out``)::

    python benchmarks/throughput.py             # the default sweep, a few minutes on 2 cores
    python benchmarks/throughput.py --quick     # a smaller sweep
    python benchmarks/throughput.py --families teacher_regression --sizes 32 --no-ppo --profile 32
                                                # ... and where the time of a batched step goes
    python benchmarks/throughput.py --families digits_mlp --sizes 1 32 --no-naive --no-ppo --paths
                                                # ... and what the trainer's fast paths gain
    python benchmarks/throughput.py --families digits_mlp --sizes 32 --no-naive --paths --wide 256
                                                # ... also end to end (and the PPO sweep)
    python benchmarks/throughput.py --families digits_mlp --sizes 32 --no-naive --no-ppo --wide 256 --env-workers 2
                                                # ... and meta-training with its slots in 1 and 2 processes
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import hpo_env.trainer as trainer_module
from hpo_env import HPOEnv, HPOVecEnv, TaskDistribution, TaskSpec
from hpo_env.subproc import HPOSubprocVecEnv
from hpo_env.tasks import FAMILIES
from hpo_env.trainer import TrainerStats
from training.cli import HelpFormatter, non_negative_int, positive_float, positive_int, run_script

DEFAULT_OUT = Path(__file__).parent / "results" / "throughput.json"


# --------------------------------------------------------------------------------------------------
# the ceiling


def matmul_peak(threads: int, size: int = 2048, seconds: float = 1.0, device: str = "cpu") -> float:
    """Best GFLOP/s of a dense float32 ``size x size`` matmul with ``threads`` torch threads, or on an
    accelerator (``device``; timed in batches of 10 products between synchronisations, at the
    precision the inner trainer runs: float32, without TF32 unless the process enabled it)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    a, b = torch.randn(size, size, device=dev), torch.randn(size, size, device=dev)
    reps = 1 if dev.type == "cpu" else 10
    _sync(dev)
    a @ b
    _sync(dev)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(dev)
        best = max(best, reps * 2 * size**3 / (time.perf_counter() - t) / 1e9)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# inner training throughput


class WideTaskDistribution(TaskDistribution):
    """A benchmark-only task: teacher classification with wide MLPs and large batches."""

    def __init__(self, width: int = 256, batch: int = 256) -> None:
        super().__init__(("teacher_classification",), name=f"wide{width}")
        self.width, self.batch = width, batch

    def sample(self, rng: np.random.Generator) -> TaskSpec:
        return TaskSpec(
            family="teacher_classification",
            dataset="teacher",
            arch="mlp",
            hidden=(self.width, self.width),
            n_samples=4000,
            n_features=64,
            n_classes=10,
            optimizer=str(rng.choice(["sgd", "adamw"])),
            lr=1e-3,
            weight_decay=1e-2,
            batch_size=self.batch,
            total_steps=400,
            steps_per_action=20,
            seed=int(rng.integers(2**31 - 1)),
            data_seed=int(rng.integers(2**31 - 1)),
            activation="relu",
        )


@dataclass
class EnvResult:
    mode: str  # "batched" or "naive"
    family: str
    n: int
    env_steps: int
    seconds: float
    inner_steps_per_s: float
    env_steps_per_s: float
    gflops: float  # padded-stack FLOPs per second of wall time spent in inner training
    useful_fraction: float  # unpadded / padded FLOPs
    train_share: float  # of wall time: inner steps + validation
    group_share: float  # of wall time: (re)stacking groups
    eval_share: float  # of wall time: initial / test evaluations at resets
    outside_share: float  # 1 - train - eval: everything but tensor work (grouping, features, Python, resets)
    models_per_stack_step: float  # model steps per batched step: how many of the N slots one stack holds


def _sum_stats(stats: list[TrainerStats]) -> TrainerStats:
    total = TrainerStats()
    for s in stats:
        for f in total.__dataclass_fields__:
            setattr(total, f, getattr(total, f) + getattr(s, f))
    return total


def _random_stepper(venv, n: int, seed: int):
    """Reset ``venv``, take one warm-up step (first stacks, allocator); returns a random-action stepper."""
    rng = np.random.default_rng(seed)
    act_dim = venv.action_space.shape[0]

    def step() -> None:
        venv.step(rng.uniform(-1, 1, (n, act_dim)).astype(np.float32))

    venv.reset()
    step()
    return step


def measure_env(
    mode: str,
    family: str,
    dist: TaskDistribution,
    n: int,
    seconds: float,
    seed: int,
    min_steps: int = 2,
    gradient_features: bool = False,
    device: str = "cpu",
) -> EnvResult:
    """Step a batched or naive vec env with random actions for ``seconds``; count the inner work.

    Every env step ends with the features read on the host, so the wall clock needs no extra
    synchronisation on an accelerator.
    """
    if mode == "batched":
        venv = HPOVecEnv(n, dist, seed=seed, gradient_features=gradient_features, device=device)
        trainers = [venv.trainer]
    else:
        from stable_baselines3.common.vec_env import DummyVecEnv

        venv = DummyVecEnv([lambda: HPOEnv(dist, gradient_features=gradient_features, device=device) for _ in range(n)])
        venv.seed(seed)
        trainers = [e.unwrapped._batch.trainer for e in venv.envs]
    step = _random_stepper(venv, n, seed)
    for t in trainers:
        t.stats.reset()
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < seconds:
        step()
        steps += 1
    wall = time.perf_counter() - start
    st = _sum_stats([t.stats for t in trainers])
    venv.close()
    return EnvResult(
        mode=mode,
        family=family,
        n=n,
        env_steps=steps,
        seconds=wall,
        inner_steps_per_s=st.model_steps / wall,
        env_steps_per_s=steps * n / wall,
        gflops=st.flops / max(st.train_seconds, 1e-9) / 1e9,
        useful_fraction=st.model_flops / max(st.flops, 1.0),
        train_share=st.train_seconds / wall,
        group_share=st.group_seconds / wall,
        eval_share=st.eval_seconds / wall,
        outside_share=1.0 - (st.train_seconds + st.eval_seconds) / wall,
        models_per_stack_step=st.model_steps / max(st.group_steps, 1),
    )


def profile_env(family: str, dist: TaskDistribution, n: int, env_steps: int, seed: int, top: int = 15) -> list[dict]:
    """torch.profiler's top operators (by self CPU time) over ``env_steps`` steps of a batched env."""
    from torch.profiler import ProfilerActivity, profile

    venv = HPOVecEnv(n, dist, seed=seed)
    step = _random_stepper(venv, n, seed)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(env_steps):
            step()
    venv.close()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
            "us_per_call": e.self_cpu_time_total / max(e.count, 1),
        }
        for e in events[:top]
    ]


@contextmanager
def reference_paths(enabled: bool):
    """Run the trainer on its reference paths (autograd, and PyTorch's update rules as vectorised
    elementwise ops) instead of the fast ones (hand-written MLP and char-MLP backward, fused optimiser
    kernels)."""
    saved = trainer_module._MANUAL_BACKWARD, trainer_module._FUSED_OPTIMIZERS
    if enabled:
        trainer_module._MANUAL_BACKWARD = trainer_module._FUSED_OPTIMIZERS = False
    try:
        yield
    finally:
        trainer_module._MANUAL_BACKWARD, trainer_module._FUSED_OPTIMIZERS = saved


def _interleaved(
    modes: dict[str, Callable[[str, TaskDistribution, int], EnvResult]],
    families: list[tuple[str, TaskDistribution]],
    sizes: list[int],
    repeats: int,
) -> list[dict]:
    """Batched env steps/s of each mode per family and N, modes interleaved, best of ``repeats``."""
    rows = []
    for family, dist in families:
        for n in sizes:
            best = dict.fromkeys(modes, 0.0)
            for _ in range(repeats):
                for mode, measure in modes.items():
                    best[mode] = max(best[mode], measure(family, dist, n).inner_steps_per_s)
            rows.append({"family": family, "n": n, **{f"{k}_steps_per_s": v for k, v in best.items()}})
    return rows


def measure_paths(
    families: list[tuple[str, TaskDistribution]], sizes: list[int], seconds: float, seed: int, repeats: int = 2
) -> list[dict]:
    """Batched env steps/s on the fast paths against the reference paths, interleaved, best of ``repeats``."""

    def on(reference: bool):
        def measure(family: str, dist: TaskDistribution, n: int) -> EnvResult:
            with reference_paths(reference):
                return measure_env("batched", family, dist, n, seconds, seed)

        return measure

    return _interleaved({"fast": on(False), "reference": on(True)}, families, sizes, repeats)


def measure_gradient_cost(
    families: list[tuple[str, TaskDistribution]], sizes: list[int], seconds: float, seed: int, repeats: int = 2
) -> list[dict]:
    """Batched env steps/s without and with the optional gradient features, interleaved, best of ``repeats``."""

    def measure(features: bool):
        return lambda family, dist, n: measure_env(
            "batched", family, dist, n, seconds, seed, gradient_features=features
        )

    return _interleaved({"plain": measure(False), "gradient_features": measure(True)}, families, sizes, repeats)


def measure_paths_end_to_end(seed: int, repeats: int = 2, rollouts: int = 2) -> dict:
    """Meta-training decisions/s with the full preset's PPO settings on both trainer paths, interleaved."""
    from agents import PRESETS

    full = PRESETS["full"]
    cfg = PPOConfig(1, full.lstm_hidden_size, full.batch_size, full.n_envs, full.n_steps, n_epochs=full.n_epochs)
    best: dict[str, PPOResult] = {}
    for _ in range(repeats):
        for mode in ("reference", "fast"):
            with reference_paths(mode == "reference"):
                r = measure_ppo(cfg, seed, rollouts=rollouts)
            if mode not in best or r.timesteps_per_s > best[mode].timesteps_per_s:
                best[mode] = r
    return {mode: asdict(r) for mode, r in best.items()}


def measure_workers_end_to_end(seed: int, workers: int, repeats: int = 2, rollouts: int = 2) -> dict:
    """Meta-training decisions/s with the full preset's PPO settings, the slots stepped in this process and
    in ``workers`` processes (``hpo-train --env-workers``), interleaved; the best of ``repeats`` each."""
    from agents import PRESETS

    full = PRESETS["full"]
    best: dict[str, PPOResult] = {}
    for _ in range(repeats):
        for w in (1, workers):
            cfg = PPOConfig(
                1,
                full.lstm_hidden_size,
                full.batch_size,
                full.n_envs,
                full.n_steps,
                n_epochs=full.n_epochs,
                env_workers=w,
            )
            r = measure_ppo(cfg, seed, rollouts=rollouts)
            key = f"{w} env worker{'s' if w > 1 else ''}"
            if key not in best or r.timesteps_per_s > best[key].timesteps_per_s:
                best[key] = r
    return {key: asdict(r) for key, r in best.items()}


# --------------------------------------------------------------------------------------------------
# end to end


@dataclass
class PPOConfig:
    threads: int
    lstm: int
    batch_size: int
    n_envs: int
    n_steps: int
    n_epochs: int = 10
    env_device: str = "cpu"  # the inner models'
    policy_device: str = "cpu"  # the meta-agent's
    env_workers: int = 1  # processes stepping the slots (HPOSubprocVecEnv, one thread each); 1: HPOVecEnv here


@dataclass
class PPOResult:
    config: PPOConfig
    timesteps: int
    seconds: float
    timesteps_per_s: float
    env_share: float  # HPOVecEnv.step (inner training, features, resets)
    rollout_policy_share: float  # policy inference and buffer work while collecting
    update_share: float  # PPO's gradient epochs
    ppo_share: float  # everything but the environments


def measure_ppo(cfg: PPOConfig, seed: int, rollouts: int = 1) -> PPOResult:
    """RecurrentPPO over VecNormalize(HPOVecEnv) on the default distribution; time shares per part."""
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import VecEnvWrapper, VecNormalize

    torch.set_num_threads(cfg.threads)

    class TimedVecEnv(VecEnvWrapper):
        def __init__(self, venv):
            super().__init__(venv)
            self.seconds = 0.0

        def reset(self):
            return self.venv.reset()

        def step_wait(self):
            t = time.perf_counter()
            out = self.venv.step_wait()
            self.seconds += time.perf_counter() - t
            return out

    class RolloutTimer(BaseCallback):
        def __init__(self):
            super().__init__()
            self.seconds, self._t = 0.0, 0.0

        def _on_rollout_start(self) -> None:
            self._t = time.perf_counter()

        def _on_rollout_end(self) -> None:
            self.seconds += time.perf_counter() - self._t

        def _on_step(self) -> bool:
            return True

    if cfg.env_workers > 1:
        inner = HPOSubprocVecEnv(
            cfg.n_envs, "train", seed=seed, device=cfg.env_device, workers=cfg.env_workers, threads=cfg.threads
        )
    else:
        inner = HPOVecEnv(cfg.n_envs, "train", seed=seed, device=cfg.env_device)
    timed = TimedVecEnv(inner)
    venv = VecNormalize(timed, gamma=0.99)
    model = RecurrentPPO(
        "MlpLstmPolicy",
        venv,
        n_steps=cfg.n_steps,
        batch_size=cfg.batch_size,
        n_epochs=cfg.n_epochs,
        seed=seed,
        device=cfg.policy_device,
        policy_kwargs={"lstm_hidden_size": cfg.lstm},
    )
    model.set_logger(Logger(folder=None, output_formats=[]))  # no /tmp/SB3-<date> folder per run
    total = cfg.n_envs * cfg.n_steps * rollouts
    timer = RolloutTimer()
    start = time.perf_counter()
    try:
        model.learn(total, callback=timer)
    finally:
        venv.close()
    wall = time.perf_counter() - start
    env = timed.seconds
    return PPOResult(
        config=cfg,
        timesteps=model.num_timesteps,
        seconds=wall,
        timesteps_per_s=model.num_timesteps / wall,
        env_share=env / wall,
        rollout_policy_share=(timer.seconds - env) / wall,
        update_share=(wall - timer.seconds) / wall,
        ppo_share=(wall - env) / wall,
    )


# --------------------------------------------------------------------------------------------------


def _ratio_table(rows: list[dict], modes: dict[str, str], ratio: str, fmt: str) -> str:
    """Steps/s of two modes (``{key: column label}``) per family and N, from :func:`_interleaved`, and their ratio."""
    (before, after), labels = modes, list(modes.values())
    return _fmt_table(
        ["family", "N", *labels, ratio],
        [
            [
                r["family"],
                str(r["n"]),
                f"{r[f'{before}_steps_per_s']:,.0f}",
                f"{r[f'{after}_steps_per_s']:,.0f}",
                fmt.format(r[f"{after}_steps_per_s"] / r[f"{before}_steps_per_s"]),
            ]
            for r in rows
        ],
    )


def _progress(t0: float, results: list[EnvResult], family: str, n: int) -> None:
    """One line per family and N, with its numbers (a run cut short still leaves them in its log)."""
    done = " ".join(
        f"{r.mode} {r.inner_steps_per_s:,.0f} steps/s ({100 * r.outside_share:.0f}% outside)"
        for r in results
        if r.family == family and r.n == n
    )
    print(f"[{time.perf_counter() - t0:6.0f}s] {family} N={n}: {done}", flush=True)


def _fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="a smaller sweep (about a minute)")
    parser.add_argument("--families", nargs="+", default=None, help=f"task families (default: all of {FAMILIES})")
    parser.add_argument(
        "--sizes", nargs="+", type=positive_int, default=None, help="slot counts N (default 1 8 32 128)"
    )
    parser.add_argument("--seconds", type=positive_float, default=None, help="measuring time per env measurement")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads for the env measurements")
    parser.add_argument(
        "--wide", nargs="+", type=positive_int, default=None, help="widths of the wide task (default 256 512)"
    )
    parser.add_argument("--no-naive", action="store_true", help="skip the naive reference")
    parser.add_argument("--no-ppo", action="store_true", help="skip the end-to-end RecurrentPPO runs")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the task draws")
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device of the inner models (cpu, cuda, cuda:1...); on an accelerator the peak is its float32 "
        "matmul, the default sizes go up to 1024 and the PPO runs put the environments (and some policies) there",
    )
    parser.add_argument(
        "--naive-max",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="largest N for the naive reference (default: every N on cpu, 32 on an accelerator, where N "
        "separate environments launch N times the kernels)",
    )
    parser.add_argument(
        "--profile",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also profile the batched env at N slots per family (torch.profiler's top operators); 0: off",
    )
    parser.add_argument(
        "--paths",
        action="store_true",
        help="also compare the trainer's fast paths (hand-written MLP and char-MLP backward, fused optimisers) "
        "with its reference paths (autograd, vectorised update rules), per family and N, and end to end with the "
        "full preset's PPO settings (unless --no-ppo)",
    )
    parser.add_argument(
        "--env-workers",
        type=non_negative_int,
        default=0,
        metavar="W",
        help="also measure meta-training end to end with the full preset's PPO settings, its slots stepped in one "
        "process and in W processes (hpo-train --env-workers W), interleaved; 0: off",
    )
    parser.add_argument(
        "--gradient-cost",
        action="store_true",
        help="also measure what the optional gradient features (hpo-train --gradient-features) cost the batched "
        "env, per family and N (with and without, interleaved)",
    )
    args = parser.parse_args(argv)
    if args.out.is_dir():  # found out only when the numbers are written, after every measurement
        parser.error(
            f"--out {str(args.out)!r} is a folder; give the JSON file's path, e.g. {args.out / DEFAULT_OUT.name}"
        )
    if args.env_workers < 0 or args.env_workers == 1:
        parser.error(f"--env-workers must be 0 (off) or at least 2 (compared with 1), got {args.env_workers}")

    quick = args.quick
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r} is not a torch device ({err}); use cpu, cuda or cuda:N")
    accelerated = device.type != "cpu"
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    families = args.families or (["teacher_classification", "digits_mlp", "charlm"] if quick else list(FAMILIES))
    default_sizes = [1, 8, 32, 128] + ([512, 1024] if accelerated else [])
    sizes = args.sizes or ([1, 32] + ([1024] if accelerated else []) if quick else default_sizes)
    naive_max = args.naive_max if args.naive_max is not None else (32 if accelerated else max(sizes))
    seconds = args.seconds or (1.0 if quick else 2.0)
    wide = args.wide or ([256] if quick else [256, 512])
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")

    t0 = time.perf_counter()
    report: dict = {
        "command": " ".join(["python benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": torch.get_num_threads()},
        "device": str(device),
    }
    if device.type == "cuda":
        report["machine"]["accelerator"] = torch.cuda.get_device_name(device)
        report["machine"]["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    peak = {t: matmul_peak(t) for t in (1, 2)}
    report["matmul_peak_gflops"] = peak
    if accelerated:
        peak[str(device)] = env_peak = matmul_peak(args.threads, size=8192, seconds=2.0, device=str(device))
    else:
        env_peak = peak[args.threads] if args.threads in peak else matmul_peak(args.threads)

    torch.set_num_threads(args.threads)
    env_results: list[EnvResult] = []
    for family in families:
        dist = TaskDistribution([family], name=family)
        for n in sizes:
            env_results.append(measure_env("batched", family, dist, n, seconds, args.seed, device=args.device))
            if not args.no_naive and n <= naive_max:
                env_results.append(measure_env("naive", family, dist, n, seconds, args.seed, device=args.device))
            _progress(t0, env_results, family, n)
    for width in wide:
        dist = WideTaskDistribution(width, batch=256)
        for n in [32] + ([max(sizes)] if accelerated and max(sizes) > 32 else []):
            env_results.append(measure_env("batched", dist.name, dist, n, seconds, args.seed, device=args.device))
            if not args.no_naive and n <= naive_max:
                env_results.append(measure_env("naive", dist.name, dist, n, seconds, args.seed, device=args.device))
            _progress(t0, env_results, dist.name, n)
    report["env"] = [asdict(r) for r in env_results]
    if args.profile:
        report["profile"] = {
            family: profile_env(family, TaskDistribution([family], name=family), args.profile, 3, args.seed)
            for family in families
        }

    if args.paths:
        dists = [(f, TaskDistribution([f], name=f)) for f in families]
        dists += [(d.name, d) for d in (WideTaskDistribution(w, batch=256) for w in wide)]
        report["paths"] = measure_paths(dists, sizes, seconds, args.seed)
        if not args.no_ppo:
            report["paths_end_to_end"] = measure_paths_end_to_end(args.seed)
            torch.set_num_threads(args.threads)
        print(f"[{time.perf_counter() - t0:6.0f}s] fast vs reference paths done", flush=True)
    if args.env_workers > 1:
        report["env_workers_end_to_end"] = measure_workers_end_to_end(args.seed, args.env_workers)
        torch.set_num_threads(args.threads)
        for key, r in report["env_workers_end_to_end"].items():
            print(
                f"[{time.perf_counter() - t0:6.0f}s] full preset end to end, {key}: {r['timesteps_per_s']:,.0f} "
                f"decisions/s (environments {100 * r['env_share']:.0f}% of the wall time)",
                flush=True,
            )
    if args.gradient_cost:
        mix = [(f, TaskDistribution([f], name=f)) for f in families] + [("default mix", TaskDistribution.default())]
        report["gradient_cost"] = measure_gradient_cost(mix, sizes, seconds, args.seed)
        print(f"[{time.perf_counter() - t0:6.0f}s] gradient features' cost done", flush=True)

    ppo_results: list[PPOResult] = []
    if not args.no_ppo:
        # Two torch threads make every small op of the inner trainer slower on this shared 2-core machine
        # (OpenMP spin-waits), so the 2-thread configurations run a short rollout only.
        if accelerated:
            # The environments on the accelerator; the meta-agent on the CPU (the presets' choice) and on
            # the accelerator, where the larger n_envs and batches pay.
            dev = str(device)
            configs = [
                PPOConfig(1, 64, 2048, 64, 32, env_device=dev),
                PPOConfig(1, 64, 2048, 64, 32, env_device=dev, policy_device=dev),
                PPOConfig(1, 256, 4096, 256, 32, env_device=dev, policy_device=dev),
                PPOConfig(1, 256, 8192, 1024, 16, env_device=dev, policy_device=dev),
            ][: 2 if quick else None]
        elif quick:
            configs = [PPOConfig(2, 256, 128, 16, 16), PPOConfig(1, 64, 512, 16, 32)]
        else:
            configs = [
                PPOConfig(2, 256, 128, 16, 16),  # SB3-like batch, 256-unit LSTM, torch's default threads
                PPOConfig(1, 256, 128, 16, 16),  # the same with one thread
                PPOConfig(1, 64, 128, 32, 32),
                PPOConfig(1, 256, 1024, 32, 32),
                PPOConfig(1, 64, 1024, 32, 32),
                PPOConfig(1, 64, 2048, 64, 32),
            ]
        for cfg in configs:
            ppo_results.append(measure_ppo(cfg, args.seed))
            print(
                f"[{time.perf_counter() - t0:6.0f}s] PPO {cfg}: {ppo_results[-1].timesteps_per_s:,.0f} timesteps/s, "
                f"PPO side {100 * ppo_results[-1].ppo_share:.0f}%",
                flush=True,
            )
        torch.set_num_threads(args.threads)
    report["ppo"] = [asdict(r) for r in ppo_results]
    report["seconds"] = time.perf_counter() - t0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    # ---- the table, last
    by_key = {(r.mode, r.family, r.n): r for r in env_results}
    rows = []
    for r in env_results:
        if r.mode != "batched":
            continue
        naive = by_key.get(("naive", r.family, r.n))
        rows.append(
            [
                r.family,
                str(r.n),
                f"{r.inner_steps_per_s:,.0f}",
                f"{naive.inner_steps_per_s:,.0f}" if naive else "-",
                f"{r.inner_steps_per_s / naive.inner_steps_per_s:.1f}x" if naive else "-",
                f"{r.gflops:.1f}",
                f"{100 * r.gflops / env_peak:.0f}%",
                f"{100 * r.useful_fraction:.0f}%",
                f"{100 * r.outside_share:.0f}%",
                f"{100 * r.group_share:.0f}%",
                f"{r.models_per_stack_step:.1f}",
            ]
        )
    print()
    on_device = f"; {device} ({report['machine'].get('accelerator', device)}): {env_peak:,.0f}" if accelerated else ""
    print(
        f"matmul peak: {peak[1]:.1f} GFLOP/s (1 thread), {peak[2]:.1f} GFLOP/s (2 threads){on_device}; "
        f"env runs on {device} with {args.threads} CPU thread(s); {seconds:g} s per measurement"
    )
    print(
        _fmt_table(
            [
                "family",
                "N",
                "batched steps/s",
                "naive steps/s",
                "ratio",
                "GFLOP/s",
                "%peak",
                "useful",
                "outside",
                "grouping",
                "models/stack",
            ],
            rows,
        )
    )
    if report.get("paths"):
        print("\nthe trainer's fast paths against its reference paths (batched env, inner steps/s, best of 2)")
        print(_ratio_table(report["paths"], {"reference": "reference", "fast": "fast"}, "speed-up", "{:.2f}x"))
    if report.get("gradient_cost"):
        print("\nthe optional gradient features' cost (batched env, inner steps/s, best of 2)")
        print(
            _ratio_table(
                report["gradient_cost"], {"plain": "without", "gradient_features": "with"}, "with/without", "{:.2f}"
            )
        )
    if report.get("paths_end_to_end"):
        ref, fast = (report["paths_end_to_end"][m] for m in ("reference", "fast"))
        print(
            f"end to end, the full preset's PPO settings (best of 2): reference {ref['timesteps_per_s']:.0f} "
            f"decisions/s, fast {fast['timesteps_per_s']:.0f} ({fast['timesteps_per_s'] / ref['timesteps_per_s']:.2f}x); "
            f"PPO's share of the time {100 * ref['ppo_share']:.0f}% -> {100 * fast['ppo_share']:.0f}%"
        )
    for family, ops in report.get("profile", {}).items():
        print(f"\nwhere a batched env step goes: {family}, N = {args.profile} (self CPU time, torch.profiler)")
        print(
            _fmt_table(
                ["operator", "share", "calls", "us/call"],
                [[o["op"], f"{100 * o['share']:.1f}%", str(o["calls"]), f"{o['us_per_call']:.1f}"] for o in ops],
            )
        )
    if ppo_results:
        print()
        print(
            _fmt_table(
                [
                    "threads",
                    "env / policy",
                    "lstm",
                    "batch",
                    "n_envs",
                    "n_steps",
                    "timesteps/s",
                    "env",
                    "rollout policy",
                    "update",
                    "PPO side",
                ],
                [
                    [
                        str(p.config.threads),
                        f"{p.config.env_device} / {p.config.policy_device}",
                        str(p.config.lstm),
                        str(p.config.batch_size),
                        str(p.config.n_envs),
                        str(p.config.n_steps),
                        f"{p.timesteps_per_s:,.0f}",
                        f"{100 * p.env_share:.0f}%",
                        f"{100 * p.rollout_policy_share:.0f}%",
                        f"{100 * p.update_share:.0f}%",
                        f"{100 * p.ppo_share:.0f}%",
                    ]
                    for p in ppo_results
                ],
            )
        )
    if "env_workers_end_to_end" in report:
        rows = [
            [key, f"{r['timesteps_per_s']:,.0f}", f"{100 * r['env_share']:.0f}%", f"{100 * r['update_share']:.0f}%"]
            for key, r in report["env_workers_end_to_end"].items()
        ]
        one, many = (r["timesteps_per_s"] for r in report["env_workers_end_to_end"].values())
        print("\nfull preset end to end (RecurrentPPO, one thread per process), best of 2 interleaved runs each:")
        print(_fmt_table(["slots stepped by", "decisions/s", "env", "update"], rows))
        print(f"speed-up with {args.env_workers} env workers: {many / one:.2f}x")
    print(f"\n{report['seconds']:.0f} s in all; full numbers in {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(run_script(main))
