import pytest

from tether.kl import AdaptiveKLController, FixedKLController, make_kl_controller


def test_fixed_controller_never_moves():
    c = FixedKLController(0.2)
    assert c.update(100.0, 256) == 0.2


def test_adaptive_controller_by_hand():
    # KL 9 vs target 6: error = clip(9/6 - 1 = .5, +-.2) = .2; beta *= 1 + .2 * 256 / 10000
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(9.0, 256) == pytest.approx(0.1 * 1.00512)
    # KL 5.4: error = 5.4/6 - 1 = -.1 (inside the clip); beta *= 1 - .1 * 256 / 10000
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(5.4, 256) == pytest.approx(0.1 * 0.99744)
    # KL far below target: error clipped at -.2
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(0.0, 256) == pytest.approx(0.1 * (1 - 0.2 * 256 / 10_000))


def test_controller_state_round_trip_and_factory():
    c = make_kl_controller(0.05, 3.0, 1000)
    assert isinstance(c, AdaptiveKLController)
    c.update(10.0, 16)
    d = make_kl_controller(0.05, 3.0, 1000)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value
    assert isinstance(make_kl_controller(0.05, None, 1000), FixedKLController)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adaptive_controller_ignores_a_non_finite_kl(bad):
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(bad, 256) == 0.1
    assert c.update(9.0, 256) == pytest.approx(0.1 * 1.00512)  # and still works afterwards
