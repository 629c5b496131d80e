"""Inner model architectures written for a *stack* of N independent models.

Each architecture is a parameter layout (names and per-model shapes), an initialiser that draws one
model's parameters from its own generator (PyTorch's default ``nn.Linear``/``nn.Conv2d`` scheme), and
a forward function over parameters stacked along a leading model dimension. Models whose widths,
input features or class counts differ share a stack by zero-padding: a padded unit has zero weights
in and out and an activation with ``f(0) = 0``, so it outputs zero, receives zero gradient and stays
zero under SGD and AdamW; padded classes are masked out of the softmax. The stacked result therefore
equals training each model alone (up to floating-point summation order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpo_env.data import DataSplits
from hpo_env.tasks import TaskSpec

__all__ = ["ModelLayout", "forward", "init_params"]

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}


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
        """Structure that cannot be padded: architecture, depth, activation and fixed dimensions."""
        fixed = self.input_shape if self.arch != "mlp" else ()
        return (self.arch, self.activation, len(self.names), fixed)

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


def forward(arch: str, activation: str, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Outputs ``(N, B, n_outputs)`` of N stacked models on their own inputs ``x`` of shape ``(N, B, ...)``."""
    act = _ACTIVATIONS[activation]
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
        h = F.max_pool2d(act(h), 2)
        h = F.conv2d(h, c2w.reshape(n * c2, c1, 3, 3), c2b.reshape(n * c2), padding=1, groups=n)
        h = F.max_pool2d(act(h), 2)  # (B, N*c2, 2, 2)
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
