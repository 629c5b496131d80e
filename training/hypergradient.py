"""Hypergradient descent (Baydin et al., ICLR 2018) as a reference runner on the benchmark's tasks.

Hypergradient descent adapts the learning rate at *every optimiser step* from the dot product of
the current gradient with the previous update direction, so it cannot run through the decision-level
protocol of :mod:`hpo_env.features`. :func:`run_hypergradient` therefore trains one task in plain
PyTorch, reproducing :class:`~hpo_env.BatchedTrainer` exactly: the same data
(:func:`~hpo_env.build_splits`), the same initial parameters and minibatch indices (drawn from the
task's seeded generator in the same order), the same forward functions and losses, the same SGD
(momentum, coupled L2 decay) and AdamW update rules in float32. With ``beta = 0`` it reproduces a
constant-learning-rate run of the environment (the tests check this).

The rules, with ``d_t`` the update direction per unit learning rate (``theta_t = theta_{t-1} -
lr_t * d_t``) and ``g_t`` the gradient at ``theta_{t-1}``; the hypergradient of the loss with respect
to the learning rate is ``-g_t . d_{t-1}``, so::

    lr_t = clip(lr_{t-1} + beta * g_t . d_{t-1}, lr_lower, lr_upper)

* **SGD-HD** (SGD with heavy-ball momentum, as ``gbaydin/hypergradient-descent``'s ``SGDHD``):
  ``g_t`` includes the L2 term ``wd * theta``; ``d_t`` is the momentum buffer.
* **Adam-HD** for AdamW: ``d_t = m_hat_t / (sqrt(v_hat_t) + eps) + wd * theta_{t-1}``; the decoupled
  decay term depends on the learning rate too, so it is part of the direction (with ``wd = 0`` this
  is the paper's Adam-HD).

The paper's hypergradient learning rates are the defaults: ``beta = 1e-3`` for SGD-HD and ``1e-7``
for Adam-HD. The learning rate is clipped into the decoder's bounds, the range every other schedule
of the benchmark lives in. Validation, divergence detection (a non-finite loss or parameter, or a
validation loss above ``divergence_factor`` times the untrained one) and rewards follow the
environment's protocol, and the result is a :class:`~training.rollout.EpisodeRecord` like any other.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hpo_env import DIVERGENCE_FACTOR, ActionDecoder, TaskSpec, build_splits
from hpo_env.data import DataSplits
from hpo_env.models import ModelLayout, forward, init_params
from training.rollout import EpisodeRecord

__all__ = ["DEFAULT_HYPERGRADIENT_LR", "run_hypergradient"]

#: The paper's hypergradient learning rates (Baydin et al. 2018, section 5).
DEFAULT_HYPERGRADIENT_LR = {"sgd": 1e-3, "adamw": 1e-7}
_ADAM_BETA2 = 0.999
_ADAM_EPS = 1e-8


def _per_sample_loss(out: torch.Tensor, y: torch.Tensor, task_type: str, n_out: int) -> torch.Tensor:
    if task_type == "classification":
        return -torch.log_softmax(out, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return ((out - y) ** 2).sum(-1) / n_out


class _Model:
    """One task's model as a flat parameter vector with views, evaluated like the batched trainer."""

    def __init__(self, spec: TaskSpec, data: DataSplits, flat: torch.Tensor) -> None:
        self.layout = ModelLayout.build(spec, data)
        self.data = data
        self.flat = flat
        sizes = [math.prod(s) for s in self.layout.shapes]
        self.offsets = np.cumsum([0, *sizes[:-1]]).tolist()

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[a : a + math.prod(s)].view(1, *s) for a, s in zip(self.offsets, self.layout.shapes)]

    def outputs(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return forward(self.layout.arch, self.layout.activation, params, x.unsqueeze(0))[0]

    def loss(self, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _per_sample_loss(self.outputs(params, x), y, self.data.task_type, self.data.n_outputs)

    @torch.no_grad()
    def evaluate(self, split: str) -> tuple[float, float, torch.Tensor]:
        x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
        out = self.outputs(self.views(self.flat), x)
        loss = float(_per_sample_loss(out, y, self.data.task_type, self.data.n_outputs).mean())
        if self.data.task_type != "classification":
            return loss, float("nan"), out
        pred = out.argmax(-1)
        return loss, float((pred == y).float().mean()), pred


def run_hypergradient(
    spec: TaskSpec,
    decoder: ActionDecoder,
    *,
    beta: float | None = None,
    seed_index: int = 0,
    device: str = "cpu",
    divergence_factor: float = DIVERGENCE_FACTOR,
    divergence_penalty: float = 1.0,
) -> EpisodeRecord:
    """Train ``spec`` for its whole budget with SGD-HD or Adam-HD (by ``spec.optimizer``).

    Args:
        spec: the task; its ``lr`` is the initial learning rate.
        decoder: bounds of the hyperparameters (as for every other schedule); it must control ``lr``.
        beta: hypergradient learning rate (default :data:`DEFAULT_HYPERGRADIENT_LR` of the optimiser);
            0 gives a constant learning rate.
        seed_index: label stored in the record.
        device: torch device.
        divergence_factor, divergence_penalty: as in the environment.

    Returns:
        The run's :class:`~training.rollout.EpisodeRecord`; ``hparams["lr"][t]`` is the mean learning
        rate of interval ``t + 1``.

    Raises:
        ValueError: the decoder does not control ``lr``, or ``beta`` is negative or not finite.
    """
    if "lr" not in decoder.names:
        raise ValueError(f"hypergradient descent adapts 'lr', which decoder {list(decoder.names)} does not control")
    beta = DEFAULT_HYPERGRADIENT_LR[spec.optimizer] if beta is None else float(beta)
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta (the hypergradient learning rate) must be finite and >= 0, got {beta!r}")
    dev = torch.device(device)
    data = build_splits(spec)
    if dev.type != "cpu":
        fields = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
        x_train, y_train, x_val, y_val, x_test, y_test = (getattr(data, f).to(dev) for f in fields)
        data = DataSplits(x_train, y_train, x_val, y_val, x_test, y_test, data.task_type, data.n_outputs)
    gen = torch.Generator().manual_seed(spec.seed)
    layout = ModelLayout.build(spec, data)
    flat = torch.cat([p.reshape(-1) for p in init_params(layout, gen)]).to(dev)
    model = _Model(spec, data, flat)

    # Initial values clipped into the controlled bounds, as the environment does.
    values = {"lr": spec.lr, "weight_decay": spec.weight_decay, "momentum": spec.momentum}
    controlled = decoder.clip(np.array([values[h] for h in decoder.names]))
    values.update(dict(zip(decoder.names, controlled.tolist())))
    lr_spec = decoder.specs[decoder.names.index("lr")]
    lr = float(values["lr"])
    wd = torch.tensor(values["weight_decay"], dtype=torch.float32, device=dev)
    mom = torch.tensor(values["momentum"], dtype=torch.float32, device=dev)

    buffers = [torch.zeros_like(flat) for _ in range(1 if spec.optimizer == "sgd" else 2)]
    steps = torch.zeros((), device=dev)
    direction: torch.Tensor | None = None  # d_{t-1}

    rec = EpisodeRecord(spec, seed_index)
    l0, _, _ = model.evaluate("val")
    rec.initial_val_loss = l0
    reference = l0 if math.isfinite(l0) else float("nan")
    first_val = last_val = float("nan")
    n_train = int(data.x_train.shape[0])
    for interval in range(spec.num_decisions):
        idx = torch.randint(n_train, (spec.steps_per_action, spec.batch_size), generator=gen).to(dev)
        losses, lrs = [], []
        finite = True
        for k in range(spec.steps_per_action):
            leaves = [v.detach().requires_grad_() for v in model.views(flat)]
            loss = model.loss(leaves, data.x_train[idx[k]], data.y_train[idx[k]]).mean()
            grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, leaves)])
            with torch.no_grad():
                losses.append(float(loss))
                if spec.optimizer == "sgd":
                    grad.add_(flat * wd)  # coupled L2, part of the gradient HD sees (as in SGDHD)
                if direction is not None and beta > 0:
                    h = float(torch.dot(grad, direction))
                    if math.isfinite(h):
                        lr = float(np.clip(lr + beta * h, lr_spec.lower, lr_spec.upper))
                lrs.append(lr)
                lr_t = torch.tensor(lr, dtype=torch.float32, device=dev)
                direction = _optimizer_step(spec.optimizer, flat, grad, buffers, steps, lr_t, wd, mom)
            finite = finite and math.isfinite(losses[-1])
        val, acc, _ = model.evaluate("val")
        finite = finite and bool(torch.isfinite(flat).all())
        if math.isnan(reference) and math.isfinite(val):
            reference = val
        diverged = not finite or not math.isfinite(val) or val > divergence_factor * max(reference, 1e-8)
        if interval == 0:
            first_val = last_val = val
        if diverged:
            rec.diverged = True
            if interval > 0:
                rec.rewards.append(math.log(last_val / first_val) - divergence_penalty)
            else:
                rec.rewards.append(-divergence_penalty)
            break
        for name in decoder.names:
            rec.hparams.setdefault(name, []).append(float(np.mean(lrs)) if name == "lr" else float(values[name]))
        rec.val_loss.append(val)
        rec.train_loss.append(float(np.mean(losses)))
        if data.task_type == "classification":
            rec.val_accuracy.append(acc)
        if interval > 0:
            rec.rewards.append(math.log(last_val) - math.log(val))
        last_val = val
    if not rec.diverged:
        rec.final_val_loss = last_val
        rec.test_loss, rec.test_accuracy, pred = model.evaluate("test")
        if data.task_type == "classification":
            from sklearn.metrics import f1_score

            rec.test_macro_f1 = float(f1_score(data.y_test.cpu().numpy(), pred.cpu().numpy(), average="macro"))
    return rec


def _optimizer_step(
    optimizer: str,
    p: torch.Tensor,
    grad: torch.Tensor,
    buffers: list[torch.Tensor],
    steps: torch.Tensor,
    lr: torch.Tensor,
    wd: torch.Tensor,
    mom: torch.Tensor,
) -> torch.Tensor:
    """One update with the batched trainer's exact rules; returns the direction per unit lr."""
    if optimizer == "sgd":
        (buf,) = buffers
        buf.mul_(mom).add_(grad)
        p.addcmul_(buf, lr, value=-1.0)
        return buf.clone()
    exp_avg, exp_avg_sq = buffers
    steps += 1
    decay = p * wd  # the decoupled-decay part of the direction, at theta_{t-1}
    p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - mom)
    exp_avg_sq.mul_(_ADAM_BETA2).addcmul_(grad, grad, value=1 - _ADAM_BETA2)
    bias_correction1 = 1 - mom**steps
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / (1 - _ADAM_BETA2**steps).sqrt()).add_(_ADAM_EPS)
    p.addcdiv_(exp_avg * step_size, denom, value=-1.0)
    return exp_avg / bias_correction1 / denom + decay
