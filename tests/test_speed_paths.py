"""Correctness of the trainer's fast paths: mixed stacks, the grouping cost model, the work counters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpo_env import BatchedTrainer
from hpo_env.models import StackActivation, forward, step_flops


def _mixed_specs(small_mlp_spec):
    """One group key (MLP, depth 1, classification) but every other knob different."""
    return [
        small_mlp_spec.replace(activation="relu", optimizer="adamw", lr=3e-3, batch_size=16, seed=1, data_seed=1),
        small_mlp_spec.replace(activation="tanh", optimizer="sgd", batch_size=32, hidden=(24,), seed=2, data_seed=2),
        small_mlp_spec.replace(activation="gelu", optimizer="adamw", lr=1e-3, batch_size=8, n_classes=5, seed=3),
        small_mlp_spec.replace(activation="tanh", optimizer="sgd", batch_size=16, n_features=9, seed=4, data_seed=4),
    ]


def test_mixed_stack_equals_alone(small_mlp_spec, assert_trains_like_alone):
    specs = _mixed_specs(small_mlp_spec)
    together = BatchedTrainer(len(specs), group_overhead_flops=1e12)  # force one stack
    for i, s in enumerate(specs):
        together.load(i, s)
    results = [together.train_chunk(list(range(len(specs)))) for _ in range(3)]
    groups = {id(together._slots[i].group) for i in range(len(specs))}
    assert len(groups) == 1, "the cost model was told to merge everything"
    g = together._slots[0].group
    assert [o for o, *_ in g.optimizer_runs] == ["sgd", "adamw"] and g.batch == 32 and len(g.act.runs) >= 3
    assert_trains_like_alone(together, specs, results)


def test_stack_of_different_steps_per_chunk_equals_alone(small_mlp_spec, assert_trains_like_alone):
    """Slots with different K share a stack: the rows with the smallest K stop first, the tail goes on."""
    base = _mixed_specs(small_mlp_spec)
    specs = [s.replace(steps_per_action=k) for s, k in zip(base + base[:2], (20, 5, 10, 5, 10, 20))]
    together = BatchedTrainer(len(specs), group_overhead_flops=1e12)
    for i, s in enumerate(specs):
        together.load(i, s)
    results = [together.train_chunk(list(range(len(specs)))) for _ in range(2)]
    g = together._slots[0].group
    assert all(together._slots[i].group is g for i in range(len(specs))), "one stack for every K"
    assert [together._slots[m].spec.steps_per_action for m in g.members] == [5, 5, 10, 10, 20, 20]
    assert [together.steps_done(i) for i in range(len(specs))] == [2 * s.steps_per_action for s in specs]
    assert together.stats.model_steps == 2 * sum(s.steps_per_action for s in specs)
    assert together.stats.group_steps == 2 * 20
    assert_trains_like_alone(together, specs, results)


def test_regrouping_keeps_optimizer_state(small_mlp_spec):
    """Slots moving between stacks (one reloads) carry their AdamW/SGD state with them."""
    specs = _mixed_specs(small_mlp_spec)
    together = BatchedTrainer(len(specs), group_overhead_flops=1e12)
    for i, s in enumerate(specs):
        together.load(i, s)
    together.train_chunk([0, 1, 2, 3])
    together.load(3, specs[3].replace(hidden=(48,), seed=9))  # changes the stack's membership
    r = together.train_chunk([0, 1, 2, 3])
    alone = BatchedTrainer(1)
    alone.load(0, specs[0])
    alone.train_chunk([0])
    np.testing.assert_allclose(alone.train_chunk([0]).val_loss[0], r.val_loss[0], rtol=1e-5)


def test_cost_model_separates_tiny_from_huge(small_mlp_spec):
    tiny = small_mlp_spec.replace(hidden=(4,), batch_size=8)
    huge = small_mlp_spec.replace(hidden=(512,), batch_size=128, n_samples=600)
    trainer = BatchedTrainer(4)
    for i, s in enumerate([tiny, tiny.replace(seed=5), huge, huge.replace(seed=6)]):
        trainer.load(i, s)
    trainer.train_chunk([0, 1, 2, 3])
    groups = [trainer._slots[i].group for i in range(4)]
    assert groups[0] is groups[1] and groups[2] is groups[3] and groups[0] is not groups[2]


def test_stack_activation_is_each_models_own_function():
    h = torch.randn(4, 3, 5, requires_grad=True)
    act = StackActivation(["relu", "relu", "tanh", "gelu"])
    assert [n for _, n in act.runs] == [2, 1, 1]
    out = act(h)
    torch.testing.assert_close(out[:2], torch.relu(h[:2]))
    torch.testing.assert_close(out[2], torch.tanh(h[2]))
    torch.testing.assert_close(out[3], torch.nn.functional.gelu(h[3]))
    out.sum().backward()
    torch.testing.assert_close(h.grad[2], 1 - torch.tanh(h[2].detach()) ** 2)
    with pytest.raises(ValueError, match="activations"):
        StackActivation(["relu", "swish"])


def test_mixed_activation_in_grouped_cnn():
    n, b = 3, 2
    c1w, c1b = torch.randn(n, 4, 1, 3, 3), torch.randn(n, 4)
    c2w, c2b = torch.randn(n, 5, 4, 3, 3), torch.randn(n, 5)
    fw, fb = torch.randn(n, 5, 4, 7), torch.randn(n, 7)
    x = torch.randn(n, b, 64)
    params = [c1w, c1b, c2w, c2b, fw, fb]
    names = ["relu", "tanh", "tanh"]
    mixed = forward("cnn", names, params, x)
    for i, name in enumerate(names):
        alone = forward("cnn", name, [p[i : i + 1] for p in params], x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_step_flops_counts_forward_and_backward():
    # one linear layer 10 -> 3 (data input: forward + weight gradient only) at batch 4
    assert step_flops("mlp", [(10, 3), (3,)], 4) == 2 * 2 * 4 * 10 * 3
    # a hidden layer adds its input gradient too: 3x its forward
    assert step_flops("mlp", [(10, 6), (6,), (6, 3), (3,)], 1) == 2 * 2 * 60 + 3 * 2 * 18
    with pytest.raises(ValueError, match="arch"):
        step_flops("rnn", [(1, 1)], 1)


def test_stats_count_the_work(small_mlp_spec):
    trainer = BatchedTrainer(2)
    trainer.load(0, small_mlp_spec)
    trainer.load(1, small_mlp_spec.replace(seed=7))
    trainer.train_chunk([0, 1])
    k = small_mlp_spec.steps_per_action
    assert trainer.stats.model_steps == 2 * k
    assert trainer.stats.flops >= trainer.stats.model_flops > 0
    assert trainer.stats.train_seconds > 0 and trainer.stats.group_builds >= 1
    trainer.stats.reset()
    assert trainer.stats.model_steps == 0 and trainer.stats.flops == 0.0


def test_bad_group_overhead():
    with pytest.raises(ValueError, match="group_overhead_flops"):
        BatchedTrainer(1, group_overhead_flops=-1.0)
