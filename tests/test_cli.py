"""The scripts' shared command-line handling (training.cli): bad input ends with a message, not a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from training.cli import run_script
from training.threads import torch_threads


def test_run_script_reports_bad_configuration_and_interrupts(capsys):
    def bad(argv):
        raise ValueError("total_steps must be >= 1, got 0")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_script(bad) == 2
    assert capsys.readouterr().err.endswith("error: total_steps must be >= 1, got 0\n")
    assert run_script(interrupted) == 130
    assert run_script(lambda argv: {"a": 1}, ok=bool) == 0
    assert run_script(lambda argv: {}, ok=bool) == 1
    with pytest.raises(RuntimeError):  # a bug is not a configuration error: its traceback stays
        run_script(lambda argv: (_ for _ in ()).throw(RuntimeError("bug")))


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("benchmarks/scheduler_step.py", ["--calls", "0"], "--calls: must be an integer >= 1, got '0'"),
        ("benchmarks/episode_time.py", ["--split", "nosuch"], "--split: invalid choice"),
        ("examples/deploy_policy.py", ["--lr-max-rise", "0"], "--lr-max-rise: must be a positive number"),
        ("examples/deploy_policy.py", ["--threads", "0"], "--threads: must be an integer >= 1"),
    ],
)
def test_scripts_refuse_bad_arguments_before_any_work(load_script, capsys, script, argv, message):
    with pytest.raises(SystemExit) as exc:
        run_script(load_script(script).main, argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_script_names_an_unknown_policy(load_script, capsys):
    main = load_script("examples/deploy_policy.py").main
    argv = ["--policy", "nosuch", "--problems", "digits", "--seeds", "1", "--decisions", "2"]
    with torch_threads(None):  # the example sets its own; the caller's count comes back after
        assert run_script(main, argv) == 2
    assert "no policy named 'nosuch' ships with hpo-meta" in capsys.readouterr().err


def test_help_shows_the_defaults_it_does_not_already_state():
    import argparse

    from training.cli import HelpFormatter

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--sizes", nargs="+", default=[1, 8], help="sizes")
    parser.add_argument("--cap", default=None, help="cap (default: the policy's)")
    parser.add_argument("--quick", action="store_true", help="smaller")
    text = " ".join(parser.format_help().split())
    assert "seed (default: 0)" in text and "sizes (default: 1 8)" in text
    assert "cap (default: the policy's)" in text and "smaller (default" not in text


def _show_warnings_as_printed(monkeypatch) -> list[str]:
    """Route shown warnings through ``warnings.formatwarning`` into a list (pytest records them otherwise)."""
    import warnings

    shown: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        shown.append(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)
    return shown


def test_commands_print_warnings_as_prog_warning_message(monkeypatch, capsys):
    import warnings

    import training.benchmark
    import training.train

    shown = _show_warnings_as_printed(monkeypatch)

    def warns(*args, **kwargs):
        warnings.warn("the policy was meta-trained on ['tabular']", stacklevel=2)
        warnings.warn("an old option", DeprecationWarning, stacklevel=2)
        raise KeyboardInterrupt  # stop before any work or printing

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert run_script(lambda argv: warns(), [], ok=None) == 130
        monkeypatch.setattr(training.train, "train", warns)
        assert training.train.main(["--preset", "quick"]) == 130
        monkeypatch.setattr(training.benchmark, "run_benchmark", warns)
        assert training.benchmark.main(["--policy", "default"]) == 130
    progs = [Path(sys.argv[0]).name, "hpo-train", "hpo-bench"]
    assert shown == [
        line
        for prog in progs
        for line in (
            f"{prog}: warning: the policy was meta-trained on ['tabular']\n",
            f"{prog}: warning (DeprecationWarning): an old option\n",
        )
    ]
    # Outside the commands, warnings read as Python prints them (the library does not touch the format).
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("plain", UserWarning, stacklevel=1)
    assert shown[-1].startswith(__file__) and "UserWarning: plain" in shown[-1]
    capsys.readouterr()


def test_installed_commands_start_through_launch(monkeypatch):
    """Every installed command of the package is a ``training.cli`` function that launches its own
    module's ``main`` under its own name."""
    import importlib
    from importlib.metadata import entry_points

    import training.cli

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.dist and ep.dist.name == "hpo-meta"}
    launched = []
    monkeypatch.setattr(training.cli, "launch", lambda module, prog: launched.append((module, prog)) or 0)
    for prog, ep in scripts.items():
        assert ep.module == "training.cli", ep.value
        assert ep.load()() == 0
        assert launched[-1][1] == prog
        assert callable(importlib.import_module(launched[-1][0]).main)
    assert sorted(scripts) == ["hpo-average", "hpo-bench", "hpo-demo", "hpo-ensemble", "hpo-train"]


def test_launch_returns_the_status_of_main(monkeypatch, capsys):
    import types

    import training.cli

    fake = types.SimpleNamespace(main=lambda: 2)
    monkeypatch.setattr(training.cli.importlib, "import_module", lambda module: fake)
    assert training.cli.launch("x", "hpo-x") == 2
    fake.main = lambda: None  # hpo-demo's main returns nothing
    assert training.cli.launch("x", "hpo-x") == 0
    capsys.readouterr()

    def interrupted():  # a command that does not catch Ctrl-C itself (hpo-demo, hpo-average, hpo-ensemble)
        raise KeyboardInterrupt

    fake.main = interrupted
    assert training.cli.launch("x", "hpo-x") == 130
    assert capsys.readouterr().err == "\nhpo-x: interrupted\n"


def test_a_ctrl_c_while_a_command_imports_exits_130_without_a_traceback():
    """A real SIGINT 50 ms into ``hpo-train``, while torch is still importing (a second or more). Twice:
    it must not land in a C extension's import as an ImportError either."""
    import subprocess

    code = (
        "import os, signal, sys\n"
        "import training.cli\n"
        "signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))\n"
        "signal.setitimer(signal.ITIMER_REAL, float(sys.argv[1]))\n"
        "sys.argv = ['hpo-train', '--help']  # if the imports ever won the race: help, status 0, no training\n"
        "sys.exit(training.cli.hpo_train())\n"
    )
    for delay in ("0.05", "0.3"):
        done = subprocess.run([sys.executable, "-c", code, delay], capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stderr) == (130, "\nhpo-train: interrupted\n"), delay


def test_sigterm_stops_hpo_train_and_hpo_bench_as_ctrl_c_does(monkeypatch, capsys):
    """``kill PID`` or a cluster scheduler's SIGTERM raises KeyboardInterrupt in the commands, so their
    cleanup and resume hint run (Python's default ends the process on the spot); status 143, as for a
    process the signal ended. The previous handler is back afterwards."""
    import os
    import signal
    import time

    import training.benchmark
    import training.train

    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # (else the commands leave it to its handler)

    def terminated(*args, **kwargs):
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # not handled: do not end the test run
            return None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises in the sleep
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(training.train, "train", terminated)
    assert training.train.main(["--preset", "quick"]) == 143
    monkeypatch.setattr(training.benchmark, "run_benchmark", terminated)
    assert training.benchmark.main(["--policy", "default"]) == 143
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize(
    "script",
    sorted(
        str(p.relative_to(Path(__file__).resolve().parents[1]))
        for folder in ("benchmarks", "examples")
        for p in (Path(__file__).resolve().parents[1] / folder).glob("*.py")
    ),
)
def test_script_help_is_readable(load_script, capsys, script):
    """``--help`` exits 0, names every option's purpose, and does not run a docstring's command lines
    together into one paragraph (episode_time.py printed "python benchmarks/episode_time.py # 5 tasks per
    family; N = 1, 8, 32 python benchmarks/...")."""
    with pytest.raises(SystemExit) as exc:
        load_script(script).main(["--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and text.startswith("usage:")
    assert "python benchmarks/" not in text and "python examples/" not in text
    options = text.split("options:", 1)[1].splitlines()
    # An option line whose help is missing is followed directly by the next option (or nothing).
    for line, after in zip(options, options[1:] + [""]):
        if line.lstrip().startswith("--") and "  " not in line.strip():
            assert after.startswith(" " * 10) and not after.lstrip().startswith("-"), f"no help for {line.strip()}"


@pytest.mark.parametrize(("tests_status", "bench_status", "expected"), [(0, 0, 0), (1, 0, 1), (0, 2, 1)])
def test_gpu_check_exits_non_zero_when_a_stage_fails(tmp_path, tests_status, bench_status, expected):
    """``benchmarks/gpu_check.sh`` ran every stage through ``| tee`` and ended with ``echo``: it exited 0
    with failed CUDA tests or a crashed benchmark, so a job running it could not tell. Each stage still
    runs; the status says whether all passed. (Stub ``python`` and ``nvidia-smi``: no GPU needed.)"""
    import shutil
    import subprocess

    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    root = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho stub-gpu\n")
    # The stub python: the pytest stage exits tests_status, the benchmark stage bench_status.
    (bin_dir / "python").write_text(
        f'#!/bin/sh\ncase "$1 $2" in *throughput.py*) exit {bench_status};; "-m pytest") exit {tests_status};; esac\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(bin_dir / "python"), "GPU_CHECK_QUICK": "1"}
    done = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == expected, done.stdout + done.stderr
    assert ("== failed:" in done.stdout) == bool(expected) and (tmp_path / "out" / "cuda_tests.log").is_file()


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("examples/deploy_policy.py", ["--problems", "digits", "--seeds", "1", "--decisions", "2", "--out"], "is a file"),
        ("benchmarks/horizon.py", ["--problems", "digits", "--seeds", "1", "--calls", "2", "--steps", "2", "--json"],
         "is a folder; give the JSON file's path"),
        ("benchmarks/throughput.py", ["--families", "teacher_regression", "--sizes", "1", "--seconds", "0.01",
         "--no-ppo", "--no-naive", "--wide", "4", "--out"], "is a folder; give the JSON file's path"),
    ],
)  # fmt: skip
def test_scripts_refuse_an_output_path_they_cannot_write_before_any_work(
    load_script, capsys, tmp_path, script, argv, message
):
    """A file given for the plot folder, or a folder for the JSON file, ended in a FileExistsError or
    IsADirectoryError traceback after every run (throughput.py printed its table only after the JSON)."""
    target = tmp_path / "a-file"
    target.write_text("")
    with torch_threads(None), pytest.raises(SystemExit) as exc:  # the scripts set their own thread counts
        run_script(load_script(script).main, [*argv, str(target if "deploy" in script else tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_episode_time_runs_one_untimed_episode_first(load_script, monkeypatch):
    """The first episode of a process took 1.5 s against 0.1 s after it (one-time costs), which made the
    first family's row (teacher_regression) read 14x slower than it is; one untimed episode now runs first."""
    script = load_script("benchmarks/episode_time.py")
    monkeypatch.setattr(script, "FAMILIES", ("tabular",))
    events: list[str] = []
    reset = script.HPOEnv.reset
    monkeypatch.setattr(script.HPOEnv, "reset", lambda self, **kw: events.append("reset") or reset(self, **kw))
    with torch_threads(1):
        ((family, median, steps, rate),) = script.episode_times(1, seed=0)
    assert family == "tabular" and median > 0 and rate > 0
    # Two episodes for one task: the untimed warm-up, then the timed one.
    assert events.count("reset") == 2
