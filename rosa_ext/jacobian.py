"""J and J^T of p(theta) for both parameterisations (ROSA_SPEC.md sections 2-3).

:class:`RosaOperator` turns a backend's streaming primitives into the JVP,
the VJP, the T x T Gram matrix J J^T and the explicit rows of J where they
are cheap. Vectors of parameters are (B, P): P = d + V laid out as
``[delta_a, delta_b]`` (lora) or P = d (hidden), one row per conversation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .common.types import HeadProblem
from .target import residual_target


class RosaOperator:
    """The linearised ROSA system of one packed problem.

    Attributes (compute dtype, N packed tokens):
        stats: the backend's per-token cache
        p: (N,) probability of each observed token
        g: (N,) residual target p* - p (spec section 1)
    """

    def __init__(self, prob: HeadProblem, backend) -> None:
        self.prob = prob
        self.backend = backend
        self.stats = backend.stats(prob)
        self.p = torch.exp(self.stats.logp)
        self.g = residual_target(self.stats.logp, prob.reward[prob.seg], prob.beta)
        cd = prob.compute_dtype
        self._h = prob.hidden.to(cd)
        self._by: Optional[torch.Tensor] = None
        if prob.lora_b is not None:
            self._by = prob.lora_b[prob.seg, prob.targets]

    # -- helpers -------------------------------------------------------------------
    def _segment_sum(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum (N, k) rows per conversation -> (B, k)."""
        B = self.prob.num_conversations
        if B == 1:
            return rows.sum(0, keepdim=True)
        return torch.zeros(B, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(
            0, self.prob.seg, rows)

    def _scatter_minus_column(self, w: torch.Tensor) -> torch.Tensor:
        """scatter_add(y, w) - C(w) -> (B, V): the VJP through the softmax (spec section 3)."""
        prob = self.prob
        q = -self.backend.column_reduce(prob, self.stats, w)
        q.index_put_((prob.seg, prob.targets), w, accumulate=True)
        return q

    # -- J v and J^T u -----------------------------------------------------------------
    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """u = J v for v (B, P) -> (N,)."""
        prob, st = self.prob, self.stats
        s, seg, y = prob.lora_scale, prob.seg, prob.targets
        d = prob.hidden_size
        if prob.mode == "lora":
            va, vb = v[:, :d], v[:, d:]
            hv = (self._h * va[seg]).sum(1)
            row = self.backend.row_reduce(prob, st, vb)
            return s * self.p * ((self._by - st.pib) * hv + st.ah * (vb[seg, y] - row))
        u_vocab = self.backend.weight_matvec(prob, v)  # (B, V) = W v
        if prob.lora_b is not None:  # W_eff = W + s b a^T
            u_vocab = u_vocab + s * (v * prob.lora_a).sum(1, keepdim=True) * prob.lora_b
        return self.p * (u_vocab[seg, y] - self.backend.row_reduce(prob, st, u_vocab))

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """J^T u for u (N,) -> (B, P)."""
        prob, st = self.prob, self.stats
        s = prob.lora_scale
        if prob.mode == "lora":
            coef_a = s * u * self.p * (self._by - st.pib)
            grad_a = self._segment_sum(coef_a.unsqueeze(1) * self._h)
            grad_b = self._scatter_minus_column(s * u * self.p * st.ah)
            return torch.cat([grad_a, grad_b], dim=1)
        q = self._scatter_minus_column(u * self.p)
        grad = self.backend.weight_rmatvec(prob, q)
        if prob.lora_b is not None:
            grad = grad + s * (q * prob.lora_b).sum(1, keepdim=True) * prob.lora_a
        return grad

    # -- dual form -----------------------------------------------------------------------
    def jacobian_rows(self) -> torch.Tensor:
        """Explicit rows of J that are only d wide -> (N, d).

        hidden: J_t = p_t (W_eff[y_t] - W_eff^T pi_t)  (one extra pass for pi W)
        lora:   J_t,a = s p_t (b_{y_t} - pi_t.b) h_t   (no pass needed)
        """
        prob, st = self.prob, self.stats
        s, seg = prob.lora_scale, prob.seg
        if prob.mode == "lora":
            return (s * self.p * (self._by - st.pib)).unsqueeze(1) * self._h
        w_y = prob.weight[prob.targets].to(prob.compute_dtype)
        pi_w = self.backend.pi_weight(prob, st)
        if prob.lora_b is not None:
            a = prob.lora_a[seg]
            w_y = w_y + s * self._by.unsqueeze(1) * a
            pi_w = pi_w + s * st.pib.unsqueeze(1) * a
        return self.p.unsqueeze(1) * (w_y - pi_w)

    def gram(self, rows: torch.Tensor) -> torch.Tensor:
        """J J^T within each conversation -> (B, Tmax, Tmax), zero-padded.

        ``rows`` are :meth:`jacobian_rows`. For lora the b-block adds (spec section 2)
        s^2 p_t p_u (a.h_t)(a.h_u) [1(y_t = y_u) - pi_u[y_t] - pi_t[y_u] + pi_t.pi_u].
        """
        prob, st = self.prob, self.stats
        B, Tm, off = prob.num_conversations, prob.max_len, prob.offsets
        cd = prob.compute_dtype
        G = torch.zeros(B, Tm, Tm, dtype=cd, device=prob.device)
        pipi = self.backend.pi_gram(prob, st) if prob.mode == "lora" else None
        for b in range(B):
            sl = slice(off[b], off[b + 1])
            n = off[b + 1] - off[b]
            Jb = rows[sl]
            G[b, :n, :n] = Jb @ Jb.T
            if pipi is None:
                continue
            y = prob.targets[sl]
            h = self._h[sl]
            # cross[u, t] = pi_u[y_t] = exp(z_u[y_t] - lse_u)
            z = h @ prob.weight[y].to(cd).T
            if prob.bias is not None:
                z = z + prob.bias[y].to(cd).unsqueeze(0)
            z = z + prob.lora_scale * st.ah[sl].unsqueeze(1) * self._by[sl].unsqueeze(0)
            cross = torch.exp(z - st.lse[sl].unsqueeze(1))
            same = (y.unsqueeze(0) == y.unsqueeze(1)).to(cd)
            m = same - cross - cross.T + pipi[b, :n, :n]
            c = prob.lora_scale * self.p[sl] * st.ah[sl]
            G[b, :n, :n] += c.unsqueeze(1) * m * c.unsqueeze(0)
        return G

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) packed per-token values -> (B, Tmax) zero-padded."""
        prob = self.prob
        out = torch.zeros(prob.num_conversations, prob.max_len, dtype=x.dtype, device=x.device)
        for b in range(prob.num_conversations):
            n = prob.offsets[b + 1] - prob.offsets[b]
            out[b, :n] = x[prob.offsets[b]:prob.offsets[b + 1]]
        return out

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Tmax) -> (N,) packed."""
        prob = self.prob
        return torch.cat([x[b, :prob.offsets[b + 1] - prob.offsets[b]]
                          for b in range(prob.num_conversations)])
