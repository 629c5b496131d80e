"""Inner model architectures written for a *stack* of N independent models.

Each architecture is a parameter layout (names and per-model shapes), an initialiser that draws one
model's parameters from its own generator (PyTorch's default ``nn.Linear``/``nn.Conv2d`` scheme), and
a forward function over parameters stacked along a leading model dimension. Models whose widths,
input features or class counts differ share a stack by zero-padding: a padded unit has zero weights
in and out and an activation with ``f(0) = 0``, so it outputs zero, receives zero gradient and stays
zero under SGD and AdamW; padded classes are masked out of the softmax. The stacked result therefore
equals training each model alone (up to floating-point summation order). Models with different
activations share a stack too: :class:`StackActivation` applies each model's own function to its own
slice (by selection, so every value is exactly what that function gives alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast, overload

import torch
import torch.nn.functional as F

from hpo_env.data import DataSplits
from hpo_env.tasks import TaskSpec

__all__ = [
    "HAND_WRITTEN_BACKWARD",
    "ModelLayout",
    "StackActivation",
    "forward",
    "gradients",
    "init_params",
    "mlp_gradients",
    "step_flops",
]

#: Architectures :func:`gradients` differentiates by hand; the others (the CNN) go through autograd.
HAND_WRITTEN_BACKWARD = ("mlp", "charmlp")

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}


# Each activation's backward ``(grad_out, input, output) -> grad_in``: the kernels autograd runs (named
# functions, not lambdas, so that an environment holding them pickles).
def _relu_grad(d: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward(d, h, 0)


def _tanh_grad(d: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.tanh_backward(d, h)


def _gelu_grad(d: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(d, z)


#: Each activation's backward, by name.
_ACTIVATION_GRADS: dict[str, Callable] = {"relu": _relu_grad, "tanh": _tanh_grad, "gelu": _gelu_grad}


@dataclass(frozen=True)
class ModelLayout:
    """Parameter names and shapes of one model, and what must match for models to share a stack."""

    arch: str
    activation: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    n_outputs: int
    input_shape: tuple[int, ...]

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def stack_key(self) -> tuple:
        """Structure that cannot be padded: architecture, depth and fixed dimensions.

        The activation is not part of it: :class:`StackActivation` mixes activations in one stack.
        """
        fixed = self.input_shape if self.arch != "mlp" else ()
        return (self.arch, len(self.names), fixed)

    @classmethod
    def build(cls, spec: TaskSpec, data: DataSplits) -> ModelLayout:
        out = data.n_outputs
        names: list[str] = []
        shapes: list[tuple[int, ...]] = []
        if spec.arch == "mlp":
            widths = (data.input_shape[0], *spec.hidden, out)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                names += [f"w{i}", f"b{i}"]
                shapes += [(a, b), (b,)]
        elif spec.arch == "cnn":
            c1, c2 = spec.hidden
            names = ["c1w", "c1b", "c2w", "c2b", "fw", "fb"]
            shapes = [(c1, 1, 3, 3), (c1,), (c2, c1, 3, 3), (c2,), (c2, 4, out), (out,)]
        elif spec.arch == "charmlp":
            vocab, ctx, emb = out, spec.context_length, spec.embedding_dim
            names = ["emb", "w0", "b0"]
            shapes = [(vocab, emb), (ctx, emb, spec.hidden[0]), (spec.hidden[0],)]
            widths = (*spec.hidden, vocab)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), start=1):
                names += [f"w{i}", f"b{i}"]
                shapes += [(a, b), (b,)]
        else:  # pragma: no cover - TaskSpec validates arch
            raise AssertionError(spec.arch)
        return cls(spec.arch, spec.activation, tuple(names), tuple(shapes), out, data.input_shape)


def init_params(layout: ModelLayout, generator: torch.Generator) -> list[torch.Tensor]:
    """One model's parameters, drawn like PyTorch's default layer initialisation."""
    params = []
    for name, shape in zip(layout.names, layout.shapes):
        if name == "emb":  # nn.Embedding: N(0, 1)
            params.append(torch.randn(shape, generator=generator))
            continue
        bound = 1.0 / math.sqrt(_fan_in(layout, name))
        params.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))
    return params


_BIAS_TO_WEIGHT = {"c1b": "c1w", "c2b": "c2w", "fb": "fw"}


def _fan_in(layout: ModelLayout, name: str) -> int:
    """Fan-in of a weight, or of the weight a bias belongs to (PyTorch bounds both by it)."""
    weight = _BIAS_TO_WEIGHT.get(name) or (("w" + name[1:]) if name.startswith("b") else name)
    shape = layout.shapes[layout.names.index(weight)]
    if weight in ("c1w", "c2w"):  # conv (out, in, kh, kw)
        return math.prod(shape[1:])
    return math.prod(shape[:-1])  # linear stored as (in..., out)


class StackActivation:
    """The hidden activation of N stacked models, each with its own function.

    The stack is cut into runs of consecutive models sharing a function; each run gets its own
    function and the results are concatenated, so every value and gradient is exactly what that
    model computes alone. Order the models by activation to keep the runs few.

    Args:
        names: one activation name per model (``"relu"``, ``"tanh"``, ``"gelu"``).
    """

    def __init__(self, names: Sequence[str]) -> None:
        names = tuple(names)
        unknown = sorted(set(names) - set(_ACTIVATIONS))
        if not names or unknown:
            raise ValueError(f"activations must be a non-empty list of {sorted(_ACTIVATIONS)}, got {names!r}")
        self.names = names
        self.runs: list[tuple[Callable, int]] = []
        self._grads: list[Callable] = []
        for name in names:
            if self.runs and self.runs[-1][0] is _ACTIVATIONS[name]:
                self.runs[-1] = (self.runs[-1][0], self.runs[-1][1] + 1)
            else:
                self.runs.append((_ACTIVATIONS[name], 1))
                self._grads.append(_ACTIVATION_GRADS[name])
        self.uniform = len(self.runs) == 1
        self._lengths = [length for _, length in self.runs]

    def __call__(self, h: torch.Tensor, model_dim: int = 0) -> torch.Tensor:
        if self.uniform:
            return self.runs[0][0](h)
        parts = h.split(self._lengths, dim=model_dim)
        return torch.cat([fn(part) for (fn, _), part in zip(self.runs, parts)], dim=model_dim)

    def backward(self, grad: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The gradient at the input ``z`` from the gradient at the output ``h = self(z)`` (models on dim 0)."""
        if self.uniform:
            return self._grads[0](grad, z, h)
        parts = zip(*(t.split(self._lengths) for t in (grad, z, h)))
        return torch.cat([fn(*part) for fn, part in zip(self._grads, parts)])


def _as_activation(activation: str | Sequence[str] | Callable) -> Callable:
    if isinstance(activation, str):
        return _ACTIVATIONS[activation]
    if callable(activation):
        return activation
    return StackActivation(activation)


def forward(
    arch: str, activation: str | Sequence[str] | Callable, params: list[torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Outputs ``(N, B, n_outputs)`` of N stacked models on their own inputs ``x`` of shape ``(N, B, ...)``.

    ``activation`` is one name for all models, one name per model, or a :class:`StackActivation`.
    """
    act = _as_activation(activation)
    mixed = isinstance(act, StackActivation) and not act.uniform
    n, b = x.shape[:2]
    if arch == "mlp":
        h = x
        layers = len(params) // 2
        for i in range(layers):
            h = torch.baddbmm(params[2 * i + 1].unsqueeze(1), h, params[2 * i])
            if i < layers - 1:
                h = act(h)
        return h
    if arch == "cnn":
        c1w, c1b, c2w, c2b, fw, fb = params
        c1, c2 = c1w.shape[1], c2w.shape[1]
        # Grouped convolution: model i's channels form group i, so the N models stay independent.
        h = x.transpose(0, 1).reshape(b, n, 8, 8)
        h = F.conv2d(h, c1w.reshape(n * c1, 1, 3, 3), c1b.reshape(n * c1), padding=1, groups=n)
        h = F.max_pool2d(_act_grouped(cast(StackActivation, act), h, n) if mixed else act(h), 2)
        h = F.conv2d(h, c2w.reshape(n * c2, c1, 3, 3), c2b.reshape(n * c2), padding=1, groups=n)
        h = F.max_pool2d(_act_grouped(cast(StackActivation, act), h, n) if mixed else act(h), 2)  # (B, N*c2, 2, 2)
        h = h.reshape(b, n, c2 * 4).transpose(0, 1)
        return torch.baddbmm(fb.unsqueeze(1), h, fw.reshape(n, c2 * 4, -1))
    if arch == "charmlp":
        emb, w0, b0 = params[:3]
        ctx, dim = w0.shape[1], w0.shape[2]
        rows = torch.arange(n, device=x.device).view(n, 1, 1)
        h = emb[rows, x].reshape(n, b, ctx * dim)
        h = act(torch.baddbmm(b0.unsqueeze(1), h, w0.reshape(n, ctx * dim, -1)))
        rest = params[3:]
        for i in range(len(rest) // 2):
            h = torch.baddbmm(rest[2 * i + 1].unsqueeze(1), h, rest[2 * i])
            if i < len(rest) // 2 - 1:
                h = act(h)
        return h
    raise AssertionError(arch)  # pragma: no cover


#: A loss's value and its gradient with respect to the model outputs.
LossGrad = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@overload
def mlp_gradients(
    act: StackActivation, params: Sequence[torch.Tensor], x: torch.Tensor, loss_grad: LossGrad,
    grads: Sequence[torch.Tensor], input_grad: Literal[False] = ...,
) -> torch.Tensor: ...  # fmt: skip
@overload
def mlp_gradients(
    act: StackActivation, params: Sequence[torch.Tensor], x: torch.Tensor, loss_grad: LossGrad,
    grads: Sequence[torch.Tensor], input_grad: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...  # fmt: skip
def mlp_gradients(
    act: StackActivation,
    params: Sequence[torch.Tensor],
    x: torch.Tensor,
    loss_grad: LossGrad,
    grads: Sequence[torch.Tensor],
    input_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One forward and backward pass of N stacked MLPs, with the backward written out by hand.

    The same kernels autograd would run (``baddbmm``, ``bmm``, the activations' own backward ops),
    without the graph: on this project's CPU that makes a small stack's step about 1.3-1.7x faster,
    and each model's gradient is what autograd computes for it (up to float summation order).

    Args:
        act: the hidden activation of each model.
        params: ``w0, b0, w1, b1, ...`` stacked ``(N, in, out)`` and ``(N, out)``.
        x: inputs ``(N, B, in)``.
        loss_grad: maps the outputs ``(N, B, out)`` to the per-model loss ``(N,)`` and its gradient
            with respect to the outputs.
        grads: where each parameter's gradient is written (tensors shaped like ``params``, e.g.
            views of one flat buffer).
        input_grad: also return the gradient with respect to ``x`` (when ``x`` is a function of
            parameters, such as an embedding lookup).

    Returns:
        The per-model loss ``(N,)``, and with ``input_grad`` the gradient at ``x``.
    """
    layers = len(params) // 2
    inputs, pre = [x], []  # each layer's input; the hidden layers' pre-activations
    h = x
    for i in range(layers):
        h = torch.baddbmm(params[2 * i + 1].unsqueeze(1), h, params[2 * i])
        if i < layers - 1:
            pre.append(h)
            h = act(h)
            inputs.append(h)
    loss, d = loss_grad(h)
    for i in reversed(range(layers)):
        torch.bmm(inputs[i].transpose(1, 2), d, out=grads[2 * i])
        torch.sum(d, 1, out=grads[2 * i + 1])
        if i > 0:
            d = act.backward(torch.bmm(d, params[2 * i].transpose(1, 2)), pre[i - 1], inputs[i])
    if input_grad:
        return loss, torch.bmm(d, params[0].transpose(1, 2))
    return loss  # data needs no gradient


def gradients(
    arch: str,
    act: StackActivation,
    params: Sequence[torch.Tensor],
    x: torch.Tensor,
    loss_grad: LossGrad,
    grads: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Hand-written forward and backward of a stack of one of :data:`HAND_WRITTEN_BACKWARD`.

    The MLP (:func:`mlp_gradients`), and the char-MLP: an embedding lookup, then an MLP over the
    concatenated context whose input gradient is scattered back into the embedding rows. Returns the
    per-model loss.
    """
    if arch == "mlp":
        return mlp_gradients(act, params, x, loss_grad, grads)
    if arch != "charmlp":
        raise ValueError(f"no hand-written backward for {arch!r}; these have one: {list(HAND_WRITTEN_BACKWARD)}")
    emb, w0 = params[:2]
    n, b = x.shape[:2]
    vocab, dim = emb.shape[1:]
    rows = torch.arange(n, device=x.device).view(n, 1, 1)
    h = emb[rows, x].reshape(n, b, -1)
    flat_w0 = w0.reshape(n, h.shape[-1], -1)
    loss, d_h = mlp_gradients(
        act, [flat_w0, *params[2:]], h, loss_grad, [grads[1].view(flat_w0.shape), *grads[2:]], input_grad=True
    )
    grads[0].zero_()
    grads[0].index_put_((rows.expand_as(x), x), d_h.view(*x.shape, dim), accumulate=True)
    return loss


def _act_grouped(act: StackActivation, h: torch.Tensor, n: int) -> torch.Tensor:
    """A mixed activation on grouped-conv features ``(B, N*C, H, W)``: model i owns channels block i."""
    b, nc, hh, ww = h.shape
    return act(h.reshape(b, n, nc // n, hh, ww), model_dim=1).reshape(b, nc, hh, ww)


def step_flops(arch: str, shapes: Sequence[tuple[int, ...]], batch: int) -> int:
    """Multiply-add FLOPs (x2) of one optimiser step of one model: forward plus backward.

    The backward pass computes every weight gradient and every input gradient except the first
    layer's when its input is data (MLP, CNN), so a layer costs 3x its forward FLOPs, that one 2x.
    Elementwise work (activations, loss, optimiser) and the embedding lookup are not counted.

    Args:
        arch: ``"mlp"``, ``"cnn"`` or ``"charmlp"``.
        shapes: parameter shapes in :class:`ModelLayout` order (possibly padded).
        batch: minibatch size (possibly padded).
    """
    if arch == "cnn":
        (c1, _, kh, kw), _, (c2, *_), _, (_, cells, out), _ = shapes
        layers = [64 * c1 * kh * kw, 16 * c2 * c1 * kh * kw, c2 * cells * out]
    elif arch == "mlp":
        layers = [math.prod(s) for s in shapes[0::2]]
    elif arch == "charmlp":
        layers = [math.prod(s) for s in shapes[1::2]]  # w0 (ctx, emb, h), then (h, out)...; the lookup is free
    else:
        raise ValueError(f"unknown arch {arch!r}")
    forward_flops = 2 * batch * sum(layers)
    data_input = 0 if arch == "charmlp" else 2 * batch * layers[0]
    return 3 * forward_flops - data_input
