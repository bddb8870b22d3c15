"""Vocabulary-parallel updates (MATH.md section 7): the inputs of one rank, checked across ranks.

:func:`rosa_ext.rosa_update` comes here instead of ``build_problem`` when the head is split by
vocabulary rows over a process group: ``weight`` is a ``DTensor`` sharded on dim 0 (what
``torch.distributed.tensor.parallel.ColwiseParallel`` makes of ``lm_head.weight``), or a plain
tensor of this rank's rows with ``vocab_start`` (and ``process_group``, default: the default
group). :func:`prepare_vocab_parallel` then

1. turns this rank's inputs into a packed :class:`~rosa_ext.common.types.HeadProblem` on the
   local rows (the op's ``build_problem`` does the usual checks; the global targets are checked below);
2. exchanges one small record per rank (one all-gather, about 500 bytes per rank): whether the
   local checks passed (with the error), the rows held, the claimed global V, the targets' range
   and checksums of everything that must be replicated (hidden, targets, reward, LoRA a, the
   token layout, the options);
3. decides on every rank from the same table, so that bad input -- a rank's own error, shards
   that overlap or leave a gap, a ``vocab_size`` the shards do not add up to (a process group of
   another size), targets outside the global vocabulary, inputs that differ across ranks --
   raises the same error on every rank before any other collective, and no rank is left waiting;
4. returns the problem (with its :class:`~rosa_ext.common.types.VocabShard`), the
   :class:`~rosa_ext.backends.distributed.DistributedEngine` around the local engine and, in
   LoRA mode, the sharded CG (:func:`rosa_ext.cg.sharded.cg_sharded`).

Errors that leave no group to talk to (torch.distributed not initialised, a process that is not
a member of ``process_group``, a ``process_group`` other than the DTensor's mesh group) raise at
once, on each rank that sees them.
"""
from __future__ import annotations

import functools
import numbers
import sys
import zlib
from dataclasses import fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..backends import engine_for
from ..backends.distributed import DistributedEngine, VocabComm
from ..cg.sharded import cg_sharded
from ..common import defaults
from ..common import validation as checks
from ..common.config import RosaConfig
from ..common.types import HeadProblem, RewardLike, VocabShard, pack_layout


def _dtensor_api():
    """(DTensor, Shard, Replicate), or None where torch has no DTensor."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor, Replicate, Shard
        except ImportError:
            return None
    return DTensor, Shard, Replicate


def is_dtensor(x: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``. Never imports DTensor (a slow import): a
    DTensor can only exist once its module was imported."""
    if not isinstance(x, torch.Tensor) or type(x) is torch.Tensor:
        return False
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "DTensor") and isinstance(x, mod.DTensor):
            return True
    return False


def wants_vocab_parallel(weight: Any, process_group: Any, vocab_start: Any, vocab_size: Any) -> bool:
    """Whether a :func:`rosa_ext.rosa_update` call is vocabulary-parallel (MATH.md section 7)."""
    return (process_group is not None or vocab_start is not None or vocab_size is not None
            or is_dtensor(weight))


def dtensor_vocab_layout(weight: Any) -> Tuple[Any, int, int]:
    """(process group, mesh dimension, global V) of a DTensor sharded on dim 0 along one mesh
    dimension and replicated along the others (ColwiseParallel's ``lm_head.weight``).

    Raises RosaInputError (a ValueError) for any other placement.
    """
    _, Shard, Replicate = _dtensor_api()
    placements = tuple(weight.placements)
    shard_dims = [i for i, p in enumerate(placements) if type(p) is Shard and p.dim == 0]
    others_ok = all(isinstance(p, Replicate) for i, p in enumerate(placements) if i not in shard_dims)
    if len(shard_dims) != 1 or not others_ok:
        raise checks.RosaInputError(f"rosa_update: `weight` is a DTensor with placements {placements}; a vocabulary-parallel "
                                    "head is sharded on dim 0 along one mesh dimension and replicated along the others "
                                    "(what ColwiseParallel makes of lm_head)", "weight")
    mdim = shard_dims[0]
    return weight.device_mesh.get_group(mdim), mdim, int(weight.shape[0])


def vocab_rows(weight: Any) -> Optional[Tuple[int, int]]:
    """(start, rows) of this rank's part of a DTensor weight sharded on dim 0, else None.

    Assumes the standard contiguous split of ``Shard(0)``: rank i of the mesh dimension holds the
    i-th block (the same rule as the update's layout check, which verifies it across ranks).
    """
    if not is_dtensor(weight):
        return None
    _, mdim, V = dtensor_vocab_layout(weight)
    mesh = weight.device_mesh
    k, i = mesh.size(mdim), mesh.get_local_rank(mdim)
    # torch.chunk's split, which Shard(0) uses: ceil(V / k) rows per rank, the last ones short
    per = -(-V // k)
    return min(V, i * per), int(weight.to_local().shape[0])


# -- the record each rank contributes to the check -------------------------------------------------
_LAYOUT = ("status", "exc", "start", "coord", "start_claim", "rows", "vocab_claim", "lo", "hi")
#: The options (of the RosaConfig, and the problem's batched / compute_dtype) compared one by one (so that
#: a mismatch names its argument); every other scalar field of the problem or the config (one added
#: later) is compared within "options".
_OPTIONS = ("mode", "lora_scale", "beta", "damping", "max_iter", "tol", "solver", "backend", "damping_mode",
            "keep_budget_bytes", "gram_budget_bytes", "batched", "compute_dtype")
_REPLICATED = ("token layout", "hidden", "targets", "reward", "lora_a") + _OPTIONS + (
    "hidden dtype", "bias", "lora_b", "options")
_MSG_WORDS = 48  # 384 bytes of the error message
_ARG_WORDS = 4  # 32 bytes of the error's `argument`
#: The error classes a record can carry (the most derived first): every rank raises the same one.
_EXC = {4: checks.RosaNonFiniteError, 5: checks.RosaNumericalError, 2: checks.RosaTypeError, 1: checks.RosaInputError,
        3: checks.RosaStateError}


def _exc_code(e: BaseException) -> int:
    for code, cls in _EXC.items():
        if isinstance(e, cls):
            return code
    return 2 if isinstance(e, TypeError) else 1 if isinstance(e, ValueError) else 3


def _checksum(x: Optional[torch.Tensor]) -> int:
    """An order-independent integer checksum of x's bits (the same on every device and thread
    count: integer sums wrap exactly, whatever the reduction order)."""
    if x is None:
        return 0
    x = x.detach().contiguous().reshape(-1)
    if x.numel() == 0:
        return 1
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    bits = x.view(ints).long()
    w = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    return int((bits * w).sum()) ^ (x.numel() << 1)


def _crc(obj: Any) -> int:
    return zlib.crc32(repr(obj).encode())


def _encode(msg: str, words: int = _MSG_WORDS) -> List[int]:
    raw = msg.encode("utf-8")[: 8 * words]
    raw = raw + b"\0" * (8 * words - len(raw))
    return torch.frombuffer(bytearray(raw), dtype=torch.int64).tolist()


def _decode(words: List[int]) -> str:
    raw = torch.tensor(words, dtype=torch.int64).numpy().tobytes()
    return raw.rstrip(b"\0").decode("utf-8", errors="ignore")


def _replicated(name: str, x: Any) -> Any:
    """A replicated input: a plain tensor, or a DTensor replicated on every mesh dimension."""
    if not is_dtensor(x):
        return x
    _, _, Replicate = _dtensor_api()
    if not all(isinstance(p, Replicate) for p in x.placements):
        raise checks.RosaInputError(f"rosa_update: `{name}` must be the same on every rank (replicated); got a DTensor "
                                    f"with placements {tuple(x.placements)}", name)
    return x.to_local()


def _local_rows(x: Any) -> Any:
    """A sharded input (bias, lora_b): a plain tensor of this rank's rows, or a DTensor (its local part)."""
    return x.to_local() if is_dtensor(x) else x


class _Local:
    """This rank's inputs after the local checks (or the error they raised)."""

    def __init__(self) -> None:
        self.error: Optional[BaseException] = None
        self.prob: Optional[HeadProblem] = None
        self.cfg: Optional[RosaConfig] = None
        self.targets: Optional[torch.Tensor] = None
        self.backend = None
        self.rows = 0
        self.start = -1  # -1: a DTensor shard, placed by its mesh coordinate
        self.coord = -1
        self.start_claim = -1
        self.vocab_claim = -1


def _resolve_group(weight: Any, process_group: Any) -> Tuple[Any, Optional[int]]:
    """(the group, the DTensor's mesh dimension or None); raises where there is no group to talk to."""
    if not (dist.is_available() and dist.is_initialized()):
        raise checks.RosaStateError("rosa_update: a vocabulary-parallel update (a DTensor `weight`, or `process_group` / "
                                    "`vocab_start` / `vocab_size`) needs torch.distributed initialised "
                                    "(torch.distributed.init_process_group)", "process_group")
    not_member = checks.RosaInputError(f"rosa_update: this process (global rank {dist.get_rank()}) is not a member of "
                            "`process_group`; call the update on the ranks that hold the head's rows, with the "
                                       "group they form", "process_group")
    if process_group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns to a non-member
        raise not_member
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise checks.RosaTypeError(f"rosa_update: `process_group` must be a torch.distributed.ProcessGroup, got "
                                   f"{type(process_group).__name__}", "process_group")
    if process_group is not None and dist.get_rank(process_group) < 0:
        raise not_member
    mdim = None
    group = process_group
    if is_dtensor(weight):
        group_dt, mdim, _ = dtensor_vocab_layout(weight)
        if process_group is not None:
            mine, theirs = dist.get_process_group_ranks(process_group), dist.get_process_group_ranks(group_dt)
            if mine != theirs:
                raise checks.RosaInputError(f"rosa_update: `process_group` has {len(mine)} ranks {mine[:8]} but `weight` is "
                                 f"sharded over {len(theirs)} ranks {theirs[:8]} (its device mesh); pass the mesh's "
                                            "group or no process_group", "process_group")
        group = group_dt if process_group is None else process_group  # the same ranks
    if dist.get_rank(group) < 0:
        raise not_member
    return group, mdim


def _vocab_int(name: str, x: Any, minimum: int, what: str) -> int:
    """vocab_start / vocab_size: an int in [minimum, MAX_INT]; a str, bool, None-like or float is the
    type error (README "Errors"), a value out of range the input error, both naming ``name``."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise checks.RosaTypeError(f"rosa_update: `{name}` must be an int ({what}), got {type(x).__name__} {x!r:.40}",
                                   name)
    if not minimum <= x <= checks.MAX_INT:
        raise checks.RosaInputError(f"rosa_update: `{name}` must be an int in [{minimum}, 2**62] ({what}), got {x!r:.40}",
                                    name)
    return int(x)


def _local_phase(hidden: Any, weight: Any, targets: Any, reward: RewardLike, cfg: RosaConfig, kw: Dict[str, Any], *,
                 build: Any, vocab_start: Any, vocab_size: Any, cg_impl: Any, mdim: Optional[int]) -> _Local:
    """This rank's checks; an error is kept (to be reported to every rank), not raised."""
    out = _Local()
    try:
        # ints (a str or bool is the type error), bounded by MAX_INT = 2**62 so that every entry of the
        # record, start + rows included, fits the int64 all-gather
        if vocab_size is not None:
            out.vocab_claim = _vocab_int("vocab_size", vocab_size, 1, "the whole vocabulary")
        if vocab_start is not None:
            vocab_start = _vocab_int("vocab_start", vocab_start, 0, "the first vocabulary row this rank holds")
        if mdim is not None:  # a DTensor: the rows and their place come from its layout
            local_w = weight.to_local()
            claim = int(weight.shape[0])
            if out.vocab_claim >= 0 and out.vocab_claim != claim:
                raise checks.RosaInputError(f"rosa_update: `vocab_size`={out.vocab_claim} but the DTensor `weight` has "
                                            f"{claim} rows", "vocab_size")
            out.vocab_claim = claim
            out.coord = int(weight.device_mesh.get_local_rank(mdim))
            out.start_claim = -1 if vocab_start is None else int(vocab_start)
        else:
            if vocab_start is None:
                raise checks.RosaInputError("rosa_update: `weight` holds this rank's rows of a vocabulary-parallel head: give "
                                            "`vocab_start`, the global index of its first row (or pass a DTensor weight)",
                                            "vocab_start")
            local_w = weight
            out.start = int(vocab_start)
        if not isinstance(local_w, torch.Tensor):
            raise checks.RosaTypeError(f"rosa_update: `weight` must be a tensor (this rank's rows), got "
                                       f"{type(local_w).__name__}", "weight")
        if local_w.dim() != 2:
            raise checks.RosaInputError(f"rosa_update: `weight` must be (V_local, d) (this rank's rows), got "
                                        f"{tuple(getattr(local_w, 'shape', ())) or type(local_w).__name__}", "weight")
        out.rows = int(local_w.shape[0])
        if out.rows == 0:
            raise checks.RosaInputError("rosa_update: this rank holds no vocabulary rows; every rank of the group must hold "
                                        "at least one (use a group with fewer ranks than rows)", "weight")
        hidden = _replicated("hidden", hidden)
        targets = _replicated("targets", targets)
        reward = _replicated("reward", reward)
        kw = dict(kw, bias=_local_rows(kw.get("bias")), lora_b=_local_rows(kw.get("lora_b")),
                  lora_a=_replicated("lora_a", kw.get("lora_a")), mask=_replicated("mask", kw.get("mask")))
        # build_problem checks everything on the local rows; the targets are global ids, checked
        # against the whole vocabulary once the layout is known (so it gets valid stand-ins here)
        stand_in = torch.zeros_like(targets) if isinstance(targets, torch.Tensor) else targets
        try:
            prob = build(hidden, local_w, stand_in, reward, cfg, **kw)
        except (ValueError, TypeError) as e:
            hint = (f" [vocabulary-parallel: `weight`, `bias` and `lora_b` hold this rank's {out.rows} rows; the other "
                    "inputs are whole and the same on every rank]")
            raise type(e)(str(e) + hint, getattr(e, "argument", None)) from e
        t2 = (targets if prob.batched else targets.unsqueeze(0)).long()
        mask = kw["mask"]
        m2 = None if mask is None else (mask if prob.batched else mask.unsqueeze(0))
        out.targets = (t2.reshape(-1) if m2 is None else t2[m2]).contiguous()
        if cfg.mode == "lora" and cg_impl is not None:
            raise checks.RosaInputError("rosa_update: `cg_impl` is not supported on a vocabulary-parallel head in mode='lora': "
                                        "the parameter vector [a, b] is sharded and CG runs rosa_ext.cg.sharded.cg_sharded",
                                        "cg_impl")
        out.backend = engine_for(cfg.backend, prob.weight.device)
        out.prob, out.cfg = prob, cfg
    except Exception as e:  # reported to every rank by the exchange
        out.error = e
    return out


def _record(loc: _Local) -> List[int]:
    """This rank's record (int64 words, ``RECORD_BYTES`` in all). Never raises: whatever goes wrong
    while it is built becomes this rank's error, so every rank still joins the all-gather."""
    try:
        return _record_of(loc)
    except Exception as e:  # e.g. a value that does not fit int64
        loc.error = e
        return _record_of(loc)


def _record_of(loc: _Local) -> List[int]:
    ok = loc.error is None
    lo = hi = 0
    fp = [0] * len(_REPLICATED)
    if ok:
        prob, cfg, y = loc.prob, loc.cfg, loc.targets
        lo, hi = int(y.min()), int(y.max())
        # every option of the config (a new one is covered without a change here), the dtypes, and which
        # optional tensors are present (the problem's layout is in "token layout"; its V is this rank's)
        opts = tuple((f.name, getattr(cfg, f.name)) for f in fields(cfg) if f.name not in _OPTIONS)
        fp = [_crc((prob.offsets, prob.hidden_size)), _checksum(prob.hidden), _checksum(y), _checksum(prob.reward),
              _checksum(prob.lora_a)] + [_crc(getattr(cfg, name, getattr(prob, name, None))) for name in _OPTIONS] + [
              _crc(str(prob.hidden.dtype)), _crc(prob.bias is None), _crc(prob.lora_b is None), _crc(opts)]
    layout = [int(ok), 0 if ok else _exc_code(loc.error), loc.start, loc.coord, loc.start_claim, loc.rows,
              loc.vocab_claim, lo, hi]
    if not ok:
        layout[2:] = [-1, -1, -1, 0, -1, 0, 0]  # a failed rank's layout is not read (and may not fit int64)
    arg = "" if ok else str(getattr(loc.error, "argument", None) or "")
    words = layout + [v & 0x7FFFFFFFFFFFFFFF for v in fp] + _encode(arg, _ARG_WORDS) + _encode("" if ok else str(loc.error))
    if any(not -2 ** 63 <= w < 2 ** 63 for w in words):
        raise OverflowError("a record entry does not fit int64")
    return words


def _span(s: int, n: int) -> str:
    return f"[{s}, {s + n})"


#: The argument a replicated input's mismatch is reported as.
_REPLICATED_ARG = dict({name: name for name in _REPLICATED}, **{"token layout": "hidden", "batched": "hidden",
                                                                 "compute_dtype": "hidden", "hidden dtype": "hidden",
                                                                 "options": None})
Verdict = Tuple[type, str, Optional[str]]


def _verdict(table: List[List[int]]) -> Tuple[Optional[Verdict], List[int], int]:
    """From every rank's record: (None or (exception class, message, argument), every rank's start, V).

    Runs on every rank on the same table, so every rank reaches the same decision.
    """
    L = {name: i for i, name in enumerate(_LAYOUT)}
    R = {name: len(_LAYOUT) + i for i, name in enumerate(_REPLICATED)}
    A = len(_LAYOUT) + len(_REPLICATED)
    M = A + _ARG_WORDS
    world = len(table)
    pre = "rosa_update (vocabulary-parallel): "
    failed = [k for k in range(world) if table[k][L["status"]] == 0]
    if failed:
        k = failed[0]
        return (_EXC.get(table[k][L["exc"]], checks.RosaInputError), f"{pre}rank {k} of the group rejected its input: "
                f"{_decode(table[k][M:])}", _decode(table[k][A:M]) or None), [], 0
    rows = [r[L["rows"]] for r in table]
    # DTensor shards (start -1): the blocks follow the mesh coordinate along the sharded dimension
    derived = [r[L["start"]] < 0 for r in table]
    if any(derived) and not all(derived):
        return (checks.RosaInputError, f"{pre}some ranks pass a DTensor `weight` and others a plain one", "weight"), [], 0
    if all(derived):
        coord = [r[L["coord"]] for r in table]
        starts = [sum(rows[j] for j in range(world) if coord[j] < coord[k]) for k in range(world)]
    else:
        starts = [r[L["start"]] for r in table]
    wrong = [k for k in range(world) if table[k][L["start_claim"]] >= 0 and table[k][L["start_claim"]] != starts[k]]
    if wrong:
        k = wrong[0]
        return (checks.RosaInputError, f"{pre}rank {k} passes vocab_start={table[k][L['start_claim']]} but its rows of the "
                f"DTensor `weight` start at {starts[k]}", "vocab_start"), [], 0
    order = sorted(range(world), key=lambda k: (starts[k], rows[k]))
    held = ", ".join(f"rank {k} holds {_span(starts[k], rows[k])}" for k in order[:8]) + (", ..." if world > 8 else "")
    end = 0
    for k in order:
        if starts[k] != end:
            what = (f"rows {_span(end, starts[k] - end)} are held by no rank" if starts[k] > end else
                    f"rows {_span(starts[k], min(end, starts[k] + rows[k]) - starts[k])} are held twice")
            return (checks.RosaInputError, f"{pre}the ranks' rows do not tile the vocabulary: {what} ({held}); every rank "
                    "passes its own vocab_start and weight rows, and together they cover [0, V) once", "vocab_start"), [], 0
        end = starts[k] + rows[k]
    V = end
    claims = sorted({r[L["vocab_claim"]] for r in table if r[L["vocab_claim"]] >= 0})
    if claims and claims != [V]:
        # plain shards: the claim is the caller's vocab_size; a DTensor's is its global shape, so
        # there the group is the one at fault
        return (checks.RosaInputError, f"{pre}the {world} ranks of the process group hold rows [0, {V}) but the vocabulary has "
                f"{claims[-1] if len(claims) == 1 else claims} rows: the process group must be the one the head "
                f"is split over (this one has {world} ranks; {held})",
                "process_group" if all(derived) else "vocab_size"), [], 0
    for name in _REPLICATED:
        vals = [r[R[name]] for r in table]
        odd = [k for k in range(world) if vals[k] != vals[0]]
        if odd:
            return (checks.RosaInputError, f"{pre}{name!s} must be the same on every rank (replicated), but rank(s) {odd[:8]} "
                    "differ from rank 0", _REPLICATED_ARG[name]), [], 0
    lo = min(r[L["lo"]] for r in table)
    hi = max(r[L["hi"]] for r in table)
    if lo < 0 or hi >= V:
        hint = "" if lo < 0 or claims else (f" (the {world} ranks' rows cover [0, {V}); if the vocabulary is larger, "
                                             "process_group is not the group the head is split over: pass vocab_size "
                                             "to have that checked)")
        return (checks.RosaInputError, f"{pre}`targets` holds token id {hi if hi >= V else lo}, outside the vocabulary "
                f"[0, {V}) of the whole head{hint}", "targets"), [], 0
    return None, starts, V


#: Bytes each rank contributes to the validation all-gather (one int64 record).
RECORD_BYTES = 8 * (len(_LAYOUT) + len(_REPLICATED) + _ARG_WORDS + _MSG_WORDS)


def traffic_bytes(mode: str, solver: str, lengths: Sequence[int], d: int, *, elem_bytes: int, iterations: int = 0,
                  lora_term: bool = False, damping_mode: str = defaults.DAMPING_MODE) -> int:
    """Bytes one rank contributes to the collectives of one vocabulary-parallel update (MATH.md
    section 7), as :data:`rosa_ext.backends.distributed.traffic` counts them.

    Args:
        mode, solver: "lora"/"hidden" and the solver that ran ("dual"/"cg").
        lengths: tokens of each conversation (N = their sum, B conversations, Tmax the longest).
        d: hidden size; elem_bytes: 4 (fp32/bf16/fp16 models) or 8 (fp64).
        iterations: CG iterations that ran (the matvecs of the compiled CG; the update's
            ``step.iterations``). Assumes a non-zero reward (r = 0 stops CG before its first
            inner product).
        lora_term: hidden mode with a LoRA term in the logits (``lora_a`` / ``lora_b`` given).
        damping_mode: "relative" adds, for LoRA CG, the Gram diagonal (MATH.md section 6): ``N e``
            (q_t . q_t); the dual and hidden-mode CG read it off J or its Gram matrix.
    With N tokens, e = elem_bytes, L = 1 with a LoRA term (always in lora mode), else 0:
    validation ``RECORD_BYTES``; then

    - the dual (both modes) and hidden-mode CG, which run one pass: MAX of the local off-target
      log-sum-exp ``N e``, one SUM of the per-token results ``(2 + L) N e`` and b[y_t] ``L N e``; hidden mode adds
      ``2 N d e`` (pi W with the per-token SUM, and W[y_t]), lora ``2 sum_b T_b^2 e`` (the Gram and
      the cross terms);
    - LoRA CG: stats ``(3 + L) N e``, b[y_t] ``N e``, then ``16 + it (N e + 24)``.
    """
    N, e = sum(lengths), int(elem_bytes)
    L = 1 if (mode == "lora" or lora_term) else 0
    if solver == "dual" or mode == "hidden":
        total = RECORD_BYTES + (3 + 2 * L) * N * e
        return total + (2 * N * d * e if mode == "hidden" else 2 * sum(t * t for t in lengths) * e)
    total = RECORD_BYTES + (3 + 2 * L) * N * e + 16 + iterations * (N * e + 24)
    if damping_mode == "relative":
        total += N * e
    return total


def prepare_vocab_parallel(hidden: Any, weight: Any, targets: Any, reward: RewardLike, cfg: RosaConfig,
                           kw: Dict[str, Any], *, build: Any, process_group: Any = None, vocab_start: Any = None,
                           vocab_size: Any = None, cg_impl: Any = None) -> Tuple[HeadProblem, DistributedEngine, Any]:
    """Check a vocabulary-parallel call on every rank and pack it (module docstring).

    Args:
        hidden, weight, targets, reward: as :func:`rosa_ext.rosa_update`; ``weight`` a DTensor
            sharded on dim 0, or this rank's (V_local, d) rows.
        cfg: the options (:class:`~rosa_ext.common.config.RosaConfig`).
        kw: the tensors of ``build`` besides the four above (lora_a, lora_b, bias, mask); ``bias`` and
            ``lora_b`` hold this rank's rows (plain or DTensor).
        build: the op's ``build_problem`` (the same checks as a one-process call).
        process_group, vocab_start, vocab_size: the group (default: the DTensor's mesh group, else
            the default group), this rank's first row, the global V (checked when given).
        cg_impl: the caller's CG (hidden mode only: its vectors are replicated).
    Returns:
        (problem with ``shard`` set, the engine, the CG implementation for the CG plans (None: default)).
    Raises:
        The same error class and message on every rank for bad input (module docstring).
    """
    group, mdim = _resolve_group(weight, process_group)
    comm = VocabComm(group)
    loc = _local_phase(hidden, weight, targets, reward, cfg, kw, build=build, vocab_start=vocab_start,
                       vocab_size=vocab_size, cg_impl=cg_impl, mdim=mdim)
    dev = loc.prob.weight.device if loc.prob is not None else (weight.device if isinstance(weight, torch.Tensor)
                                                        else torch.device("cpu"))
    if dist.get_backend(group) == "gloo":
        dev = torch.device("cpu")
    rec = torch.tensor(_record(loc), dtype=torch.int64, device=dev)
    table = comm.all_gather(rec, "validate").cpu().tolist()
    bad, starts, V = _verdict(table)
    if bad is not None:  # the same class, message and argument on every rank (a failed rank chains its own error)
        raise bad[0](bad[1], bad[2]) from loc.error
    shard = VocabShard(start=starts[comm.rank], rows=loc.rows, vocab_size=V, rank=comm.rank,
                       world_size=comm.world_size, comm=comm)
    prob = replace(loc.prob, targets=loc.targets, **pack_layout(loc.prob.weight, loc.prob.offsets, shard))
    engine = DistributedEngine(loc.backend, shard)
    if cfg.mode == "lora":
        B, d = prob.num_conversations, prob.hidden_size
        P = d + prob.vocab_size
        weights = torch.ones(B, P, dtype=torch.float64, device=prob.weight.device)
        if comm.rank != 0:  # a (replicated) is counted once, on rank 0; each rank counts its rows of b
            weights[:, :d] = 0
        cg_impl = functools.partial(cg_sharded, all_sum=lambda t: comm.all_sum(t, "cg: inner products"),
                                    weights=weights.reshape(-1))
    return prob, engine, cg_impl
