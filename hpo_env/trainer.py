"""The batched inner trainer: N inner models trained as one tensor program.

:class:`BatchedTrainer` owns N *slots*. Each slot holds one task (data, model, optimiser state and
its own hyperparameter values). ``train_chunk`` runs each slot's K optimiser steps for many slots at
once: slots whose models share a structure (:attr:`ModelLayout.stack_key`: architecture and depth;
and the task type) are stacked along a leading model dimension, zero-padded to the widest member, and
trained together with batched matmuls and grouped convolutions. Within a stack, models may differ in
widths, inputs, classes, activation (:class:`~hpo_env.models.StackActivation`), minibatch size
(padded samples get zero weight in the loss), optimiser and steps per chunk K. Rows are ordered by
(K, optimiser, activation): each run of rows sharing an optimiser gets its own update, and once the
rows with the smallest K are done, the stack goes on as its tail of rows (a view, no copy), so a
model never takes a step it would not take alone. The optimisers (SGD with momentum, AdamW) follow
PyTorch's exact update rules with per-model hyperparameters: on CPU through PyTorch's own fused
kernels, one call per model; elsewhere as vectorised updates over the stack. MLP stacks take their
gradients from a hand-written backward (:func:`~hpo_env.models.gradients`), as do char-MLP
stacks; the CNN from autograd.

Which slots share a stack is a cost decision: padding a small model up to a large one wastes FLOPs,
a separate stack costs a fixed per-step overhead (``group_overhead_flops``). Slots of one key are
merged greedily, largest first, into the stack where they add the least cost, or get a stack of their
own when that is cheaper. Results do not depend on the grouping (up to float summation order).

Stacks (*groups*) are kept between calls while their membership is unchanged, so a steady batch of
slots pays the stacking cost once per episode, not once per chunk. All randomness of a slot (its
initialisation and its minibatch order) comes from a CPU ``torch.Generator`` seeded by the task, so
a slot trains identically alone or inside any batch, on any device.

Divergence (a non-finite loss or parameter, or a validation loss that exploded) is detected per model
after each chunk and reported, never raised: NaNs stay inside their own model's slice of the stack.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TypedDict, cast

import numpy as np
import torch

from hpo_env.checks import check_device, is_integer, is_number
from hpo_env.data import DataSplits, build_splits
from hpo_env.features import GradientStats
from hpo_env.models import (
    HAND_WRITTEN_BACKWARD,
    ModelLayout,
    StackActivation,
    forward,
    gradients,
    init_params,
    step_flops,
)
from hpo_env.tasks import TaskSpec

__all__ = ["HPARAM_NAMES", "BatchedTrainer", "ChunkResult", "TrainerStats", "check_device"]


#: Every hyperparameter the trainer applies per model; ``momentum`` is Adam's beta1 for AdamW.
HPARAM_NAMES = ("lr", "weight_decay", "momentum")


def _in_torch_defaults(method):
    """Run a trainer entry point the same whatever the caller's torch modes.

    Autograd is on (also under the caller's ``torch.no_grad()`` or ``torch.inference_mode()``: the CNN
    takes its gradients from autograd), and float32 is the default dtype (under
    ``torch.set_default_dtype(torch.float64)`` a seed would otherwise draw other parameters, or the
    float32 data would meet float64 weights).
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                return method(*args, **kwargs)
        finally:
            torch.set_default_dtype(dtype)

    return wrapper


#: A validation loss above this many times a run's reference loss counts as divergence (as a non-finite one
#: does): the environments' default, and the deployed scheduler's rule.
DIVERGENCE_FACTOR = 1e3
_ADAM_BETA2 = 0.999
_ADAM_EPS = 1e-8


@dataclass
class ChunkResult:
    """Per-slot results of a chunk of inner training (arrays aligned with the requested slots)."""

    train_loss: np.ndarray  # mean minibatch loss over the chunk
    val_loss: np.ndarray
    val_accuracy: np.ndarray  # NaN for regression
    diverged: np.ndarray  # bool
    #: With ``gradient_stats``: the chunk's mean cosine between consecutive minibatch gradients and
    #: mean log gradient norm (:class:`~hpo_env.features.GradientStats`); NaN otherwise.
    grad_cosine: np.ndarray | None = None
    grad_log_norm: np.ndarray | None = None


@dataclass
class TrainerStats:
    """Cumulative work counters of a :class:`BatchedTrainer` (read by the throughput benchmark)."""

    model_steps: int = 0  # optimiser steps summed over models
    group_steps: int = 0  # batched steps: one per stack per inner step
    flops: float = 0.0  # forward+backward matmul FLOPs of the padded stacks (see models.step_flops)
    model_flops: float = 0.0  # the same for the models' true shapes (the useful part)
    train_seconds: float = 0.0  # wall time of the inner steps and the validation after them
    eval_seconds: float = 0.0  # wall time of evaluate() (initial and test losses)
    group_builds: int = 0
    group_seconds: float = 0.0  # wall time of (re)stacking slots into groups

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, type(getattr(self, f))())


@dataclass
class _Slot:
    spec: TaskSpec
    data: DataSplits  # on the trainer's device
    layout: ModelLayout
    params: list[torch.Tensor] | None  # None while the values live in a group
    opt_state: list[list[torch.Tensor]] | None
    hparams: np.ndarray  # (3,) lr, weight_decay, momentum
    generator: torch.Generator
    steps_done: int = 0
    group: _Group | None = None
    index: int = -1

    @property
    def group_key(self) -> tuple:
        return (*self.layout.stack_key, self.data.task_type)

    @property
    def row_order(self) -> tuple:
        return (self.spec.steps_per_action, self.spec.optimizer != "sgd", self.layout.activation)

    @property
    def flops(self) -> int:
        return step_flops(self.layout.arch, self.layout.shapes, self.spec.batch_size)

    @property
    def cost(self) -> float:
        return _step_cost(self.layout.arch, self.layout.shapes, self.spec.batch_size)


@dataclass
class _Group:
    """A stack of slots trained as one program; the source of truth for its members' values."""

    members: tuple[int, ...]  # ordered by (K, optimiser, activation)
    arch: str
    act: StackActivation
    optimizer_runs: list[tuple[str, int, int]]  # (optimizer, first row, end row): contiguous runs
    task_type: str
    shapes: tuple[tuple[int, ...], ...]  # padded per-parameter shapes
    offsets: list[int]
    batch: int  # padded minibatch size
    flat: torch.Tensor  # (N, P) all parameters
    opt_flat: list[torch.Tensor]  # (N, P) each: momentum buffer (SGD) / exp_avg, then exp_avg_sq (AdamW)
    steps: torch.Tensor  # (N, 1) inner steps done, for Adam's bias correction
    flops: int = 0  # per inner step, padded
    model_flops: int = 0  # per inner step, true shapes
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    _tails: dict[int, _Group] = field(default_factory=dict, repr=False)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        n = flat.shape[0]
        return [flat[:, a : a + math.prod(s)].view(n, *s) for a, s in zip(self.offsets, self.shapes)]

    def tail(self, start: int) -> _Group:
        """The stack of rows ``[start, N)``: its tensors are views of this group's, so updates are shared."""
        if start == 0:
            return self
        if start not in self._tails:
            n = len(self.members)
            self._tails[start] = _Group(
                self.members[start:], self.arch, StackActivation(self.act.names[start:]),
                [(o, max(a, start) - start, b - start) for o, a, b in self.optimizer_runs if b > start],
                self.task_type, self.shapes, self.offsets, self.batch, self.flat[start:],
                [buf[start:] for buf in self.opt_flat], self.steps[start:],
                data={k: v[start:] for k, v in self.data.items() if v.dim() > 0 and v.shape[0] == n},
            )  # fmt: skip
        return self._tails[start]


def _pad_to(t: torch.Tensor, shape: tuple[int, ...], fill: float = 0.0) -> torch.Tensor:
    if tuple(t.shape) == tuple(shape):
        return t
    out = t.new_full(shape, fill)
    out[tuple(slice(0, d) for d in t.shape)] = t
    return out


class BatchedTrainer:
    """Trains the inner models of ``n_slots`` tasks, many at once.

    Args:
        n_slots: number of slots (concurrent tasks).
        device: torch device of the models and data (``"cpu"``, ``"cuda"``...).
        divergence_factor: a validation loss above ``divergence_factor`` times the slot's reference
            loss (its untrained validation loss if it was evaluated before training, else its first
            validation loss) counts as divergence, as does any non-finite value.
        group_overhead_flops: the fixed cost of one more stack per inner step, in FLOP-equivalents
            (Python, autograd and kernel launches; elementwise work counts ``_ELEMENT_FLOPS`` per
            element). A model joins a stack if padding it costs less than this plus its own cost.
            Default on CPU: 1e7 for the MLP and the char-MLP (their hand-written backward has
            little fixed cost), 3e7 for the CNN (autograd); chosen by a sweep of
            ``benchmarks/throughput.py``-style env measurements on this project's 2-core machine.
            1e10 on accelerators (where padding is nearly free and launches dominate).
        gradient_stats: also measure each chunk's gradient statistics (:attr:`ChunkResult.grad_cosine`,
            :attr:`ChunkResult.grad_log_norm`), for the optional gradient features; a copy and a
            batched matmul per stack and inner step. Training itself is unchanged.
    """

    def __init__(
        self,
        n_slots: int,
        device: str | torch.device = "cpu",
        divergence_factor: float = DIVERGENCE_FACTOR,
        group_overhead_flops: float | None = None,
        gradient_stats: bool = False,
    ) -> None:
        if not is_integer(n_slots) or n_slots < 1:
            raise ValueError(f"n_slots must be an integer >= 1, got {n_slots!r}")
        if not (is_number(divergence_factor) and 1 < divergence_factor < math.inf):
            raise ValueError(
                f"divergence_factor must be a finite number > 1 (a run diverges when its loss exceeds that many times "
                f"its untrained loss), got {divergence_factor!r}"
            )
        self.n_slots = int(n_slots)
        self.device = check_device(device)
        self.divergence_factor = float(divergence_factor)
        if group_overhead_flops is not None and not group_overhead_flops >= 0:
            raise ValueError(f"group_overhead_flops must be >= 0, got {group_overhead_flops}")
        self.group_overhead_flops = None if group_overhead_flops is None else float(group_overhead_flops)
        self.gradient_stats = bool(gradient_stats)
        self.stats = TrainerStats()
        self._slots: list[_Slot | None] = [None] * self.n_slots
        self._reference_loss = np.full(self.n_slots, np.nan)

    # ------------------------------------------------------------------------------------------
    # slot management

    @_in_torch_defaults
    def load(self, slot: int, spec: TaskSpec, hparams: np.ndarray | None = None) -> None:
        """Put a fresh task into ``slot``: build its data, initialise its model and optimiser."""
        self._check_slot(slot)
        if not isinstance(spec, TaskSpec):
            raise TypeError(f"spec must be a TaskSpec, got {type(spec).__name__}")
        data = build_splits(spec)
        if self.device.type != "cpu":
            x_train, y_train, x_val, y_val, x_test, y_test = (
                getattr(data, f).to(self.device) for f in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
            )
            data = DataSplits(x_train, y_train, x_val, y_val, x_test, y_test, data.task_type, data.n_outputs)
        layout = ModelLayout.build(spec, data)
        gen = torch.Generator().manual_seed(spec.seed)
        params = [p.to(self.device) for p in init_params(layout, gen)]
        n_buffers = 1 if spec.optimizer == "sgd" else 2
        opt_state = [[torch.zeros_like(p) for p in params] for _ in range(n_buffers)]
        if hparams is None:
            hparams = np.array([spec.lr, spec.weight_decay, spec.momentum], dtype=np.float64)
        self._slots[slot] = _Slot(spec, data, layout, params, opt_state, np.asarray(hparams, np.float64), gen)
        self._reference_loss[slot] = np.nan

    def spec(self, slot: int) -> TaskSpec:
        return self._get(slot).spec

    def hparams(self, slot: int) -> np.ndarray:
        """Current ``(lr, weight_decay, momentum)`` of a slot (a copy)."""
        return self._get(slot).hparams.copy()

    def set_hparams(self, slot: int, values: np.ndarray) -> None:
        """Set a slot's ``(lr, weight_decay, momentum)``: all finite, >= 0, momentum (Adam's beta1) below 1."""
        hp = np.asarray(values, dtype=np.float64)
        if hp.shape != (3,) or not np.isfinite(hp).all() or (hp < 0).any() or hp[2] >= 1:
            raise ValueError(
                f"hyperparameters (lr, weight_decay, momentum) must be finite and >= 0, momentum below 1, got "
                f"{hp.tolist()}"
            )
        self._get(slot).hparams = hp.copy()

    def steps_done(self, slot: int) -> int:
        return self._get(slot).steps_done

    def planned_epochs(self, slot: int) -> float:
        """How many passes over its training set a slot's whole run makes: ``total_steps * batch_size / n_train``."""
        s = self._get(slot)
        return s.spec.total_steps * s.spec.batch_size / s.data.x_train.shape[0]

    def parameters(self, slot: int) -> list[torch.Tensor]:
        """A slot's current parameters in their true (unpadded) shapes."""
        s = self._get(slot)
        self._materialize(s)
        return [p.clone() for p in cast("list[torch.Tensor]", s.params)]  # materialized: not None

    def _check_slot(self, slot: int) -> None:
        if not is_integer(slot) or not 0 <= slot < self.n_slots:
            raise IndexError(f"slot must be an integer in [0, {self.n_slots}), got {slot!r}")

    def _get(self, slot: int) -> _Slot:
        self._check_slot(slot)
        s = self._slots[slot]
        if s is None:
            raise RuntimeError(f"slot {slot} holds no task; call load() first")
        return s

    # ------------------------------------------------------------------------------------------
    # grouping

    def _materialize(self, s: _Slot) -> None:
        """Copy a slot's values out of its group into its own tensors."""
        g = s.group
        if g is None:
            return
        i = s.index
        unpad = [tuple(slice(0, d) for d in true) for true in s.layout.shapes]
        s.params = [v[i][sl].clone() for v, sl in zip(g.views(g.flat), unpad)]
        n_buffers = 1 if s.spec.optimizer == "sgd" else 2
        s.opt_state = [[v[i][sl].clone() for v, sl in zip(g.views(buf), unpad)] for buf in g.opt_flat[:n_buffers]]
        s.group, s.index = None, -1

    def _groups_for(self, slots: list[int]) -> list[tuple[_Group, list[int]]]:
        """Partition slots into stacks, reusing a stack whose membership is unchanged."""
        by_key: dict[tuple, list[int]] = {}
        for i in slots:
            by_key.setdefault(self._get(i).group_key, []).append(i)
        loaded = cast("list[_Slot]", self._slots)  # only the slots just checked by _get are indexed
        out = []
        for key_members in by_key.values():
            for members in self._partition(key_members):
                first = loaded[members[0]].group
                if (
                    first is not None
                    and first.members == tuple(members)
                    and all(loaded[m].group is first for m in members)
                ):
                    out.append((first, members))
                else:
                    out.append((self._build_group(members), members))
        return out

    def _partition(self, members: list[int]) -> list[list[int]]:
        """Split slots of one group key into stacks, trading padding FLOPs against per-stack overhead."""
        slots = cast("list[_Slot]", self._slots)  # members are loaded slots (see _groups_for)
        arch = slots[members[0]].layout.arch
        bins: list[tuple[list[int], tuple[tuple[int, ...], ...], int, float]] = []  # members, shapes, batch, flops
        for m in sorted(members, key=lambda m: (-slots[m].cost, m)):
            s = slots[m]
            best, best_cost = -1, self._group_overhead(arch) + s.cost
            for b, (mem, shapes, batch, cost) in enumerate(bins):
                merged = _max_shapes(shapes, s.layout.shapes)
                extra = (len(mem) + 1) * _step_cost(arch, merged, max(batch, s.spec.batch_size)) - len(mem) * cost
                if extra < best_cost:
                    best, best_cost = b, extra
            if best < 0:
                bins.append(([m], tuple(s.layout.shapes), s.spec.batch_size, s.cost))
            else:
                mem, shapes, batch, _ = bins[best]
                shapes, batch = _max_shapes(shapes, s.layout.shapes), max(batch, s.spec.batch_size)
                bins[best] = ([*mem, m], shapes, batch, _step_cost(arch, shapes, batch))
        # By K, so the rows still training after the shortest chunks end are the stack's tail; then
        # by optimiser, so each optimiser updates few contiguous ranges; then by activation.
        return [sorted(mem, key=lambda m: (*slots[m].row_order, m)) for mem, *_ in bins]

    def _group_overhead(self, arch: str) -> float:
        """The fixed cost of one more stack of ``arch`` (see ``group_overhead_flops``)."""
        if self.group_overhead_flops is not None:
            return self.group_overhead_flops
        if self.device.type != "cpu":
            return 1e10
        return 1e7 if arch in HAND_WRITTEN_BACKWARD and _MANUAL_BACKWARD else 3e7

    def _build_group(self, members: list[int]) -> _Group:
        start = time.perf_counter()
        slots = cast("list[_Slot]", [self._slots[m] for m in members])  # loaded slots (see _groups_for)
        for s in slots:
            self._materialize(s)
        n = len(slots)
        ref = slots[0]
        shapes = _max_shapes(*(s.layout.shapes for s in slots))
        sizes = [math.prod(sh) for sh in shapes]
        offsets = list(np.cumsum([0] + sizes[:-1]))
        total = sum(sizes)

        def stack(values: list[list[torch.Tensor]]) -> torch.Tensor:
            flat = torch.zeros(n, total, device=self.device)
            for i, vals in enumerate(values):
                for a, sh, v in zip(offsets, shapes, vals):
                    flat[i, a : a + math.prod(sh)].view(sh)[tuple(slice(0, d) for d in v.shape)] = v
            return flat

        # All materialized above, so none of these is None.
        params = cast("list[list[torch.Tensor]]", [s.params for s in slots])
        opt_states = cast("list[list[list[torch.Tensor]]]", [s.opt_state for s in slots])
        flat = stack(params)
        n_buffers = max(len(o) for o in opt_states)
        opt_flat = [stack([o[b] if b < len(o) else [] for o in opt_states]) for b in range(n_buffers)]
        steps = torch.tensor([[float(s.steps_done)] for s in slots], device=self.device)
        runs: list[tuple[str, int, int]] = []
        for i, s in enumerate(slots):
            if runs and runs[-1][0] == s.spec.optimizer:
                runs[-1] = (s.spec.optimizer, runs[-1][1], i + 1)
            else:
                runs.append((s.spec.optimizer, i, i + 1))
        batch = max(s.spec.batch_size for s in slots)
        g = _Group(
            tuple(members), ref.layout.arch, StackActivation([s.layout.activation for s in slots]),
            runs, ref.data.task_type, shapes, [int(o) for o in offsets], batch, flat, opt_flat, steps,
            flops=n * step_flops(ref.layout.arch, shapes, batch), model_flops=sum(s.flops for s in slots),
        )  # fmt: skip
        sizes_b = torch.tensor([[s.spec.batch_size] for s in slots], device=self.device)
        # Per-sample loss weights: 1/B on a slot's own B samples, 0 on the padding.
        g.data["batch_weight"] = (torch.arange(batch, device=self.device)[None, :] < sizes_b) / sizes_b
        g.data.update(self._stack_split(slots, "train"))
        g.data.update(self._stack_split(slots, "val"))
        n_out = max(s.data.n_outputs for s in slots)
        out_valid = torch.zeros(n, n_out, dtype=torch.bool, device=self.device)
        for i, s in enumerate(slots):
            out_valid[i, : s.data.n_outputs] = True
        g.data["out_valid"] = out_valid
        # Additive logit mask: padded classes get -inf, so they take no probability and no gradient.
        g.data["class_bias"] = torch.zeros(n, 1, n_out, device=self.device).masked_fill(
            ~out_valid[:, None, :], -math.inf
        )
        g.data["n_out"] = torch.tensor([[float(s.data.n_outputs)] for s in slots], device=self.device)
        for i, s in enumerate(slots):
            s.params, s.opt_state, s.group, s.index = None, None, g, i
        self.stats.group_builds += 1
        self.stats.group_seconds += time.perf_counter() - start
        return g

    def _stack_split(self, slots: list[_Slot], split: str) -> dict[str, torch.Tensor]:
        xs = [getattr(s.data, f"x_{split}") for s in slots]
        ys = [getattr(s.data, f"y_{split}") for s in slots]
        n_max = max(len(x) for x in xs)
        x_shape = (n_max, *(max(d) for d in zip(*(x.shape[1:] for x in xs))))
        y_shape = (n_max, *(max(d) for d in zip(*(y.shape[1:] for y in ys))))
        x = torch.stack([_pad_to(v, x_shape) for v in xs])
        y = torch.stack([_pad_to(v, y_shape) for v in ys])
        count = torch.tensor([len(v) for v in xs], device=self.device)
        valid = torch.arange(n_max, device=self.device)[None, :] < count[:, None]
        return {f"x_{split}": x, f"y_{split}": y, f"n_{split}": count, f"valid_{split}": valid}

    # ------------------------------------------------------------------------------------------
    # losses

    @staticmethod
    def _per_sample_loss(
        g: _Group, out: torch.Tensor, y: torch.Tensor, correctness: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample loss ``(N, B)`` and (classification, if asked) correctness ``(N, B)``."""
        if g.task_type == "classification":
            logits = out + g.data["class_bias"]
            # Cross-entropy as logsumexp - target logit: on CPU, log_softmax over a short last
            # dimension (2-50 classes) is ~5x slower than logsumexp, and this runs every step.
            loss = torch.logsumexp(logits, dim=-1) - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            return loss, (logits.detach().argmax(-1) == y) if correctness else None
        sq = (out - y) ** 2
        if sq.shape[-1] > 1:
            sq = sq * g.data["out_valid"][:, None, :]
        return sq.sum(-1) / g.data["n_out"], None

    @staticmethod
    def _loss_and_grad(g: _Group, out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor):
        """Per-model training loss ``(N,)`` (samples weighted by ``weight`` ``(N, B)``) and its gradient
        with respect to the outputs: :meth:`_per_sample_loss` differentiated by hand, as autograd would."""
        w = weight.unsqueeze(-1)
        if g.task_type == "classification":
            logits = out + g.data["class_bias"]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            target = y.unsqueeze(-1)
            per_model = ((lse - logits.gather(-1, target)) * w).sum((1, 2))
            # softmax * w - onehot * w; the masked classes' -inf logits give exp(-inf) = 0
            grad = (logits - lse).exp_().mul_(w).scatter_add_(-1, target, -w)
            return per_model, grad
        diff = out - y
        scale = w / g.data["n_out"].unsqueeze(-1)
        if diff.shape[-1] > 1:
            scale = scale * g.data["out_valid"][:, None, :]
        sq = diff * diff * scale
        return sq.sum((1, 2)), diff.mul_(2.0 * scale)

    # ------------------------------------------------------------------------------------------
    # public: evaluation and training

    @_in_torch_defaults
    @torch.no_grad()
    def evaluate(self, slots: list[int], split: str = "val") -> tuple[np.ndarray, np.ndarray]:
        """Mean loss and accuracy (NaN for regression) of each slot's model on a split."""
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        loss = np.full(len(slots), np.nan)
        acc = np.full(len(slots), np.nan)
        pos = {s: k for k, s in enumerate(slots)}
        todo = [s for s in slots if self._get(s).group is None]
        if todo:
            self._groups_for(todo)
        start = time.perf_counter()
        seen: set[int] = set()
        loaded = cast("list[_Slot]", self._slots)  # every slot of a group is loaded
        for s in slots:
            g = cast(_Group, loaded[s].group)  # checked by _get and grouped above
            if id(g) in seen:
                continue
            seen.add(id(g))
            if f"x_{split}" not in g.data:
                g.data.update(self._stack_split([loaded[m] for m in g.members], split))
            l_g, a_g = self._eval_group(g, split)
            for i, m in enumerate(g.members):
                if m in pos:
                    loss[pos[m]], acc[pos[m]] = l_g[i], a_g[i]
                # The untrained validation loss is the reference that divergence is measured against.
                if split == "val" and loaded[m].steps_done == 0 and np.isnan(self._reference_loss[m]):
                    self._reference_loss[m] = l_g[i] if np.isfinite(l_g[i]) else np.nan
        self.stats.eval_seconds += time.perf_counter() - start
        return loss, acc

    @_in_torch_defaults
    @torch.no_grad()
    def predictions(self, slots: list[int], split: str = "test") -> list[np.ndarray]:
        """Each slot's predictions on a split: class ids ``(n,)``, or regression outputs ``(n, out)``.

        For metrics that need more than the mean loss and accuracy of :meth:`evaluate` (macro-F1).
        """
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        out: list[np.ndarray] = []
        for slot in slots:
            s = self._get(slot)
            data = s.data
            x = getattr(data, f"x_{split}")
            if s.group is not None:  # use the stacked values without breaking the stack up
                g, i = s.group, s.index
                unpad = [tuple(slice(0, d) for d in true) for true in s.layout.shapes]
                params = [v[i][sl] for v, sl in zip(g.views(g.flat), unpad)]
            else:
                params = cast("list[torch.Tensor]", s.params)  # not in a group: its own tensors
            y = forward(s.layout.arch, s.layout.activation, [p.unsqueeze(0) for p in params], x.unsqueeze(0))[0]
            out.append((y.argmax(-1) if data.task_type == "classification" else y).cpu().numpy())
        return out

    def _eval_group(self, g: _Group, split: str) -> tuple[np.ndarray, np.ndarray]:
        x, y, valid, count = (g.data[f"{k}_{split}"] for k in ("x", "y", "valid", "n"))
        out = forward(g.arch, g.act, g.views(g.flat), x)
        per, correct = self._per_sample_loss(g, out, y)
        denom = count.to(per.dtype)
        loss = torch.where(valid, per, 0.0).sum(1) / denom
        if correct is None:
            return loss.cpu().numpy().astype(np.float64), np.full(len(g.members), np.nan)
        acc = (correct & valid).sum(1) / denom
        both = torch.stack([loss, acc.to(loss.dtype)]).cpu().numpy().astype(np.float64)
        return both[0], both[1]

    @_in_torch_defaults
    def train_chunk(self, slots: list[int], steps: int | None = None) -> ChunkResult:
        """Run each slot's ``steps_per_action`` inner steps (or ``steps``) and evaluate on validation.

        Hyperparameters are those set with :meth:`set_hparams` (or the task's initial ones); the
        optimiser steps with the learning rate times the task's hidden :attr:`~hpo_env.TaskSpec.lr_gain`
        (1 but in meta-training with gains), and :meth:`hparams` keeps reporting the rate as set.
        """
        n = len(slots)
        grad_cosine, grad_log_norm = np.full(n, np.nan), np.full(n, np.nan)
        res = ChunkResult(
            np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool), grad_cosine, grad_log_norm
        )
        pos = {s: k for k, s in enumerate(slots)}
        loaded = cast("list[_Slot]", self._slots)  # every slot of a group is loaded
        for g, members in self._groups_for(list(slots)):
            ks = [steps or loaded[m].spec.steps_per_action for m in members]  # ascending (row order)
            start = time.perf_counter()
            tr, va, acc, div, grad_stats = self._train_group(g, ks)
            st = self.stats
            st.train_seconds += time.perf_counter() - start
            st.model_steps += sum(ks)
            st.group_steps += ks[-1]
            st.flops += g.flops / len(members) * sum(ks)
            st.model_flops += sum(loaded[m].flops * k for m, k in zip(members, ks))
            for i, m in enumerate(members):
                j = pos[m]
                res.train_loss[j], res.val_loss[j], res.val_accuracy[j], res.diverged[j] = tr[i], va[i], acc[i], div[i]
                if grad_stats is not None:
                    grad_cosine[j], grad_log_norm[j] = grad_stats[0][i], grad_stats[1][i]
                loaded[m].steps_done += ks[i]
        # A validation loss that exploded relative to the first one counts as divergence too.
        for j, m in enumerate(slots):
            ref = self._reference_loss[m]
            if np.isnan(ref) and np.isfinite(res.val_loss[j]):
                self._reference_loss[m] = ref = res.val_loss[j]
            if not np.isfinite(res.val_loss[j]) or res.val_loss[j] > self.divergence_factor * max(ref, 1e-8):
                res.diverged[j] = True
        return res

    def _train_group(self, g: _Group, ks: list[int]):
        """Train a stack's rows for ``ks`` steps each (ascending, as the rows are ordered)."""
        slots = cast("list[_Slot]", [self._slots[m] for m in g.members])  # a group's slots are loaded
        n, dev, k_max = len(slots), self.device, ks[-1]
        # Minibatch indices from each slot's own generator: identical alone or in any batch. Padded
        # samples (beyond a slot's own batch size or its K) point at sample 0 and get zero loss weight.
        idx = torch.zeros(n, k_max, g.batch, dtype=torch.long)
        for i, (s, k) in enumerate(zip(slots, ks)):
            b = s.spec.batch_size
            idx[i, :k, :b] = torch.randint(int(s.data.x_train.shape[0]), (k, b), generator=s.generator)
        idx = idx.to(dev, non_blocking=True)
        rows = torch.arange(n, device=dev).view(n, 1, 1)
        xs, ys = g.data["x_train"][rows, idx], g.data["y_train"][rows, idx]  # (N, K, B, ...)
        hp_rows = np.stack([s.hparams for s in slots])
        hp_rows[:, 0] *= [s.spec.lr_gain for s in slots]  # the hidden gain of meta-training tasks (1: none)
        hp = torch.tensor(hp_rows, dtype=torch.float32, device=dev)
        losses = torch.zeros(k_max, n, device=dev)
        grad = torch.empty_like(g.flat)
        grad_stats = GradientStats(n, dev, steps_hint=k_max) if self.gradient_stats else None
        first = 0  # rows [first, N) still take steps
        for k in range(k_max):
            if k == 0 or ks[first] <= k:
                while ks[first] <= k:
                    first += 1
                sub = g.tail(first)
                sub_grad, weight = grad[first:], sub.data["batch_weight"]
                update = self._optimizer_update(sub, sub.flat, sub_grad, hp[first:], hp_rows[first:])
                manual = _MANUAL_BACKWARD and sub.arch in HAND_WRITTEN_BACKWARD
                if manual:
                    params, grads = sub.views(sub.flat), sub.views(sub_grad)
            if manual:
                with torch.no_grad():
                    loss_grad = partial(self._loss_and_grad, sub, y=ys[first:, k], weight=weight)
                    losses[k, first:] = gradients(sub.arch, sub.act, params, xs[first:, k], loss_grad, grads)
            else:
                leaves = [v.detach().requires_grad_() for v in sub.views(sub.flat)]
                out = forward(sub.arch, sub.act, leaves, xs[first:, k])
                per_model = (self._per_sample_loss(sub, out, ys[first:, k], correctness=False)[0] * weight).sum(1)
                autograd_grads = torch.autograd.grad(per_model.sum(), leaves)
                with torch.no_grad():
                    torch.cat([gr.reshape(n - first, -1) for gr in autograd_grads], dim=1, out=sub_grad)
                    losses[k, first:] = per_model
            with torch.no_grad():
                if grad_stats is not None:  # before the update, which may fold weight decay into the gradient
                    grad_stats.observe(sub_grad, first)
                update()
        with torch.no_grad():
            val, acc = self._eval_group(g, "val")
            mean_loss = losses.sum(0) / torch.tensor(ks, dtype=losses.dtype, device=dev)
            finite = torch.stack([torch.isfinite(losses).all(0), torch.isfinite(g.flat).all(1)]).all(0)
            stats = torch.stack([mean_loss, finite.to(losses.dtype)]).cpu().numpy().astype(np.float64)
        return stats[0], val, acc, ~stats[1].astype(bool), None if grad_stats is None else grad_stats.result()

    @staticmethod
    def _optimizer_update(g: _Group, flat: torch.Tensor, grad: torch.Tensor, hp: torch.Tensor, hp_rows: np.ndarray):
        """A closure doing one optimiser step on the stack, one update per run of rows (SGD or AdamW).

        PyTorch's SGD (momentum, coupled L2 decay) and AdamW (decoupled decay) rules, with per-model
        hyperparameters ``(N, 3)`` = lr, weight decay, momentum (Adam's beta1), as a tensor ``hp`` and
        as host values ``hp_rows``. On CPU, AdamW (and SGD on large models) runs PyTorch's own fused
        kernels row by row (:func:`_fused_rows`): one pass over memory instead of one per elementwise
        op, 2-6x faster for the update itself on this project's machine (``benchmarks/throughput.py
        --paths`` measures whole steps). On accelerators one vectorised update over all rows of a run
        keeps the kernel launches few.
        """
        lr, wd, mom = (hp[:, j : j + 1] for j in range(3))
        fused = _FUSED_OPTIMIZERS and flat.device.type == "cpu"
        parts = []
        for optimizer, a, b in g.optimizer_runs:
            if fused and (optimizer != "sgd" or flat.shape[1] >= _FUSED_SGD_MIN_PARAMS):
                parts.append(_fused_rows(optimizer, flat[a:b], grad[a:b], g, a, b, hp_rows[a:b]))
            elif optimizer == "sgd":
                parts.append(
                    _sgd_update(
                        flat[a:b], grad[a:b], g.opt_flat[0][a:b], lr[a:b], wd[a:b], mom[a:b], hp_rows[a:b, 2] == 0
                    )
                )
            else:
                parts.append(
                    _adamw_update(
                        flat[a:b], grad[a:b], g.opt_flat[0][a:b], g.opt_flat[1][a:b], g.steps[a:b], lr[a:b], wd[a:b],
                        mom[a:b],
                    )
                )  # fmt: skip
        if len(parts) == 1:
            return parts[0]

        def every_run() -> None:
            for part in parts:
                part()

        return every_run


#: Stacks of :data:`~hpo_env.models.HAND_WRITTEN_BACKWARD` (MLP, char-MLP) take their gradients from
#: :func:`~hpo_env.models.gradients` (1.3-1.7x faster than autograd for small stacks); False: autograd.
_MANUAL_BACKWARD = True
#: PyTorch's fused CPU optimiser kernels (what ``torch.optim.AdamW(fused=True)`` runs); a private op,
#: so the vectorised updates below remain the fallback should a torch version lack them.
_FUSED_OPTIMIZERS = hasattr(torch, "_fused_adamw_") and hasattr(torch, "_fused_sgd_")
#: Per-model parameter count from which SGD's fused per-row kernel beats one vectorised update of the
#: stack (measured: 4-16 rows of 10k parameters, 14 vs 18 and 96 vs 126 us; of 5k, a tie). AdamW's
#: vectorised update makes ~10 passes with temporaries, so its fused kernel wins at every size.
_FUSED_SGD_MIN_PARAMS = 8192


class _SGDArgs(TypedDict):
    """A model row's own hyperparameters for ``torch._fused_sgd_``."""

    lr: float
    weight_decay: float
    momentum: float


class _AdamWArgs(TypedDict):
    """A model row's own hyperparameters for ``torch._fused_adamw_``."""

    lr: float
    weight_decay: float
    beta1: float


def _fused_rows(optimizer: str, p: torch.Tensor, grad: torch.Tensor, g: _Group, a: int, b: int, hp: np.ndarray):
    """One fused PyTorch optimiser call per model row, each with the model's own hyperparameters."""
    rows = range(b - a)
    bufs = [buf[a:b] for buf in g.opt_flat]
    if optimizer == "sgd":
        calls: list[tuple[tuple[list[torch.Tensor], ...], _SGDArgs]] = [
            (([p[i]], [grad[i]], [bufs[0][i]]), {"lr": float(lr), "weight_decay": float(wd), "momentum": float(mom)})
            for i, (lr, wd, mom) in zip(rows, hp)
        ]  # fmt: skip

        def sgd() -> None:
            for tensors, hparams in calls:
                if hparams["momentum"]:
                    torch._fused_sgd_(
                        *tensors, **hparams, dampening=0.0, nesterov=False, maximize=False, is_first_step=False
                    )
                else:  # torch.optim.SGD leaves the buffer alone without momentum; so does _sgd_update
                    (param,), (grad_row,), _ = tensors
                    param.add_(grad_row.add_(param, alpha=hparams["weight_decay"]), alpha=-hparams["lr"])

        return sgd
    steps = g.steps[a:b]
    adamw_calls: list[tuple[tuple[list[torch.Tensor], ...], _AdamWArgs]] = [
        (
            ([p[i]], [grad[i]], [bufs[0][i]], [bufs[1][i]], [], [steps[i]]),
            {"lr": float(lr), "weight_decay": float(wd), "beta1": float(beta1)},
        )
        for i, (lr, wd, beta1) in zip(rows, hp)
    ]

    def adamw() -> None:
        steps.add_(1)  # the caller counts steps, as torch.optim does before its fused call
        for tensors, hparams in adamw_calls:
            torch._fused_adamw_(*tensors, **hparams, beta2=_ADAM_BETA2, eps=_ADAM_EPS, amsgrad=False, maximize=False)

    return adamw


def _sgd_update(p_s, g_s, buf, lr_s, wd_s, mom_s, no_momentum: np.ndarray):
    """torch.optim.SGD's step (momentum, dampening 0, coupled weight decay) on rows of a stack.

    Rows whose momentum is 0 (host flags ``no_momentum``) step with the gradient and leave their buffer
    as it is, as torch.optim.SGD does: should momentum rise again, the old buffer is what it resumes.
    """

    def sgd() -> None:
        g_s.addcmul_(p_s, wd_s)
        buf.mul_(mom_s).add_(g_s)
        p_s.addcmul_(buf, lr_s, value=-1.0)

    if not no_momentum.any():
        return sgd
    keep = torch.as_tensor(no_momentum, device=buf.device).unsqueeze(1)

    def sgd_some_without_momentum() -> None:
        g_s.addcmul_(p_s, wd_s)
        buf.copy_(torch.where(keep, buf, buf * mom_s + g_s))
        p_s.addcmul_(torch.where(keep, g_s, buf), lr_s, value=-1.0)

    return sgd_some_without_momentum


def _adamw_update(p_a, g_a, exp_avg, exp_avg_sq, steps, lr_a, wd_a, beta1):
    """torch.optim.AdamW's step (decoupled weight decay, bias correction) on rows of a stack."""
    decay = 1 - lr_a * wd_a

    def adamw() -> None:
        steps.add_(1)
        p_a.mul_(decay)
        exp_avg.lerp_(g_a, 1 - beta1)
        exp_avg_sq.mul_(_ADAM_BETA2).addcmul_(g_a, g_a, value=1 - _ADAM_BETA2)
        step_size = lr_a / (1 - beta1**steps)
        bias_correction2_sqrt = (1 - _ADAM_BETA2**steps).sqrt()
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(_ADAM_EPS)
        p_a.addcdiv_(exp_avg * step_size, denom, value=-1.0)

    return adamw


#: Cost of one elementwise element per inner step (activations, their gradients, the optimiser's
#: passes over parameters) in matmul FLOPs: about 10 ns against about 1e11 FLOP/s on this machine.
_ELEMENT_FLOPS = 1000.0


@functools.lru_cache(maxsize=4096)  # stacking partitions every chunk; few distinct shapes recur
def _step_cost(arch: str, shapes: tuple[tuple[int, ...], ...], batch: int) -> float:
    """Estimated cost of one inner step of one model, in FLOP-equivalents (matmuls plus elementwise)."""
    params = sum(math.prod(s) for s in shapes)
    if arch == "cnn":
        activations = 64 * shapes[0][0] + 16 * shapes[2][0] + shapes[5][0]
    else:
        activations = sum(s[0] for s in shapes if len(s) == 1)  # one bias per layer output
    return step_flops(arch, shapes, batch) + _ELEMENT_FLOPS * (params + batch * activations)


@functools.lru_cache(maxsize=4096)
def _pairwise_max_shapes(a: tuple[tuple[int, ...], ...], b: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(map(max, da, db)) for da, db in zip(a, b))


def _max_shapes(*layouts: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Per-parameter elementwise maximum of several models' shapes (the padded stack shapes)."""
    return functools.reduce(_pairwise_max_shapes, layouts)
