"""An independent model of the DBN step (README, "What DBN is"), written with plain autograd-tracked torch ops in float64.

It shares no code with the package: the statistics are written out by hand, the schedule is
evaluated from its formula, and gradients come from autograd, not from the analytic backward.
"""

from __future__ import annotations

import torch


def schedule_value(kind, k: int) -> float:
    """a_k for the oracle's own description of a schedule: ('const', a) or ('inv', p, s, o) or
    ('call', fn)."""
    if k == 1:
        return 1.0
    if kind[0] == "const":
        return kind[1]
    if kind[0] == "inv":
        _, p, s, o = kind
        return min(1.0, s / (k + o) ** p)
    return float(kind[1](k))


class DBNOracle:
    """Algorithm 1 of Ma & Klabjan with PyTorch's running statistics alongside; with
    ``normalize_with="batch"`` the authors' released variant: batch norm in training, the mean
    and the inverse std averaged for evaluation (``sig`` is the reciprocal of the latter)."""

    def __init__(self, C: int, eps: float, momentum, schedule, normalize_with="average"):
        self.eps, self.momentum, self.schedule = eps, momentum, schedule
        self.normalize_with = normalize_with
        self.mu = torch.zeros(C, dtype=torch.float64)
        self.sig = torch.ones(C, dtype=torch.float64)
        self.rm = torch.zeros(C, dtype=torch.float64)
        self.rv = torch.ones(C, dtype=torch.float64)
        self.k = 0

    def _shape(self, x):
        return (1, -1) + (1,) * (x.dim() - 2)

    def train_step(self, x, gamma, beta, grad_through_stats=True):
        """x, gamma, beta: float64 leaves (requires_grad). Returns y (autograd-connected)."""
        dims = [0] + list(range(2, x.dim()))
        M = x.numel() // x.shape[1]
        self.k += 1
        a = schedule_value(self.schedule, self.k)
        m_b = x.sum(dims) / M
        centered = x - m_b.view(self._shape(x))
        v_b = (centered * centered).sum(dims) / M
        s_b = torch.sqrt(v_b + self.eps)
        if not grad_through_stats:
            m_b_used, s_b_used = m_b.detach(), s_b.detach()
        else:
            m_b_used, s_b_used = m_b, s_b
        if self.normalize_with == "batch":
            mu, sig = m_b_used, s_b_used
            self.mu = a * m_b.detach() + (1 - a) * self.mu
            self.sig = 1 / (a / s_b.detach() + (1 - a) / self.sig)
        else:
            mu = a * m_b_used + (1 - a) * self.mu
            sig = a * s_b_used + (1 - a) * self.sig
            self.mu, self.sig = mu.detach(), sig.detach()
        y = (x - mu.view(self._shape(x))) / sig.view(self._shape(x))
        y = y * gamma.view(self._shape(x)) + beta.view(self._shape(x))
        f = 1.0 / self.k if self.momentum is None else self.momentum
        self.rm = (1 - f) * self.rm + f * m_b.detach()
        self.rv = (1 - f) * self.rv + f * v_b.detach() * M / (M - 1)
        return y

    def eval_step(self, x, gamma, beta, eval_stats="dbn"):
        if eval_stats == "dbn":
            mean, std = self.mu, self.sig
        else:
            mean, std = self.rm, torch.sqrt(self.rv + self.eps)
        y = (x - mean.view(self._shape(x))) / std.view(self._shape(x))
        return y * gamma.view(self._shape(x)) + beta.view(self._shape(x))
