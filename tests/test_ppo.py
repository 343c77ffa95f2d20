"""The PPO math against hand-computed values (derivations in the comments)."""

import math

import pytest
import torch
import torch.nn.functional as F

from tether import losses, ppo


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
    loss, clipped, ratio = losses.policy_loss(new, old, adv, torch.ones(1, 4), cliprange=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]]), atol=1e-6, rtol=0)
    assert clipped.tolist() == [[True, False, False, True]]
    # padding contributes nothing
    loss_p, clipped_p, _ = losses.policy_loss(new, old, adv, torch.tensor([[1, 1, 0, 0]]), 0.2)
    assert loss_p[0, 2:].tolist() == [0.0, 0.0] and not clipped_p[0, 3]


def test_value_loss_clipping_by_hand():
    # old 1.0, new 1.5, clip 0.2 -> V_clip = 1.2
    # R = 2.0: (1.5-2)^2 = .25, (1.2-2)^2 = .64 -> .5 * .64 = .32 (clipped term wins)
    # R = 1.0: .25 vs .04 -> .5 * .25 = .125
    loss, clipped = losses.value_loss(
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
    assert losses.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    # predicting the mean explains nothing
    assert losses.explained_variance(torch.full_like(ret, 2.5), ret, mask).item() == pytest.approx(
        0.0, abs=1e-6
    )


# ----------------------------------------------------------------------------------------------
# the 2026 estimators: clip-higher, GSPO, CISPO, SAPO, the corrected KL, DAPO's length and
# group filters (TRL as the oracle: test_estimators_trl.py)
# ----------------------------------------------------------------------------------------------


def test_clip_higher_by_hand():
    # eps_low 0.2, eps_high 0.28, A = +1: r = 1.25 is inside [0.8, 1.28] -> -1.25 (with the
    # symmetric 0.2 it was clipped to -1.2); r = 1.5 -> -1.28; r = 0.5, A = -1 -> 0.8 as before
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.25, 1.5, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, clipped, _ = losses.policy_loss(new, old, adv, torch.ones(1, 3), 0.2, cliprange_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.28, 0.8]]), atol=1e-6, rtol=0)
    assert clipped.tolist() == [[False, True, True]]
    symmetric, _, _ = losses.policy_loss(new, old, adv, torch.ones(1, 3), 0.2)
    assert symmetric[0, 0].item() == pytest.approx(-1.2, abs=1e-6)


def test_gspo_ratio_is_the_geometric_mean_by_hand():
    # row 0: log r = [0.3, -0.1] -> mean 0.1, s = e^0.1 = 1.105171 (the padding's 40 ignored);
    #   A = 1, eps 0.05 / 0.08: clipped at 1.08 -> L = -1.08
    # row 1: log r = [0.02, 0.0, -0.05] -> mean -0.01, s = 0.990050, A = -2: inside -> 1.980100
    logprobs = torch.tensor([[-1.0, -2.0, 40.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.3, -1.9, 0.0], [-0.52, -0.5, -0.45]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    loss, clipped, ratio = losses.gspo_policy_loss(logprobs, old, adv, mask, 0.05, 0.08)
    torch.testing.assert_close(ratio, torch.tensor([1.105171, 0.990050]), atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, torch.tensor([-1.08, 1.980100]), atol=1e-6, rtol=0)
    assert clipped.tolist() == [True, False]
    # the gradient of an unclipped completion spreads evenly: d(-s A)/d logprob_t = -s A / |y|
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    expected = torch.tensor([[0.0, 0.0, 0.0], [1.980100 / 3] * 3])
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)


def test_cispo_keeps_the_gradient_the_clip_drops():
    # r = 2 (log r = ln 2), A = 1, eps_high 0.2: PPO's clip is flat there (gradient 0); CISPO's
    # L = -sg(min(2, 1.2)) * A * log pi has d L / d log pi = -1.2; r = 0.5 (no lower bound):
    # weight 0.5, A = -1 -> +0.5
    logprobs = torch.log(torch.tensor([[2.0, 0.5]])).requires_grad_()
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, truncated, _ = losses.cispo_policy_loss(logprobs, old, adv, mask, 0.2)
    # value: -1.2 * 1 * ln 2 = -0.831777; -0.5 * -1 * ln 0.5 = -0.346574
    torch.testing.assert_close(loss, torch.tensor([[-0.831777, -0.346574]]), atol=1e-6, rtol=0)
    assert truncated.tolist() == [[True, False]]
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-1.2, 0.5]]), atol=1e-6, rtol=0)
    clip_loss, _, _ = losses.policy_loss(logprobs, old, adv, mask, 0.2)
    (clip_grad,) = torch.autograd.grad(clip_loss.sum(), logprobs)
    assert clip_grad[0, 0].item() == 0.0  # the negative control: the clip drops it


def test_sapo_gate_by_hand():
    # f(r) = (4 / tau) sigmoid(tau (r - 1)). r = 1, tau_pos = 1, A = 1: f = 2, L = -2, and
    # dL/dlog pi = -f'(1) r A = -4 * 0.25 = -1 (the plain policy gradient's).
    # r = 1.5, A = -1, tau_neg = 2: sigmoid(1) = 0.731059, f = 2 * 0.731059 = 1.462117, L = 1.462117;
    # f'(r) = 4 sigmoid(1)(1 - sigmoid(1)) = 0.786448, dL/dlog pi = f'(r) * r = 1.179672
    logprobs = torch.log(torch.tensor([[1.0, 1.5]])).requires_grad_()
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    loss, clipped, _ = losses.sapo_policy_loss(logprobs, old, adv, torch.ones(1, 2), 1.0, 2.0)
    torch.testing.assert_close(loss, torch.tensor([[-2.0, 1.462117]]), atol=1e-6, rtol=0)
    assert not clipped.any()
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 1.179672]]), atol=1e-6, rtol=0)


def _per_sample_gradients(value_fn, theta, samples):
    """(n, v) gradients of value_fn(log pi(x_i)) with respect to the logits theta, one per
    sample: d/d theta = value_fn'(log pi(x)) * (onehot(x) - pi), value_fn' by autograd."""
    log_pi = torch.log_softmax(theta, -1).detach()
    lp = log_pi[samples].clone().requires_grad_()
    (dvalue,) = torch.autograd.grad(value_fn(lp).sum(), lp)
    onehot = F.one_hot(samples, theta.shape[0]).double()
    return dvalue[:, None] * (onehot - log_pi.exp()[None])


def test_importance_weighted_k3_gradient_is_unbiased_and_plain_k3_is_not():
    """A categorical policy pi = softmax(theta) over 6 outcomes; tokens drawn from an older
    policy pi_old != pi. The exact gradient of KL(pi || q) is known (autograd through the sum).
    The importance-weighted k3's mean gradient is within 4 standard errors of it in every
    component; plain k3's is off by more than 20 (it follows grad KL(q || pi), and E_old not
    E_pi)."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=gen, dtype=torch.float64)
    theta_old = theta + 0.7 * torch.randn(6, generator=gen, dtype=torch.float64)
    log_q = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), -1)
    samples = torch.multinomial(torch.softmax(theta_old, -1), 200_000, True, generator=gen)
    log_old = torch.log_softmax(theta_old, -1)[samples]
    ref = log_q[samples]

    theta_exact = theta.clone().requires_grad_()
    log_pi = torch.log_softmax(theta_exact, -1)
    (exact,) = torch.autograd.grad((log_pi.exp() * (log_pi - log_q)).sum(), theta_exact)

    def mean_and_stderr(value_fn):
        g = _per_sample_gradients(value_fn, theta, samples)
        return g.mean(0), g.std(0) / math.sqrt(len(g))

    corrected, se_c = mean_and_stderr(lambda lp: ppo.importance_weighted_k3(lp, log_old, ref))
    plain, se_p = mean_and_stderr(lambda lp: ppo.kl_estimate(lp, ref, "k3"))
    assert ((corrected - exact).abs() / se_c).max() < 4, (corrected, exact)
    assert ((plain - exact).abs() / se_p).max() > 20, (plain, exact)
    # the value at r = 1 is k3's: on-policy the two estimates are equal
    lp = torch.tensor([[-1.2, -0.3]], dtype=torch.float64)
    ref_lp = torch.tensor([[-0.7, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(
        ppo.importance_weighted_k3(lp, lp.clone(), ref_lp), ppo.kl_estimate(lp, ref_lp, "k3")
    )


def test_overlong_penalty_by_hand():
    # L_max 10, L_cache 4: free up to 6 tokens; then (6 - |y|) / 4: 7 -> -0.25, 8 -> -0.5,
    # 9 -> -0.75, 10 -> -1; beyond 10: -1
    lengths = torch.tensor([0, 5, 6, 7, 8, 9, 10, 12])
    expected = torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0])
    torch.testing.assert_close(ppo.overlong_penalty(lengths, 10, 4), expected, atol=1e-7, rtol=0)
    # a buffer as long as L_max punishes from the first token: |y| = 5 -> -5/10
    assert ppo.overlong_penalty(torch.tensor([5]), 10, 10).item() == pytest.approx(-0.5)


def test_constant_groups_are_those_without_advantage():
    scores = torch.tensor(
        [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 1e-6]
    )
    flat = ppo.constant_groups(scores, 4)
    assert flat.tolist() == [True, False, True, False]
    # they are exactly the groups whose GRPO and RLOO advantages are all 0
    for advantages in (ppo.group_advantages(scores, 4), ppo.rloo_advantages(scores, 4)):
        no_signal = (advantages.view(-1, 4) == 0).all(1)
        assert no_signal.tolist() == flat.tolist()
