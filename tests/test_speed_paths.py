"""Correctness of the trainer's fast paths: mixed stacks, the grouping cost model, the work counters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hpo_env.trainer as trainer_module
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


def _trained(specs, chunks: int = 3, **trainer_kwargs) -> tuple[list[torch.Tensor], np.ndarray]:
    """Every slot's parameters (flattened) and the last chunk's training losses."""
    trainer = BatchedTrainer(len(specs), **trainer_kwargs)
    for i, s in enumerate(specs):
        trainer.load(i, s)
    for _ in range(chunks):
        r = trainer.train_chunk(list(range(len(specs))))
    return [torch.cat([p.reshape(-1) for p in trainer.parameters(i)]) for i in range(len(specs))], r.train_loss


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_hand_written_mlp_backward_equals_autograd(small_mlp_spec, monkeypatch, task):
    """A mixed, padded stack of two-layer MLPs trains the same with mlp_gradients as with autograd."""
    specs = [s.replace(hidden=(16, 8 + 4 * i)) for i, s in enumerate(_mixed_specs(small_mlp_spec))]
    if task == "regression":
        specs = [s.replace(family="teacher_regression", n_classes=0) for s in specs]
    manual, manual_loss = _trained(specs, group_overhead_flops=1e12)
    monkeypatch.setattr(trainer_module, "_MANUAL_BACKWARD", False)
    auto, auto_loss = _trained(specs, group_overhead_flops=1e12)
    np.testing.assert_allclose(manual_loss, auto_loss, rtol=1e-5)
    for m, a in zip(manual, auto):
        torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-6)


def test_hand_written_char_mlp_backward_equals_autograd(monkeypatch):
    """Char-MLPs (an embedding lookup scattered back by hand) train the same as with autograd."""
    from hpo_env import TaskDistribution

    rng = np.random.default_rng(3)
    specs = [
        s.replace(total_steps=20, steps_per_action=5)
        for s in (TaskDistribution(["charlm"]).sample(rng) for _ in range(4))
    ]
    manual, manual_loss = _trained(specs, chunks=2, group_overhead_flops=1e12)
    monkeypatch.setattr(trainer_module, "_MANUAL_BACKWARD", False)
    auto, auto_loss = _trained(specs, chunks=2, group_overhead_flops=1e12)
    np.testing.assert_allclose(manual_loss, auto_loss, rtol=1e-5)
    for m, a in zip(manual, auto):
        torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("task_type", ["classification", "regression"])
def test_loss_gradient_matches_autograd_with_padded_outputs(task_type):
    """The hand-written loss gradient equals autograd's, with padded classes or regression targets."""
    from types import SimpleNamespace

    n, b, n_out = 3, 5, 4
    used = torch.tensor([4, 2, 3])  # each model's own number of classes / targets
    out_valid = torch.arange(n_out)[None, :] < used[:, None]
    group = SimpleNamespace(
        task_type=task_type,
        data={
            "out_valid": out_valid,
            "class_bias": torch.zeros(n, 1, n_out).masked_fill(~out_valid[:, None, :], -float("inf")),
            "n_out": used[:, None].float(),
        },
    )
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(n, b, n_out, generator=gen, requires_grad=True)
    if task_type == "classification":
        y = (torch.rand(n, b, generator=gen) * used[:, None]).long()
    else:
        y = torch.randn(n, b, n_out, generator=gen) * out_valid[:, None, :]
    weight = torch.rand(n, b, generator=gen) * (torch.arange(b) < 4)  # the last sample is padding
    per_model = (BatchedTrainer._per_sample_loss(group, out, y, correctness=False)[0] * weight).sum(1)
    (expected,) = torch.autograd.grad(per_model.sum(), out)
    loss, grad = BatchedTrainer._loss_and_grad(group, out.detach(), y, weight)
    torch.testing.assert_close(loss, per_model.detach())
    torch.testing.assert_close(grad, expected)


def test_fused_optimizers_equal_vectorised_updates(small_mlp_spec, monkeypatch):
    """PyTorch's fused SGD/AdamW kernels, row by row, give the vectorised update rules' results."""
    large = small_mlp_spec.replace(hidden=(128, 64))  # above _FUSED_SGD_MIN_PARAMS: fused SGD too
    assert sum(a * b + b for a, b in zip((6, 128, 64), (128, 64, 3))) >= trainer_module._FUSED_SGD_MIN_PARAMS
    specs = [
        small_mlp_spec,
        small_mlp_spec.replace(optimizer="adamw", lr=3e-3, seed=2),
        large.replace(seed=3),
        large.replace(optimizer="adamw", lr=1e-3, momentum=0.8, seed=4),
        large.replace(momentum=0.0, seed=5),  # plain SGD: the fused kernel takes no buffer
    ]
    fused, fused_loss = _trained(specs)
    monkeypatch.setattr(trainer_module, "_FUSED_OPTIMIZERS", False)
    vectorised, vectorised_loss = _trained(specs)
    np.testing.assert_allclose(fused_loss, vectorised_loss, rtol=1e-5)
    for f, v in zip(fused, vectorised):
        torch.testing.assert_close(f, v, rtol=1e-4, atol=1e-6)


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
    gen = torch.Generator().manual_seed(0)
    c1w, c1b = torch.randn(n, 4, 1, 3, 3, generator=gen), torch.randn(n, 4, generator=gen)
    c2w, c2b = torch.randn(n, 5, 4, 3, 3, generator=gen), torch.randn(n, 5, generator=gen)
    fw, fb = torch.randn(n, 5, 4, 7, generator=gen), torch.randn(n, 7, generator=gen)
    x = torch.randn(n, b, 64, generator=gen)
    params = [c1w, c1b, c2w, c2b, fw, fb]
    names = ["relu", "tanh", "tanh"]
    mixed = forward("cnn", names, params, x)
    for i, name in enumerate(names):
        alone = forward("cnn", name, [p[i : i + 1] for p in params], x[i : i + 1])
        # unit-variance weights give outputs of order 10-100; grouped and single convolutions sum
        # in different orders, so allow float32 rounding at that scale
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-4, atol=1e-4)


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


def test_throughput_benchmark_compares_fast_and_reference_paths(load_script):
    """``benchmarks/throughput.py --paths``: both paths really run, and the fast ones are restored."""
    throughput = load_script("benchmarks/throughput.py")
    seen = []
    measure = throughput.measure_env

    def spy(*args, **kwargs):
        seen.append((trainer_module._MANUAL_BACKWARD, trainer_module._FUSED_OPTIMIZERS))
        return measure(*args, **kwargs)

    throughput.measure_env = spy
    dist = throughput.TaskDistribution(["teacher_regression"], name="teacher_regression")
    rows = throughput.measure_paths([("teacher_regression", dist)], [1], seconds=0.0, seed=0, repeats=1)
    assert sorted(seen) == [(False, False), (True, True)]
    assert rows[0]["n"] == 1 and rows[0]["fast_steps_per_s"] > 0 and rows[0]["reference_steps_per_s"] > 0
    assert trainer_module._MANUAL_BACKWARD and trainer_module._FUSED_OPTIMIZERS
    with pytest.raises(RuntimeError), throughput.reference_paths(True):
        raise RuntimeError("a failed measurement")
    assert trainer_module._MANUAL_BACKWARD and trainer_module._FUSED_OPTIMIZERS


@pytest.mark.parametrize("flag", ["--profile", "--naive-max", "--env-workers"])
def test_throughput_benchmark_refuses_a_negative_count_before_measuring(flag, load_script, capsys, monkeypatch):
    """A negative ``--profile`` used to be found out after every measurement (a ValueError traceback, the
    JSON unwritten), and a negative ``--naive-max`` silently skipped the naive reference."""
    throughput = load_script("benchmarks/throughput.py")
    monkeypatch.setattr(throughput, "matmul_peak", lambda *args, **kwargs: 1.0)
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(
            ["--families", "teacher_regression", "--sizes", "1", "--seconds", "0.01", "--no-ppo", "--wide", "8"]
            + [flag, "-1", "--out", "/nonexistent/throughput.json"]
        )
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be an integer >= 0, got '-1'" in capsys.readouterr().err
