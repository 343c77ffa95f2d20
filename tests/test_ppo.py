"""The PPO math against hand-computed values (derivations in the comments)."""

import math

import pytest
import torch

from tether import ppo


def test_logprobs_and_entropy():
    # logits [0, ln 3] -> softmax [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    lp = ppo.logprobs_from_logits(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    # uniform over 4 -> H = ln 4
    assert ppo.entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(
        math.log(4), abs=1e-6
    )
    # H([1/4, 3/4]) = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    assert ppo.entropy_from_logits(logits).item() == pytest.approx(0.562335, abs=1e-5)


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", 0.693147),  # log r = ln 0.5 - ln 0.25 = ln 2
        ("k2", 0.240227),  # (ln 2)^2 / 2
        ("k3", 0.193147),  # exp(-ln 2) - 1 + ln 2 = 0.5 - 1 + 0.693147
    ],
)
def test_kl_estimators(estimator, expected):
    kl = ppo.kl_estimate(
        torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]]), estimator
    )
    assert kl.item() == pytest.approx(expected, abs=1e-6)


def test_kl_estimators_zero_when_equal_and_unknown_rejected():
    lp = torch.tensor([[-1.3, -0.2]])
    for est in ("k1", "k2", "k3"):
        assert torch.equal(ppo.kl_estimate(lp, lp.clone(), est), torch.zeros_like(lp))
    with pytest.raises(ValueError, match="k4"):
        ppo.kl_estimate(lp, lp, "k4")


def test_k3_is_unbiased_kl_on_samples():
    # E_{x~p}[k3] = KL(p||q) for p = [0.7, 0.3], q = [0.4, 0.6]
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    exact = (p * (p / q).log()).sum()
    k3 = ppo.kl_estimate(p.log()[None], q.log()[None], "k3")[0]
    assert (p * k3).sum().item() == pytest.approx(exact.item(), abs=1e-6)


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # valid 1,2,3,4: mean 2.5, unbiased var (2.25+0.25+0.25+2.25)/3 = 5/3, std 1.290994
    w = ppo.masked_whiten(x, mask)
    expected = torch.tensor([[-1.161895, -0.387298, 0.387298], [1.161895, 0.0, 0.0]])
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=0)
    # without shifting, the mean stays: (x - 2.5)/std + 2.5
    w2 = ppo.masked_whiten(x, mask, shift_mean=False)
    assert w2[0, 0].item() == pytest.approx(-1.161895 + 2.5, abs=1e-5)


def test_masked_mean_does_not_leak_nan_from_padding():
    x = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]])
    mask = torch.tensor([[1, 0], [1, 0]])
    assert ppo.masked_mean(x, mask).item() == 2.0


def test_shaped_rewards():
    # r_t = -0.5 * KL_t, + score on the last valid token
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    r = ppo.shaped_rewards(torch.tensor([1.0, 2.0]), kl, 0.5, mask)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 + 2.0, 0.0]])
    torch.testing.assert_close(r, expected, atol=1e-6, rtol=0)


def test_gae_four_tokens_by_hand():
    # gamma 0.9, lambda 0.5, V = [.5 .6 .7 .8], reward 1 on the last token:
    # d3 = 1 - .8 = .2                  A3 = .2
    # d2 = .9*.8 - .7 = .02             A2 = .02 + .45*.2    = .11
    # d1 = .9*.7 - .6 = .03             A1 = .03 + .45*.11   = .0795
    # d0 = .9*.6 - .5 = .04             A0 = .04 + .45*.0795 = .075775
    # row 2 ends after 3 tokens (V_3 = 0 there, pad values ignored):
    # d2 = 1 - .7 = .3 -> A2 = .3; A1 = .03 + .45*.3 = .165; A0 = .04 + .45*.165 = .11425
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.8], [0.5, 0.6, 0.7, 9.9]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    adv, ret = ppo.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(
        adv,
        torch.tensor([[0.075775, 0.0795, 0.11, 0.2], [0.11425, 0.165, 0.3, 0.0]]),
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(
        ret,
        torch.tensor([[0.575775, 0.6795, 0.81, 1.0], [0.61425, 0.765, 1.0, 0.0]]),
        atol=1e-6,
        rtol=0,
    )


def naive_gae(rewards, values, mask, gamma, lam):
    """The per-sample, per-token loop, straight from the definition: the oracle."""
    out = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        n = int(mask[i].sum())
        for t in range(n):
            a = 0.0
            for k in range(t, n):
                v_next = values[i, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[i, k].item() + gamma * v_next - values[i, k].item()
                a += (gamma * lam) ** (k - t) * delta
            out[i, t] = a
    return out


def test_vectorised_gae_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    lengths = torch.tensor([9, 1, 4, 7, 2])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    adv, _ = ppo.gae_advantages(rewards, values, mask, gamma=0.95, lam=0.9)
    torch.testing.assert_close(
        adv, naive_gae(rewards, values, mask, 0.95, 0.9), atol=1e-5, rtol=1e-5
    )


def test_policy_loss_clipping_by_hand():
    # ratio 1.5 / 0.5 against A = +-1, eps 0.2:
    # A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped)   A=-1, r=1.5: max(1.5, 1.2) = 1.5
    # A=+1, r=0.5: max(-0.5, -0.8) = -0.5             A=-1, r=0.5: max(0.5, 0.8) = 0.8 (clipped)
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped, ratio = ppo.policy_loss(new, old, adv, torch.ones(1, 4), cliprange=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]]), atol=1e-6, rtol=0)
    assert clipped.tolist() == [[True, False, False, True]]
    # padding contributes nothing
    loss_p, clipped_p, _ = ppo.policy_loss(new, old, adv, torch.tensor([[1, 1, 0, 0]]), 0.2)
    assert loss_p[0, 2:].tolist() == [0.0, 0.0] and not clipped_p[0, 3]


def test_value_loss_clipping_by_hand():
    # old 1.0, new 1.5, clip 0.2 -> V_clip = 1.2
    # R = 2.0: (1.5-2)^2 = .25, (1.2-2)^2 = .64 -> .5 * .64 = .32 (clipped term wins)
    # R = 1.0: .25 vs .04 -> .5 * .25 = .125
    loss, clipped = ppo.value_loss(
        torch.tensor([[1.5, 1.5]]),
        torch.tensor([[1.0, 1.0]]),
        torch.tensor([[2.0, 1.0]]),
        torch.ones(1, 2),
        0.2,
    )
    torch.testing.assert_close(loss, torch.tensor([[0.32, 0.125]]), atol=1e-6, rtol=0)
    assert clipped.tolist() == [[True, False]]


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert ppo.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    # predicting the mean explains nothing
    assert ppo.explained_variance(torch.full_like(ret, 2.5), ret, mask).item() == pytest.approx(
        0.0, abs=1e-6
    )
