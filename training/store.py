"""A SQLite store of benchmark runs, so reruns compute only what is missing.

Every inner training run of the benchmark is one row keyed by :class:`RunKey` ``(task_id, schedule,
seed, code_version)``: the task (:attr:`hpo_env.TaskSpec.task_id`, which hashes every field of the
task), the schedule with its parameters (e.g. ``"cosine@lr=0.003"`` or ``"policy@<bundle hash>"``),
the seed index, and the version of the code that produced it. Rows are written in transactions of
whole batches, so an interrupted benchmark keeps every finished batch and loses at most the one in
flight; reading back gives the same :class:`RunResult` that was written.

What the key leaves out: the batch a run was trained in. A run's numbers depend on its batch only
through float rounding: tasks sharing a stack are padded to its widest member, which changes the
order of some sums, and a policy's float32 network may round its actions differently with another
number of rows. So a run computed in another batch (a change of ``--chunk-size``, or a resumed
benchmark whose last batch is smaller) can differ in its last digits (up to about 2e-7 relative in
the final losses checked) from the one a single uninterrupted benchmark would have stored. Two processes sharing one store each compute what
is missing when they start (duplicated work, the last writer's row kept); give them separate stores
or run them one after the other::

    >>> import tempfile, os
    >>> folder = tempfile.TemporaryDirectory()
    >>> with ResultStore(os.path.join(folder.name, "runs.sqlite")) as store:
    ...     key = RunKey("tabular/wine/abc", "constant@lr=0.01", 0, "v1")
    ...     n = store.put_many([(key, RunResult(family="tabular", final_val_loss=0.5))])
    ...     store.get(key).final_val_loss
    0.5
    >>> folder.cleanup()
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["ResultStore", "RunKey", "RunResult"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    task_id TEXT NOT NULL,
    schedule TEXT NOT NULL,
    seed INTEGER NOT NULL,
    code_version TEXT NOT NULL,
    family TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (task_id, schedule, seed, code_version)
)
"""


class RunKey(NamedTuple):
    """What identifies one inner run: task, schedule (with its parameters), seed index, code version."""

    task_id: str
    schedule: str
    seed: int
    code_version: str


@dataclass
class RunResult:
    """What the benchmark keeps of one inner run (losses are NaN where a run diverged).

    ``hparams[name][t]`` and ``val_loss[t]`` follow :class:`training.rollout.EpisodeRecord`: the value
    used in interval ``t + 1`` and the validation loss after it.
    """

    family: str
    final_val_loss: float = math.nan
    test_loss: float = math.nan
    test_accuracy: float = math.nan
    test_macro_f1: float = math.nan
    initial_val_loss: float = math.nan
    diverged: bool = False
    episode_return: float = math.nan
    num_decisions: int = 0
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    hparams: dict[str, list[float]] = field(default_factory=dict)
    wall_s: float = math.nan
    spec: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunResult:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class ResultStore:
    """Runs keyed by :class:`RunKey` in one SQLite file (created with its folder if missing).

    Args:
        path: the database file.
        timeout: seconds to wait for another process's write lock.
    """

    def __init__(self, path: str | os.PathLike, timeout: float = 60.0) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"result store path {str(self.path)!r} is a directory; expected a .sqlite file path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"the result store's folder {str(self.path.parent)!r} cannot be created ({err.strerror or err}): "
                "pass a --store path in a writable folder"
            ) from err
        self._conn = sqlite3.connect(self.path, timeout=timeout)
        try:
            # A damaged page deep in the file would otherwise surface mid-benchmark: check the whole file now.
            check = self._conn.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else 'no answer'}")
            self._conn.execute(_SCHEMA)
            self._conn.commit()
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(runs)")}
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise ValueError(
                f"{self.path} is not a usable SQLite results store ({err}): move it aside (its runs are recomputed) "
                "or pass another --store path"
            ) from err
        expected = {"task_id", "schedule", "seed", "code_version", "result"}
        if not expected <= columns:
            self._conn.close()
            raise ValueError(
                f"{self.path} has a 'runs' table of another layout (columns {sorted(columns)}, expected "
                f"{sorted(expected)}): it is not an hpo-bench results store; pass another --store path"
            )

    # -- reading -----------------------------------------------------------------------------
    def get(self, key: RunKey) -> RunResult | None:
        """The stored result of ``key``, or None."""
        row = self._conn.execute(
            "SELECT result FROM runs WHERE task_id=? AND schedule=? AND seed=? AND code_version=?", tuple(key)
        ).fetchone()
        return None if row is None else RunResult.from_json(row[0])

    def get_many(self, keys: Iterable[RunKey]) -> dict[RunKey, RunResult]:
        """The stored results among ``keys`` (missing keys are absent from the dict)."""
        out = {}
        for key in keys:
            result = self.get(key)
            if result is not None:
                out[key] = result
        return out

    def missing(self, keys: Sequence[RunKey]) -> list[RunKey]:
        """The keys (in order, without repeats) that hold no result yet."""
        seen: set[RunKey] = set()
        todo = []
        for key in keys:
            if key in seen:
                continue
            seen.add(key)
            exists = self._conn.execute(
                "SELECT 1 FROM runs WHERE task_id=? AND schedule=? AND seed=? AND code_version=?", tuple(key)
            ).fetchone()
            if exists is None:
                todo.append(key)
        return todo

    def other_versions(self, keys: Iterable[RunKey]) -> dict[str, int]:
        """For keys with no result, the code versions that hold the same run (task, schedule, seed) instead.

        Returns ``{code_version: count of keys it holds}``, most first: the runs an edit of the code (or
        another torch version or thread count) made stale, which ``--code-version`` can reuse.
        """
        counts: dict[str, int] = {}
        for key in set(keys):
            rows = self._conn.execute(
                "SELECT code_version FROM runs WHERE task_id=? AND schedule=? AND seed=? AND code_version!=?",
                tuple(key),
            ).fetchall()
            for (version,) in rows:
                counts[version] = counts.get(version, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1]))

    def keys(self, code_version: str | None = None) -> list[RunKey]:
        """All stored keys (of one code version, if given)."""
        query = "SELECT task_id, schedule, seed, code_version FROM runs"
        args: tuple[str, ...] = ()
        if code_version is not None:
            query, args = query + " WHERE code_version=?", (code_version,)
        return [RunKey(*row) for row in self._conn.execute(query, args)]

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and len(key) == 4 and self.get(RunKey(*key)) is not None

    # -- writing -----------------------------------------------------------------------------
    def put_many(self, items: Iterable[tuple[RunKey, RunResult]]) -> int:
        """Write results in one transaction (all or none); an existing key is replaced. Returns the count."""
        rows = []
        now = time.time()
        for key, result in items:
            if not isinstance(key, RunKey):
                raise TypeError(f"keys must be RunKey tuples, got {type(key).__name__}")
            if not isinstance(result, RunResult):
                raise TypeError(f"results must be RunResult, got {type(result).__name__}")
            rows.append((*key, result.family, result.to_json(), now))
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"
