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
