"""The one place tether calls torch operators that are not torch's public API: oneDNN's fp32
linear and log-softmax into a buffer of the caller's. Each is taken only on the torch releases
tether has run it on (`TESTED`) and where this build has it; elsewhere the public op runs
instead, the same result to float rounding (tests/test_policy.py compares the two)."""

from __future__ import annotations

import torch

# torch releases (major, minor) whose private ops below tether has run against: [first, last]
TESTED = ((2, 4), (2, 14))


def _tested(version: str) -> bool:
    major, minor = (int(part) for part in version.split(".")[:2])
    return TESTED[0] <= (major, minor) <= TESTED[1]


_PRIVATE = _tested(torch.__version__)
# oneDNN's fp32 linear (mkldnn::_linear_pointwise), where this build has it
_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if _PRIVATE and torch.backends.mkldnn.is_available()
    else None
)


def has_onednn_linear() -> bool:
    """Whether `onednn_linear` runs oneDNN's kernel (else it is `F.linear`)."""
    return _ONEDNN_LINEAR is not None


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b by oneDNN's fp32 linear on CPU (`F.linear` where there is none)."""
    if _ONEDNN_LINEAR is None:
        return torch.nn.functional.linear(x, weight, bias)
    return _ONEDNN_LINEAR(x.contiguous(), weight, bias, "none", [], "")


def log_softmax_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last axis of `x`, written into `out` (torch.log_softmax takes no
    `out`: it allocates, and a fresh (b, v) tensor each decoding step costs page faults)."""
    if not _PRIVATE:
        return out.copy_(torch.log_softmax(x, -1))
    return torch.ops.aten.log_softmax.int_out(x, -1, out=out)
