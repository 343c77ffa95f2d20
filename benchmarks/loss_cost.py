"""What the policy losses and the corrected KL cost by themselves: tether.losses.rl_loss, forward
and backward, on one micro-batch of the CPU default's shape (2 completions x 48 tokens), one
thread, median of 300 calls each. A step runs 8 such micro-batches (batch 16, micro-batch 2).

    python benchmarks/loss_cost.py
"""

import time

import torch

from tether import losses, ppo

B, T = 2, 48
VARIANTS = {
    "clip": dict(kind="clip"),
    "gspo": dict(kind="gspo"),
    "cispo": dict(kind="cispo"),
    "sapo": dict(kind="sapo"),
    "clip + clip-higher + corrected KL": dict(kind="clip", high=0.28, corrected=True),
}


def median_ms(kind: str, high: float | None = None, corrected: bool = False, reps: int = 300):
    logprobs = (torch.randn(B, T) * 0.1 - 2).requires_grad_()
    old = logprobs.detach() + torch.randn(B, T) * 0.01
    ref = logprobs.detach() + torch.randn(B, T) * 0.05
    advantages = torch.randn(B, 1).expand(B, T).contiguous()
    mask = torch.ones(B, T)
    aggregation = "seq-mean-token-mean" if kind in ("gspo", "sapo") else "token-mean"
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        if corrected:
            kl = ppo.importance_weighted_k3(logprobs, old, ref)
        else:
            kl = ppo.kl_estimate(logprobs, ref, "k3")
        loss, _ = losses.rl_loss(
            logprobs,
            old,
            advantages,
            mask,
            0.2,
            aggregation,
            n_tokens=float(B * T),
            n_sequences=B,
            max_len=T,
            kl=kl,
            kl_coef=0.05,
            policy_loss_kind=kind,
            cliprange_high=high,
        )
        loss.backward()
        logprobs.grad = None
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[reps // 2]


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for name, kw in VARIANTS.items():
        print(f"{name:<34} {median_ms(**kw):.3f} ms a micro-batch, forward + backward")
