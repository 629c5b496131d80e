"""The batched inner trainer: N inner models trained as one tensor program.

:class:`BatchedTrainer` owns N *slots*. Each slot holds one task (data, model, optimiser state and
its own hyperparameter values). ``train_chunk`` runs K optimiser steps for many slots at once: slots
whose models share a structure (:attr:`ModelLayout.stack_key`, optimiser, batch size and K) are
stacked along a leading model dimension, zero-padded to the widest member, and trained together with
batched matmuls and grouped convolutions. The optimisers (SGD with momentum, AdamW) are written out
with PyTorch's exact update rules, with per-model hyperparameter tensors.

Stacks (*groups*) are kept between calls while their membership is unchanged, so a steady batch of
slots pays the stacking cost once per episode, not once per chunk. All randomness of a slot (its
initialisation and its minibatch order) comes from a CPU ``torch.Generator`` seeded by the task, so
a slot trains identically alone or inside any batch, on any device.

Divergence (a non-finite loss or parameter, or a validation loss that exploded) is detected per model
after each chunk and reported, never raised: NaNs stay inside their own model's slice of the stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from hpo_env.data import DataSplits, build_splits
from hpo_env.models import ModelLayout, forward, init_params
from hpo_env.tasks import TaskSpec

__all__ = ["HPARAM_NAMES", "BatchedTrainer", "ChunkResult"]

#: Every hyperparameter the trainer applies per model; ``momentum`` is Adam's beta1 for AdamW.
HPARAM_NAMES = ("lr", "weight_decay", "momentum")
_ADAM_BETA2 = 0.999
_ADAM_EPS = 1e-8


@dataclass
class ChunkResult:
    """Per-slot results of a chunk of inner training (arrays aligned with the requested slots)."""

    train_loss: np.ndarray  # mean minibatch loss over the chunk
    val_loss: np.ndarray
    val_accuracy: np.ndarray  # NaN for regression
    diverged: np.ndarray  # bool


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
        s = self.spec
        return (*self.layout.stack_key, s.optimizer, s.batch_size, s.steps_per_action, self.data.task_type)


@dataclass
class _Group:
    """A stack of slots trained as one program; the source of truth for its members' values."""

    members: tuple[int, ...]
    arch: str
    activation: str
    optimizer: str
    task_type: str
    shapes: list[tuple[int, ...]]  # padded per-parameter shapes
    offsets: list[int]
    flat: torch.Tensor  # (N, P) all parameters
    opt_flat: list[torch.Tensor]  # (N, P) each: momentum buffer (SGD) or exp_avg, exp_avg_sq (AdamW)
    steps: torch.Tensor  # (N, 1) inner steps done, for Adam's bias correction
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        n = flat.shape[0]
        return [flat[:, a : a + math.prod(s)].view(n, *s) for a, s in zip(self.offsets, self.shapes)]


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
    """

    def __init__(self, n_slots: int, device: str | torch.device = "cpu", divergence_factor: float = 1e3) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.n_slots = int(n_slots)
        self.device = torch.device(device)
        self.divergence_factor = float(divergence_factor)
        self._slots: list[_Slot | None] = [None] * self.n_slots
        self._reference_loss = np.full(self.n_slots, np.nan)

    # ------------------------------------------------------------------------------------------
    # slot management

    def load(self, slot: int, spec: TaskSpec, hparams: np.ndarray | None = None) -> None:
        """Put a fresh task into ``slot``: build its data, initialise its model and optimiser."""
        data = build_splits(spec)
        if self.device.type != "cpu":
            data = DataSplits(
                *(
                    getattr(data, f).to(self.device)
                    for f in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
                ),
                data.task_type,
                data.n_outputs,
            )
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
        self._get(slot).hparams = np.asarray(values, dtype=np.float64).copy()

    def steps_done(self, slot: int) -> int:
        return self._get(slot).steps_done

    def parameters(self, slot: int) -> list[torch.Tensor]:
        """A slot's current parameters in their true (unpadded) shapes."""
        s = self._get(slot)
        self._materialize(s)
        return [p.clone() for p in s.params]

    def _get(self, slot: int) -> _Slot:
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
        s.opt_state = [[v[i][sl].clone() for v, sl in zip(g.views(buf), unpad)] for buf in g.opt_flat]
        s.group, s.index = None, -1

    def _groups_for(self, slots: list[int]) -> list[tuple[_Group, list[int]]]:
        """Partition slots into stacks, reusing a stack whose membership is unchanged."""
        by_key: dict[tuple, list[int]] = {}
        for i in slots:
            by_key.setdefault(self._get(i).group_key, []).append(i)
        out = []
        for members in by_key.values():
            first = self._slots[members[0]].group
            if (
                first is not None
                and first.members == tuple(members)
                and all(self._slots[m].group is first for m in members)
            ):
                out.append((first, members))
            else:
                out.append((self._build_group(members), members))
        return out

    def _build_group(self, members: list[int]) -> _Group:
        slots = [self._slots[m] for m in members]
        for s in slots:
            self._materialize(s)
        n = len(slots)
        ref = slots[0]
        shapes = [tuple(max(dims) for dims in zip(*per)) for per in zip(*(s.layout.shapes for s in slots))]
        sizes = [math.prod(sh) for sh in shapes]
        offsets = list(np.cumsum([0] + sizes[:-1]))
        total = sum(sizes)

        def stack(values: list[list[torch.Tensor]]) -> torch.Tensor:
            flat = torch.zeros(n, total, device=self.device)
            for i, vals in enumerate(values):
                for a, sh, v in zip(offsets, shapes, vals):
                    flat[i, a : a + math.prod(sh)].view(sh)[tuple(slice(0, d) for d in v.shape)] = v
            return flat

        flat = stack([s.params for s in slots])
        opt_flat = [stack([s.opt_state[b] for s in slots]) for b in range(len(ref.opt_state))]
        steps = torch.tensor([[float(s.steps_done)] for s in slots], device=self.device)
        g = _Group(
            tuple(members), ref.layout.arch, ref.layout.activation, ref.spec.optimizer,
            ref.data.task_type, shapes, [int(o) for o in offsets], flat, opt_flat, steps,
        )  # fmt: skip
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
    def _per_sample_loss(g: _Group, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample loss ``(N, B)`` and (classification) correctness ``(N, B)``."""
        if g.task_type == "classification":
            logp = torch.log_softmax(out + g.data["class_bias"], dim=-1)
            loss = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            return loss, (out.detach() + g.data["class_bias"]).argmax(-1) == y
        sq = (out - y) ** 2
        if sq.shape[-1] > 1:
            sq = sq * g.data["out_valid"][:, None, :]
        return sq.sum(-1) / g.data["n_out"], None

    # ------------------------------------------------------------------------------------------
    # public: evaluation and training

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
        seen: set[int] = set()
        for s in slots:
            g = self._slots[s].group
            if id(g) in seen:
                continue
            seen.add(id(g))
            if f"x_{split}" not in g.data:
                g.data.update(self._stack_split([self._slots[m] for m in g.members], split))
            l_g, a_g = self._eval_group(g, split)
            for i, m in enumerate(g.members):
                if m in pos:
                    loss[pos[m]], acc[pos[m]] = l_g[i], a_g[i]
                # The untrained validation loss is the reference that divergence is measured against.
                if split == "val" and self._slots[m].steps_done == 0 and np.isnan(self._reference_loss[m]):
                    self._reference_loss[m] = l_g[i] if np.isfinite(l_g[i]) else np.nan
        return loss, acc

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
                params = s.params
            y = forward(s.layout.arch, s.layout.activation, [p.unsqueeze(0) for p in params], x.unsqueeze(0))[0]
            out.append((y.argmax(-1) if data.task_type == "classification" else y).cpu().numpy())
        return out

    def _eval_group(self, g: _Group, split: str) -> tuple[np.ndarray, np.ndarray]:
        x, y, valid, count = (g.data[f"{k}_{split}"] for k in ("x", "y", "valid", "n"))
        out = forward(g.arch, g.activation, g.views(g.flat), x)
        per, correct = self._per_sample_loss(g, out, y)
        denom = count.to(per.dtype)
        loss = torch.where(valid, per, 0.0).sum(1) / denom
        if correct is None:
            return loss.cpu().numpy().astype(np.float64), np.full(len(g.members), np.nan)
        acc = (correct & valid).sum(1) / denom
        both = torch.stack([loss, acc.to(loss.dtype)]).cpu().numpy().astype(np.float64)
        return both[0], both[1]

    def train_chunk(self, slots: list[int], steps: int | None = None) -> ChunkResult:
        """Run each slot's ``steps_per_action`` inner steps (or ``steps``) and evaluate on validation.

        Hyperparameters are those set with :meth:`set_hparams` (or the task's initial ones).
        """
        n = len(slots)
        res = ChunkResult(np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool))
        pos = {s: k for k, s in enumerate(slots)}
        for g, members in self._groups_for(list(slots)):
            k_steps = steps or self._slots[members[0]].spec.steps_per_action
            tr, va, acc, div = self._train_group(g, k_steps)
            for i, m in enumerate(members):
                j = pos[m]
                res.train_loss[j], res.val_loss[j], res.val_accuracy[j], res.diverged[j] = tr[i], va[i], acc[i], div[i]
                self._slots[m].steps_done += k_steps
        # A validation loss that exploded relative to the first one counts as divergence too.
        for j, m in enumerate(slots):
            ref = self._reference_loss[m]
            if np.isnan(ref) and np.isfinite(res.val_loss[j]):
                self._reference_loss[m] = ref = res.val_loss[j]
            if not np.isfinite(res.val_loss[j]) or res.val_loss[j] > self.divergence_factor * max(ref, 1e-8):
                res.diverged[j] = True
        return res

    def _train_group(self, g: _Group, k_steps: int):
        slots = [self._slots[m] for m in g.members]
        n, dev = len(slots), self.device
        batch = slots[0].spec.batch_size
        # Minibatch indices from each slot's own generator: identical alone or in any batch.
        idx = torch.stack(
            [torch.randint(int(s.data.x_train.shape[0]), (k_steps, batch), generator=s.generator) for s in slots]
        ).to(dev, non_blocking=True)
        rows = torch.arange(n, device=dev).view(n, 1, 1)
        xs, ys = g.data["x_train"][rows, idx], g.data["y_train"][rows, idx]  # (N, K, B, ...)
        hp = torch.tensor(np.stack([s.hparams for s in slots]), dtype=torch.float32, device=dev)
        lr, wd, mom = (hp[:, j : j + 1] for j in range(3))
        losses = torch.empty(k_steps, n, device=dev)
        flat = g.flat
        for k in range(k_steps):
            leaves = [v.detach().requires_grad_() for v in g.views(flat)]
            out = forward(g.arch, g.activation, leaves, xs[:, k])
            per_model = self._per_sample_loss(g, out, ys[:, k])[0].mean(1)
            grads = torch.autograd.grad(per_model.sum(), leaves)
            grad = torch.cat([gr.reshape(n, -1) for gr in grads], dim=1)
            with torch.no_grad():
                losses[k] = per_model
                self._optimizer_step(g, flat, grad, lr, wd, mom)
        with torch.no_grad():
            val, acc = self._eval_group(g, "val")
            finite = torch.stack([torch.isfinite(losses).all(0), torch.isfinite(flat).all(1)]).all(0)
            stats = torch.stack([losses.mean(0), finite.to(losses.dtype)]).cpu().numpy().astype(np.float64)
        return stats[0], val, acc, ~stats[1].astype(bool)

    @staticmethod
    def _optimizer_step(g: _Group, p, grad, lr, wd, mom) -> None:
        """PyTorch's SGD (momentum, coupled L2 decay) or AdamW update, with per-model tensors."""
        if g.optimizer == "sgd":
            (buf,) = g.opt_flat
            grad.addcmul_(p, wd)
            buf.mul_(mom).add_(grad)
            p.addcmul_(buf, lr, value=-1.0)
            return
        exp_avg, exp_avg_sq = g.opt_flat
        g.steps += 1
        p.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - mom)
        exp_avg_sq.mul_(_ADAM_BETA2).addcmul_(grad, grad, value=1 - _ADAM_BETA2)
        step_size = lr / (1 - mom**g.steps)
        bias_correction2_sqrt = (1 - _ADAM_BETA2**g.steps).sqrt()
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(_ADAM_EPS)
        p.addcdiv_(exp_avg * step_size, denom, value=-1.0)
