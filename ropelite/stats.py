"""Statistics of attention distributions, in nats unless said otherwise."""

from __future__ import annotations

import math

import torch


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """H(p) = -sum p ln p over ``dim``, with 0 ln 0 = 0 (seed paper Algorithm 1). Uniform over n gives ln n."""
    p = p.double()
    return -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(dim)


def kl_divergence(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """KL(p || q) = sum p ln(p/q), 0 where p = 0."""
    p, q = p.double(), q.double()
    ratio = torch.where(p > 0, p / q.clamp_min(1e-300), torch.ones_like(p))
    return (p * ratio.log()).sum(dim)


def js_divergence(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen-Shannon divergence JS(p, q) = (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2: symmetric,
    0 for identical distributions, at most ln 2 nats (1 bit). Divide by ln 2 for bits."""
    m = (p.double() + q.double()) / 2
    return (kl_divergence(p, m, dim) + kl_divergence(q, m, dim)) / 2


NATS_PER_BIT = math.log(2)
