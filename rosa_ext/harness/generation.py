"""Batched generation for the experiment: conversations as :class:`RosaUsers` users, left-padded
``generate`` with the answers' lm_head inputs recorded, and the key/value-cache continuation.

ROSA and PG change only ``lm_head``, so the key/value cache of a conversation stays valid across turns:
:func:`_continue` appends the feedback message (:func:`feedback_tail`) to the rows still in play and
reduces the cache to them, and the next :func:`_generate` continues from it instead of re-encoding the
whole chat. Shapes: B rows (conversations), L tokens so far, d the lm_head input size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..common import defaults
from ..integrations.head_hooks import eos_ids
from ..integrations.model_lookup import find_lm_head
from ..integrations.users import RosaUsers
from .methods import MethodSpec


# --------------------------------------------------------------------------- adapters
def user_key(i: int) -> str:
    """The :class:`RosaUsers` user id of conversation ``i`` (user ids are strings)."""
    return f"conv{int(i)}"


def experiment_users(model: torch.nn.Module, spec: "MethodSpec", *, seed: int = 0) -> RosaUsers:
    """The conversations of one method as users of one :class:`RosaUsers` (fp32 states; a conversation's
    ``a`` drawn like PEFT's lora_A init from ``seed``, ``b`` = 0, ``delta`` = 0)."""
    return RosaUsers(model, spec.mode, beta=spec.beta, damping=spec.damping, damping_mode=spec.damping_mode,
                     lora_scale=defaults.LORA_SCALE, seed=seed)


# --------------------------------------------------------------------------- generation
def chat_tensor(tokenizer, messages: List[Dict[str, str]]) -> torch.Tensor:
    """(T,) ids of a chat with the generation prompt."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    return enc["input_ids"][0]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _decode_kwargs(max_new_tokens: int, do_sample: bool, temperature: float, pad: int) -> Dict[str, Any]:
    kw: Dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad)
    if do_sample:
        kw.update(temperature=temperature, top_p=1.0, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def _cut(row: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """``row`` up to and including its first end-of-sequence token."""
    if eos:
        hit = torch.nonzero(torch.isin(row, torch.tensor(list(eos), dtype=row.dtype))).flatten()
        if hit.numel():
            return row[: int(hit[0]) + 1]
    return row


def generate_batch(model, tokenizer, prompts: Sequence[torch.Tensor], *, max_new_tokens: int, do_sample: bool,
                   temperature: float, seed: int, capture: bool = False, users: Optional[RosaUsers] = None,
                   user_ids: Optional[Sequence[int]] = None):
    """Left-padded batched ``generate``; returns each response's ids (cut after the first EOS, kept).

    With ``capture=True`` it returns ``(responses, hiddens)``: ``hiddens[i]`` (n_i, d) are the base
    lm_head inputs that predicted response i's tokens, recorded during generation (so the update
    needs no second forward of the body). With ``users`` the rows are ``user_ids``' conversations of
    that :class:`RosaUsers`, each generated with its own state and recorded there too.
    """
    ids, att = _left_pad(prompts, _pad_id(tokenizer))
    gen = _Gen(ids, att, None)
    out = _generate(model, tokenizer, gen, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature, seed=seed, capture=capture or users is not None, users=users,
                    user_ids=user_ids)
    return (out.resps, out.hids) if capture else out.resps


def _left_pad(seqs: Sequence[torch.Tensor], pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    L = max(p.numel() for p in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, p in enumerate(seqs):
        ids[i, L - p.numel():] = p
        att[i, L - p.numel():] = 1
    return ids, att


@dataclass
class _Gen:
    """Rows of conversations in flight: ``ids`` (B, L) everything so far (left-padded; holes where an
    answer ended early), ``att`` (B, L) its mask, ``cache`` the key/value cache of ``ids[:, :-1]`` or a
    shorter prefix (None: nothing cached)."""

    ids: torch.Tensor
    att: torch.Tensor
    cache: Any


@dataclass
class _Out:
    seqs: torch.Tensor  # (B, L + n)
    cache: Any
    resps: List[torch.Tensor]  # cut after the first EOS
    hids: Optional[List[torch.Tensor]]


def _generate(model, tokenizer, gen: _Gen, *, max_new_tokens: int, do_sample: bool, temperature: float, seed: int,
              capture: bool = False, users: Optional[RosaUsers] = None, user_ids: Optional[Sequence[int]] = None,
              logits_processor: Optional[list] = None) -> _Out:
    """One ``generate`` over the rows of ``gen`` (continuing from its cache); ``users``: the rows are these
    users' conversations (each row with its own state, recorded in ``users``)."""
    dev = next(model.parameters()).device
    kw = _decode_kwargs(max_new_tokens, do_sample, temperature, _pad_id(tokenizer))
    kw.update(attention_mask=gen.att.to(dev), return_dict_in_generate=True, use_cache=True)
    if gen.cache is not None:
        kw[_cache_kw()] = gen.cache
    if logits_processor:
        from transformers import LogitsProcessorList
        kw["logits_processor"] = LogitsProcessorList(logits_processor)
    if do_sample:
        torch.manual_seed(seed)
    L = gen.ids.shape[1]
    eos = eos_ids(model, {})
    if users is not None:
        out = users.generate(gen.ids.to(dev), [user_key(u) for u in user_ids], **kw)
        seqs = out.sequences.cpu()
        answers = [users.answer(user_key(u)) for u in user_ids]
        resps = [a[1].cpu() for a in answers]
        hids = [a[0].float() for a in answers]
        return _Out(seqs, _cache_of(out), resps, hids)
    steps: List[torch.Tensor] = []
    handle = None
    if capture:
        def grab(module, args):
            steps.append(args[0][:, -1, :].detach().float().clone())
        handle = find_lm_head(model, "experiment").register_forward_pre_hook(grab, prepend=True)
    try:
        with torch.no_grad():
            out = model.generate(gen.ids.to(dev), **kw)
    finally:
        if handle is not None:
            handle.remove()
    seqs = out.sequences.cpu()
    resps = [_cut(row, eos) for row in seqs[:, L:]]
    hids = None
    if capture:
        allh = torch.stack(steps, 1)  # (B, steps, d)
        hids = [allh[i, : r.numel()] for i, r in enumerate(resps)]
    return _Out(seqs, _cache_of(out), resps, hids)


def _cache_of(out) -> Any:
    """The key/value cache a ``generate(..., return_dict_in_generate=True)`` returned (None if none)."""
    if not hasattr(out, "get"):
        return None
    cache = out.get("cache", None)
    return out.get("past_key_values", None) if cache is None else cache


def _cache_kw() -> str:
    """The name ``generate`` takes a cache under: ``cache`` (transformers >= 5.x), else ``past_key_values``."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
        else "past_key_values"


_TAILS: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor, int]] = {}


def feedback_tail(tokenizer, feedback: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The tokens that follow an answer in the chat up to the next answer: ``(after_end, full, end_id)``.

    ``full`` is the chat template's text after an assistant message (its end-of-turn marker, the user's
    ``feedback`` and the generation prompt) as ids; ``after_end`` the same without the end-of-turn token
    ``end_id`` (the tokenizer's EOS), for an answer that already ended with it.
    """
    key = (id(tokenizer), feedback)
    if key not in _TAILS:
        ph = "\u2063XQZ\u2063"
        msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ph},
                {"role": "user", "content": feedback}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        tail = text[text.index(ph) + len(ph):]
        end = tokenizer.eos_token_id
        end_text = tokenizer.decode([end])
        enc = lambda s: torch.tensor(tokenizer(s, add_special_tokens=False)["input_ids"], dtype=torch.long)  # noqa: E731
        full = enc(tail)
        after = enc(tail[len(end_text):]) if tail.startswith(end_text) else full
        _TAILS[key] = (after, full, int(end))
    return _TAILS[key]


def _continue(gen: _Gen, out: _Out, keep: Sequence[int], tokenizer, feedback: str) -> _Gen:
    """The rows ``keep`` of ``gen`` after ``out`` (their answers) and the feedback message, ready for the
    next ``generate``; the cache is reduced to those rows (in place)."""
    after, full, end = feedback_tail(tokenizer, feedback)
    B, L = gen.ids.shape
    n = out.seqs.shape[1] - L
    gmask = torch.zeros((B, n), dtype=gen.att.dtype)
    for j, r in enumerate(out.resps):
        gmask[j, : r.numel()] = 1
    tails = [after if out.resps[j].numel() and int(out.resps[j][-1]) == end else full for j in keep]
    Lt = max(t.numel() for t in tails)
    block = torch.full((len(keep), Lt), _pad_id(tokenizer), dtype=torch.long)
    bmask = torch.zeros((len(keep), Lt), dtype=gen.att.dtype)
    for j, t in enumerate(tails):
        block[j, Lt - t.numel():] = t
        bmask[j, Lt - t.numel():] = 1
    sel = torch.tensor(list(keep), dtype=torch.long)
    cache = out.cache
    if cache is not None and len(keep) != B:
        cache.batch_select_indices(sel.to(_cache_device(cache)))
    ids = torch.cat([out.seqs[sel], block], 1)
    att = torch.cat([torch.cat([gen.att, gmask], 1)[sel], bmask], 1)
    return _Gen(ids, att, cache)


def _cache_device(cache) -> torch.device:
    for lay in getattr(cache, "layers", None) or []:
        k = getattr(lay, "keys", None)
        if isinstance(k, torch.Tensor):
            return k.device
    return torch.device("cpu")
