from __future__ import annotations

import numpy as np
import pytest

from hpo_env import OBS_BOUND, ActionDecoder, ObservationBuilder


def test_actions_are_bounded_multiplicative_changes():
    dec = ActionDecoder(("lr", "weight_decay", "momentum"), max_log10_change=0.5)
    cur = np.array([[1e-2, 1e-4, 0.9]])
    up = dec.decode(np.array([[1.0, 1.0, 1.0]]), cur)
    np.testing.assert_allclose(up[0, :2], cur[0, :2] * 10**0.5)
    assert 0.9 < up[0, 2] < 0.99, "positive action means more momentum"
    np.testing.assert_allclose(dec.decode(np.zeros((1, 3)), cur), cur)
    np.testing.assert_allclose(
        dec.decode(np.array([[5.0, -5.0, 0.0]]), cur), dec.decode(np.array([[1.0, -1.0, 0.0]]), cur)
    )
    huge = dec.decode(np.full((1, 3), 1.0), np.array([[0.99, 0.29, 0.985]]))
    assert huge[0, 0] == 1.0 and huge[0, 1] == 0.3 and huge[0, 2] == 0.99, "clipped into bounds"


def test_increases_may_be_slower_than_decreases():
    dec = ActionDecoder(("lr", "weight_decay"), max_log10_change=0.5, max_log10_increase={"lr": 0.25})
    cur = np.array([[1e-2, 1e-4]])
    np.testing.assert_allclose(dec.decode(np.array([[1.0, 1.0]]), cur), [[1e-2 * 10**0.25, 1e-4 * 10**0.5]])
    np.testing.assert_allclose(dec.decode(np.array([[-1.0, -1.0]]), cur), [[1e-2 * 10**-0.5, 1e-4 * 10**-0.5]])
    np.testing.assert_allclose(dec.decode(np.array([[0.4, 0.0]]), cur)[0, 0], 1e-2 * 10**0.1)
    lr = dec.specs[0]
    for a in (-1.0, -0.3, 0.0, 0.6, 1.0):  # action_for inverts the step, both ways
        assert lr.action_for(lr.log_step(a)) == pytest.approx(a)
    assert lr.action_for(1.0) == 1.0 and lr.action_for(-1.0) == -1.0  # clipped to one action
    # the setting survives a bundle's config; a symmetric decoder's config has no such key (stable hashes)
    assert ActionDecoder.from_config(dec.to_config()) == dec
    assert "max_log10_increase" not in ActionDecoder(("lr",)).to_config()["hyperparameters"][0]
    with pytest.raises(ValueError, match="not controlled"):
        ActionDecoder(("lr",), max_log10_increase={"momentum": 0.1})
    with pytest.raises(ValueError, match="max_log10_increase of 'lr' must be positive"):
        ActionDecoder(("lr",), max_log10_increase={"lr": 0.0})


def test_a_cap_relative_to_the_initial_value_bounds_increases():
    dec = ActionDecoder(("lr", "weight_decay"), max_log10_change=0.5, max_log10_above_initial={"lr": 1.5})
    assert dec.relative_caps and not ActionDecoder().relative_caps
    initial = np.array([[1e-2, 1e-4], [0.1, 1e-4]])
    cur = initial.copy()
    for _ in range(5):  # 2.5 decades wanted; each run stops 1.5 above its own start (the second at 1.0)
        cur = dec.decode(np.ones((2, 2)), cur, initial)
    np.testing.assert_allclose(cur[:, 0], [1e-2 * 10**1.5, 1.0])
    np.testing.assert_allclose(cur[:, 1], 1e-4 * 10**2.5)  # weight decay has no cap
    np.testing.assert_allclose(dec.decode(-np.ones((2, 2)), cur, initial)[:, 0], cur[:, 0] * 10**-0.5)
    # Without a cap, `initial` changes nothing; with one, decoding without it is refused.
    plain = ActionDecoder(("lr", "weight_decay"), max_log10_change=0.5)
    np.testing.assert_array_equal(plain.decode(np.ones((2, 2)), cur, initial), plain.decode(np.ones((2, 2)), cur))
    with pytest.raises(ValueError, match="capped at 1.5 decades above its initial value.*initial="):
        dec.decode(np.ones((2, 2)), cur)
    with pytest.raises(ValueError, match="initial values of shape"):
        dec.decode(np.ones((2, 2)), cur, initial[:1])
    # The cap survives a bundle's config; a decoder without one keeps the config (and hash) it had.
    assert ActionDecoder.from_config(dec.to_config()) == dec
    assert dec.to_config()["hyperparameters"][0]["max_log10_above_initial"] == 1.5
    assert "max_log10_above_initial" not in plain.to_config()["hyperparameters"][0]
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_log10_above_initial of 'lr' must be a positive number"):
            ActionDecoder(("lr",), max_log10_above_initial={"lr": bad})
    with pytest.raises(ValueError, match="not controlled"):
        ActionDecoder(("lr",), max_log10_above_initial={"momentum": 0.1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"max_log10_above_initial": 1.5},
            r"must map controlled hyperparameters .*e\.g\. max_log10_above_initial=\{'lr': 1\.5\}; got 1\.5",
        ),
        ({"max_log10_increase": 0.25}, r"max_log10_increase must map .*got 0\.25"),
        ({"bounds": {"lr": 1.0}}, r"bounds\['lr'\] must be a \(lower, upper\) pair"),
        ({"bounds": (1e-5, 1.0)}, r"bounds must map controlled hyperparameters"),
        ({"max_log10_change": "0.5"}, r"max_log10_change must be a number of decades"),
        ({"max_log10_change": {"lr": "0.5"}}, r"max_log10_change\['lr'\] must be a number"),
    ],
)
def test_decoder_arguments_of_the_wrong_kind_say_what_is_expected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActionDecoder(**kwargs)


def test_a_batch_decodes_exactly_as_one_slot_at_a_time():
    """The vec env decodes all slots in one call, the scheduler one at a time: bit for bit the same."""
    hps = ("lr", "weight_decay", "momentum")
    rng = np.random.default_rng(0)
    for decoder in (ActionDecoder(hps), ActionDecoder(hps, max_log10_above_initial=dict.fromkeys(hps, 0.4))):
        for n in (1, 3, 8, 33, 257):
            actions = rng.uniform(-1.2, 1.2, (n, 3))
            current = np.stack(
                [10 ** rng.uniform(-5, 0, n), 10 ** rng.uniform(-6, -0.5, n), rng.uniform(0, 0.99, n)], 1
            )
            initial = current * np.array([10 ** rng.uniform(-0.5, 0, n), np.ones(n), np.ones(n)]).T
            batch = decoder.decode(actions, current, initial)
            alone = [decoder.decode(a, c, i) for a, c, i in zip(actions, current, initial)]
            np.testing.assert_array_equal(batch, np.stack(alone))


def test_decoder_config_round_trip_and_errors():
    dec = ActionDecoder(("lr", "momentum"), bounds={"lr": (1e-4, 0.5)}, max_log10_change={"lr": 0.1})
    assert ActionDecoder.from_config(dec.to_config()) == dec
    with pytest.raises(ValueError, match="malformed"):
        ActionDecoder.from_config({"nope": 1})
    with pytest.raises(ValueError, match="do not match"):
        dec.decode(np.zeros((1, 3)), np.ones((1, 2)) * 0.5)


def test_observations_are_scale_invariant_and_bounded():
    dec = ActionDecoder()
    a, b = ObservationBuilder(dec), ObservationBuilder(dec)
    hp = np.array([[1e-2, 1e-4]])
    oa = a.reset([0], [2.0], [2.1], hp, [0.1], adaptive=False)
    ob = b.reset([0], [200.0], [210.0], hp, [0.1], adaptive=False)
    np.testing.assert_allclose(oa, ob, atol=1e-6)
    act = np.array([[0.5, -0.5]])
    oa = a.update([0], [1.0], [1.2], dec.decode(act, hp), act, [0.2])
    ob = b.update([0], [100.0], [120.0], dec.decode(act, hp), act, [0.2])
    np.testing.assert_allclose(oa, ob, atol=1e-6)
    names = a.feature_names()
    assert len(names) == a.dim == oa.shape[1]
    assert oa[0, names.index("log_val_loss")] == pytest.approx(np.log(0.5))
    assert oa[0, names.index("lr_prev_action")] == pytest.approx(0.5)
    bad = a.update([0], [np.nan], [np.inf], hp, act, [0.3])
    assert np.all(np.isfinite(bad)) and np.all(np.abs(bad) <= OBS_BOUND)
    # A diverged (non-finite) loss reads as bad as it gets, not as "unchanged".
    assert bad[0, names.index("log_val_loss")] == OBS_BOUND and bad[0, names.index("log_train_loss")] == OBS_BOUND
    beyond = a.update([0], [1.0], [1.0], hp, np.array([[3.0, -2.0]]), [0.4])  # a Gaussian head samples beyond
    assert beyond[0, names.index("lr_prev_action")] == 1.0 and beyond[0, names.index("weight_decay_prev_action")] == -1


def test_a_first_validation_loss_of_zero_is_no_reference():
    """Losses are observed relative to the first one; a first loss of 0 (or NaN) would make every later
    one infinitely large, so the reference is 1 there."""
    for first in (0.0, np.nan):
        b = ObservationBuilder(ActionDecoder())
        hp = np.array([[1e-2, 1e-4]])
        b.reset([0], [first], None, hp, [0.1], adaptive=False)
        obs = b.update([0], [0.5], None, hp, np.zeros((1, 2)), [0.2])
        assert obs[0, b.feature_names().index("log_val_loss")] == pytest.approx(np.log(0.5))


def test_every_feature_is_the_documented_quantity():
    """Each feature, computed by hand over three intervals (the scale-invariance and env/scheduler
    agreement tests pass on any feature that the two share, whatever it computes)."""
    dec = ActionDecoder(("lr", "weight_decay"), bounds={"lr": (1e-4, 1.0), "weight_decay": (1e-6, 1e-2)})
    b = ObservationBuilder(dec)
    names = b.feature_names()
    hp = np.array([[1e-2, 1e-4]])  # lr halfway up its 4 decades in log space, weight decay halfway up its 4
    val, train = [4.0, 2.0, 3.0], [5.0, 1.0, 1.5]
    obs = b.reset([0], [val[0]], [train[0]], hp, [0.25], adaptive=False)[0]
    expected = {"progress": 0.25, "log_val_loss": 0.0, "log_train_loss": np.log(5 / 4), "val_loss_change": 0.0}
    expected |= {"val_loss_trend": 0.0, "train_loss_trend": 0.0, "train_val_gap": np.log(5 / 4), "val_above_best": 0}
    expected |= {"lr_position": 0.0, "weight_decay_position": 0.0, "lr_log_change": 0.0, "lr_prev_action": 0.0}
    for name, value in expected.items():
        assert obs[names.index(name)] == pytest.approx(value, abs=1e-6), name
    ema = np.log(np.array([val[0], val[0], train[0], train[0]]) / val[0])
    actions = [np.array([[1.0, 0.0]]), np.array([[-0.5, 1.0]])]
    for t, act in enumerate(actions, start=1):
        new_hp = dec.decode(act, hp)
        obs = b.update([0], [val[t]], [train[t]], new_hp, act, [0.25 * (t + 1)])[0]
        x_val, x_tr = np.log(val[t] / val[0]), np.log(train[t] / val[0])
        ema = np.array([0.5, 0.9, 0.5, 0.9]) * ema + np.array([0.5, 0.1, 0.5, 0.1]) * [x_val, x_val, x_tr, x_tr]
        expected = {
            "progress": 0.25 * (t + 1),
            "log_val_loss": x_val,
            "log_train_loss": x_tr,
            "val_loss_change": x_val - np.log(val[t - 1] / val[0]),
            "train_loss_change": x_tr - np.log(train[t - 1] / val[0]),
            "val_loss_trend": ema[0] - ema[1],
            "train_loss_trend": ema[2] - ema[3],
            "train_val_gap": x_tr - x_val,
            "val_above_best": x_val - np.log(min(val[: t + 1]) / val[0]),
            "has_train_loss": 1.0,
            "adaptive_optimizer": 0.0,
            "lr_log_change": np.log10(new_hp[0, 0] / 1e-2),
            "weight_decay_log_change": np.log10(new_hp[0, 1] / 1e-4),
            "lr_position": 2 * (np.log10(new_hp[0, 0]) + 4) / 4 - 1,
            "weight_decay_position": 2 * (np.log10(new_hp[0, 1]) + 6) / 4 - 1,
            "lr_prev_action": act[0, 0],
            "weight_decay_prev_action": act[0, 1],
        }
        assert set(expected) == set(names)
        for name, value in expected.items():
            assert obs[names.index(name)] == pytest.approx(value, abs=1e-6), (t, name)
        hp = new_hp
    assert obs[names.index("val_above_best")] > 0  # the third validation loss is above the second's


def test_position_maps_the_bounds_to_plus_minus_one_in_the_actions_log_space():
    dec = ActionDecoder(("lr", "momentum"), bounds={"lr": (1e-4, 1.0), "momentum": (0.0, 0.99)})
    values = np.array([[1e-4, 0.0], [1e-2, 0.9], [1.0, 0.99], [10.0, 0.999]])  # the last row lies beyond: clipped
    np.testing.assert_allclose(dec.position(values), [[-1, -1], [0, 0], [1, 1], [1, 1]], atol=1e-12)
    # Changes are measured between the clipped values too: a start beyond the bounds moved nowhere.
    np.testing.assert_allclose(dec.log_change(values[[3]], np.array([[0.5, 0.9]])), [[np.log10(2.0), 1.0]])


def test_a_value_outside_its_bounds_moves_from_the_bound_it_lies_beyond():
    """A user's optimiser may start above the upper bound (lr=2 against 1.0): one step down goes one
    step below the bound, not one step below 2 (which the clip would hold at the bound)."""
    dec = ActionDecoder(("lr", "weight_decay"), max_log10_change=0.25)
    down = dec.decode(np.array([[-1.0, 1.0]]), np.array([[2.0, 1e-9]]))
    np.testing.assert_allclose(down, [[10**-0.25, 1e-6 * 10**0.25]])


def test_a_run_can_start_its_observations_from_a_cut_start():
    # A deployed run whose first interval diverged: its first observation shows the cut from the start.
    dec = ActionDecoder()
    hp, start = np.array([[1e-2 * 10**-0.25, 1e-4]]), np.array([[1e-2, 1e-4]])
    b = ObservationBuilder(dec)
    obs = b.reset([0], [2.0], [2.1], hp, [0.1], adaptive=False, initial=start, prev_action=np.array([[-1.0, 0.0]]))
    names = b.feature_names()
    assert obs[0, names.index("lr_log_change")] == pytest.approx(-0.25)
    assert obs[0, names.index("lr_prev_action")] == -1.0 and obs[0, names.index("weight_decay_log_change")] == 0.0
    plain = ObservationBuilder(dec).reset([0], [2.0], [2.1], hp, [0.1], adaptive=False)
    assert plain[0, names.index("lr_log_change")] == 0.0 and plain[0, names.index("lr_prev_action")] == 0.0
    with pytest.raises(ValueError, match=r"initial must have shape \(1, 2\), got \(2,\)"):
        b.reset([0], [2.0], [2.1], hp, [0.1], adaptive=False, initial=start[0])


def test_missing_train_loss_is_flagged():
    b = ObservationBuilder(ActionDecoder())
    obs = b.reset([0], [2.0], None, np.array([[1e-3, 1e-2]]), [0.1], adaptive=True)
    names = b.feature_names()
    assert obs[0, names.index("has_train_loss")] == 0.0
    assert obs[0, names.index("adaptive_optimizer")] == 1.0


def test_builder_state_round_trip():
    dec = ActionDecoder()
    a = ObservationBuilder(dec)
    hp = np.array([[1e-2, 1e-4]])
    a.reset([0], [2.0], [2.0], hp, [0.1], adaptive=False)
    a.update([0], [1.5], [1.4], hp, np.zeros((1, 2)), [0.2])
    b = ObservationBuilder(dec)
    b.load_state_dict(a.state_dict())
    args = ([0], [1.2], [1.1], hp, np.ones((1, 2)) * 0.3, [0.3])
    np.testing.assert_array_equal(a.update(*args), b.update(*args))
    with pytest.raises(ValueError, match="shape"):
        ObservationBuilder(ActionDecoder(("lr",))).load_state_dict(a.state_dict())


def test_observation_builder_says_what_it_needs():
    from hpo_env import ActionDecoder, ObservationBuilder

    decoder = ActionDecoder(("lr", "weight_decay"))
    with pytest.raises(ValueError, match="n .* must be an integer >= 1"):
        ObservationBuilder(decoder, -1)
    with pytest.raises(TypeError, match="decoder must be an ActionDecoder"):
        ObservationBuilder(("lr",))
    builder = ObservationBuilder(decoder, 2)
    hp = np.array([[0.1, 1e-4]])
    with pytest.raises(ValueError, match="were never reset"):
        builder.update([0], np.array([1.0]), None, hp, np.zeros((1, 2)), np.array([0.5]))
    with pytest.raises(ValueError, match=r"hparams must have shape \(1, 2\)"):
        builder.reset([0], np.array([1.0]), None, np.array([[0.1]]), np.array([0.5]), adaptive=False)
    with pytest.raises(ValueError, match=r"slots must be integers in \[0, 2\)"):
        builder.reset([2], np.array([1.0]), None, hp, np.array([0.5]), adaptive=False)
    obs = builder.reset([0], np.array([1.0]), None, hp, np.array([0.5]), adaptive=False)
    assert obs.shape == (1, builder.dim)
