"""How far one update moved its target tokens, from their lm_head inputs (no body forward)."""
from __future__ import annotations

from typing import Any, Dict

import torch


def target_attainment(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor, state: Dict[str, Any],
                      update: torch.Tensor, reward: float, beta: float) -> Dict[str, Any]:
    """How far one update moved its target tokens, from their lm_head inputs (no body forward).

    ``h`` (n, d) base lm_head inputs of the targeted tokens ``y`` (n,), ``state`` the conversation's
    state *before* ``update`` (the flat (P,) step) is applied, in the session's ``state_dict()``
    format (``mode``, ``lora_scale``, ``a``/``b`` or ``delta``). Per token: log p before and after
    (exact, dense logits), the change the linearised step predicted, d/de log p(theta + e delta) at
    e = 0 = (J delta)_t / p_t (one ``torch.func.jvp``), and ROSA's target change log p*_t - log p_t
    at ``beta`` (for a PG step: the ROSA target of the same reward, as a yardstick).
    Returns means over the tokens (the :class:`~rosa_ext.harness.conversation.TurnRecord` fields
    ``target_tokens``, ``logp_before``, ``logp_after``, ``logp_target``, ``dlogp_achieved``,
    ``dlogp_predicted``, ``dlogp_target``) and ``attainment`` = achieved / target (None if the
    target is 0).
    """
    from torch.func import jvp

    from ..common.jacobian import residual_target

    h = h.float()
    W = W.float()
    d = h.shape[1]

    def logp(theta: torch.Tensor) -> torch.Tensor:
        if state["mode"] == "hidden":
            z = (h + state["delta"].float().to(h.device) + theta) @ W.T
        else:
            a, b = state["a"].float().to(h.device) + theta[:d], state["b"].float().to(h.device) + theta[d:]
            z = h @ W.T + state["lora_scale"] * (h @ a).unsqueeze(-1) * b
        return torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    upd = update.float()
    before, pred = jvp(logp, (torch.zeros_like(upd),), (upd,))
    after = logp(upd)
    lp = before.double()
    g = residual_target(lp, torch.full_like(lp, float(reward)), beta)
    target = torch.log(torch.exp(lp) + g) - lp
    ach, tgt = float((after - before).mean()), float(target.mean())
    return dict(target_tokens=int(y.numel()), logp_before=float(before.mean()), logp_after=float(after.mean()),
                logp_target=float((lp + target).mean()), dlogp_achieved=ach, dlogp_predicted=float(pred.mean()),
                dlogp_target=tgt, attainment=(ach / tgt) if tgt != 0 else None)
