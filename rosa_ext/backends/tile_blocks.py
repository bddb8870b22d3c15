"""Token blocks of the Triton engine's probability tiles (MATH.md section 4, "Token blocks").

The one-pass tiles of N tokens are N x V numbers. When they do not fit the tile budget the Triton engine
does not hand the problem to the torch engine (as it once did: fp32 torch tiles on the CUDA cores); it
processes the tokens in blocks whose tiles fit, each block one launch of the probability-tile kernel
(whose combine writes the block's per-token results straight into the pass's :class:`TokenTable`) and the
Triton kernels over its tiles, writing into preallocated outputs: a block costs three launches in hidden
mode (tiles, combine, r̂ W). Every block of a problem uses the vocabulary split plan of its first launch
(:class:`TileLauncher`: ``splits=``), so that tiles of two blocks can be multiplied together (the LoRA
Gram) and the K-split is the same for all tokens.

- **The budget** (:class:`Budget`, :func:`tile_budget`): the configured ``keep_budget_bytes``, on CUDA at
  most :data:`FREE_MEMORY_FRACTION` of the memory free to this process (``torch.cuda.mem_get_info`` plus
  the caching allocator's reserved-but-unused bytes); off CUDA the configured value. A scratch share
  (:data:`rosa_ext.kernels.tile_gemms.SCRATCH_BYTES`, at most a quarter of the budget: the K-split scratch
  of the torch GEMMs over tiles, which the engine now uses only for CG's K-split GEMVs; the fused kernels
  need little -- the Gram's partial sums, ks x 4 sum_b T_b^2 bytes) counts against it: the tiles of a block
  get the rest.
- **Hidden mode** (:func:`hidden_pass`): the tiles are needed only until ``r̂ W`` (N x d) is formed
  (:func:`rosa_ext.kernels.tile_weight.tile_weight`, one launch per block), so a block holds at most
  :data:`HIDDEN_TILE_BYTES` of tiles -- more where that would take over :data:`HIDDEN_MAX_BLOCKS` blocks,
  within the budget (:func:`hidden_rows`): memory ``min(N, n_b) V e + N d 4`` bytes (e = 4 bytes per entry:
  fp32 or the bf16 hi + lo parts), the tiles of one block alive at a time.
- **LoRA Gram** (:func:`gram_pass`): consecutive whole conversations share a block when they fit; a longer
  conversation is cut into sub-blocks of at most half the block rows, and its Gram is assembled blockwise,
  ``G[i, i]`` from one block's tiles and ``G[i, j]`` from the tiles of two sub-blocks held at once, the
  earlier one recomputed: n_s (n_s + 1) / 2 launches of the tiles for n_s sub-blocks (the logits work of
  about (n_s + 1) / 2 passes; the Gram products are those of the whole conversation), each block's Gram
  two launches (:func:`rosa_ext.kernels.tile_gram.tile_gram`: K-split, scales applied, centred with the
  cross terms gathered, or raw for a vocabulary-parallel rank). The VJP then recomputes the tiles block by
  block (:class:`RecomputedTiles`): one more pass, as the torch engine's streaming VJP, one launch of
  :func:`rosa_ext.kernels.tile_vjp.tile_vjp` per block.
- **CG** (:func:`cg_stats`): the split stats block by block; CG's reductions recompute each block's tiles
  (fp32, normalised) per reduction, two passes per iteration like the streaming reductions, on the
  tensor cores. Within the budget CG keeps fp32 tiles normalised once (:class:`KeptProbTiles`), so every
  reduction is one fp32 GEMV per conversation (:func:`rosa_ext.kernels.tile_gemms.gemv_rows`).

A problem whose budget does not hold even one token's tiles (two for a Gram that must be blocked) still
runs on the torch engine, with a one-time warning (:func:`rosa_ext.kernels.tile_gemms.fallback_warning`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from ..common.defaults import one_padded_batch
from ..common.types import GramPass, HeadProblem, HeadStats, HiddenPass
from ..common.validation import RosaInputError
from ..kernels import tile_gemms as TG
from ..kernels.epilogue import COMBINE_ROWS
from ..kernels.prob_tiles import ProbTiles, prob_tiles_from_tensors, tile_buffers
from ..kernels.tile_gram import tile_gram
from ..kernels.tile_vjp import tile_vjp
from ..kernels.tile_weight import tile_weight
from .torch_engine import conversation_groups, spans

#: On CUDA the tile budget is at most this fraction of the memory free to the process.
FREE_MEMORY_FRACTION = 0.5
#: The K-split scratch takes at most 1 / SCRATCH_SHARE of the budget (and at most ``SCRATCH_BYTES``).
SCRATCH_SHARE = 4
#: Hidden mode keeps at most this many bytes of tiles at once (one block): it needs only r̂ W from them --
#: unless that takes more than :data:`HIDDEN_MAX_BLOCKS` blocks (:func:`hidden_rows`).
HIDDEN_TILE_BYTES = 256 << 20
#: Hidden mode's blocks grow past :data:`HIDDEN_TILE_BYTES` (within the budget) to keep to this many: each
#: block beyond the first costs three launches (tiles, combine, r̂ W), so that the whole update stays under 60.
HIDDEN_MAX_BLOCKS = 3
#: Block rows are rounded to a multiple of this where that keeps them within the cap (whole token tiles).
ROW_ALIGN = 64

_ENTRY_BYTES = {"fp32": 4, "bf16x2": 4, "bf16": 2}


def free_device_bytes(device: torch.device) -> Optional[int]:
    """Bytes of ``device`` memory this process can still allocate -> int, None off CUDA: the driver's free
    memory plus what torch's caching allocator holds reserved but unused."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    free, _ = torch.cuda.mem_get_info(idx)
    cached = torch.cuda.memory_reserved(idx) - torch.cuda.memory_allocated(idx)
    return int(free) + max(0, int(cached))


def tile_budget(configured: int, device: torch.device) -> int:
    """The bytes the probability tiles and their GEMMs' scratch may take on ``device``: ``configured``
    (``keep_budget_bytes``), on CUDA at most :data:`FREE_MEMORY_FRACTION` of :func:`free_device_bytes`."""
    free = free_device_bytes(device)
    return int(configured) if free is None else min(int(configured), int(FREE_MEMORY_FRACTION * free))


@dataclass(frozen=True)
class Budget:
    """A pass's memory: ``total`` (:func:`tile_budget`) = ``tiles`` (one block's) + ``scratch`` (the K-split's
    per-split products, ``min(SCRATCH_BYTES, total / SCRATCH_SHARE)``)."""

    total: int
    tiles: int
    scratch: int

    @classmethod
    def of(cls, configured: int, device: torch.device) -> "Budget":
        total = max(0, tile_budget(configured, device))
        scratch = min(TG.SCRATCH_BYTES, total // SCRATCH_SHARE)
        return cls(total, total - scratch, scratch)

    def rows(self, V: int, precision: str, cap_bytes: Optional[int] = None) -> int:
        """Tokens whose tiles (V entries of ``precision`` each) fit the tile share (and ``cap_bytes``)."""
        room = self.tiles if cap_bytes is None else min(self.tiles, cap_bytes)
        return room // (V * _ENTRY_BYTES[precision])


def hidden_rows(N: int, V: int, precision: str, budget: "Budget", rows: int) -> int:
    """Tokens per block of hidden mode's pass (>= 1): at most :data:`HIDDEN_TILE_BYTES` of tiles, or
    N / :data:`HIDDEN_MAX_BLOCKS` tokens' where that is more, never more than ``rows`` (what the budget holds).
    E.g. the Qwen2.5-0.5B head (V = 151936, 4 bytes per entry): T = 1024 in 3 blocks of <= 256 MiB; T = 3000
    in 3 blocks of 1000 tokens (580 MiB; the default 1 GiB budget less the scratch holds 1325: T = 4096 takes 4)."""
    cap = budget.rows(V, precision, HIDDEN_TILE_BYTES)
    return max(1, min(rows, max(cap, -(-N // HIDDEN_MAX_BLOCKS))))


def balanced_blocks(r0: int, r1: int, max_rows: int) -> List[Tuple[int, int]]:
    """Rows [r0, r1) in the fewest blocks of at most ``max_rows`` (>= 1), of equal size up to rounding (a
    multiple of :data:`ROW_ALIGN` where that stays within ``max_rows``)."""
    if int(max_rows) < 1:
        raise RosaInputError(f"rosa_ext.backends.tile_blocks.balanced_blocks: max_rows must be >= 1, got {max_rows}",
                             "max_rows")
    n = r1 - r0
    if n <= max_rows:
        return [(r0, r1)]
    nb = -(-n // max_rows)
    size = -(-n // nb)
    aligned = -(-size // ROW_ALIGN) * ROW_ALIGN
    size = aligned if aligned <= max_rows else size
    return [(a, min(r1, a + size)) for a in range(r0, r1, size)]


class BlockBuffer:
    """The tile storage of one block (``rows`` x V), reused by every block of a pass."""

    def __init__(self, rows: int, V: int, precision: str, device: torch.device) -> None:
        self.p, self.lo = tile_buffers(rows, V, precision, device)

    def out(self, n: int, at: int = 0):
        """``out=`` of rows [at, at + n) of the buffer."""
        return self.p[at:at + n], None if self.lo is None else self.lo[at:at + n]


class TileLauncher:
    """The one-pass probability-tile kernel on rows of a float32-compute problem, every launch with the
    vocabulary split plan of the first (``splits``): ``launcher(r0, r1, out)`` -> :class:`ProbTiles` of
    tokens [r0, r1). ``ah`` (N,) = a_seg . h_t with a LoRA term (the engine's, cached per problem:
    :meth:`~rosa_ext.kernels.primitives.TritonPrimitives.hidden_and_ah`), else None."""

    def __init__(self, prob: HeadProblem, seg32: torch.Tensor, precision: str, ah: Optional[torch.Tensor]) -> None:
        if (prob.lora_a is None) != (ah is None):
            raise RosaInputError("rosa_ext.backends.tile_blocks.TileLauncher: ah goes with a LoRA term (lora_a)", "ah")
        self.prob, self.seg32, self.precision, self.ah = prob, seg32, precision, ah
        self.splits: Optional[int] = None

    def __call__(self, r0: int, r1: int, out=None, table: Optional["TokenTable"] = None) -> ProbTiles:
        """The tiles of tokens [r0, r1) (into ``out``, rows of a block buffer), their per-token results written
        into ``table``'s columns [r0, r1) when given."""
        p, ah = self.prob, self.ah
        whole = r0 == 0 and r1 == p.num_tokens

        def rows(x):
            return x if whole or x is None else x[r0:r1]

        tiles = prob_tiles_from_tensors(rows(p.hidden), p.weight, rows(self.seg32), None, rows(p.targets),
                                        bias=p.bias, lora_b=p.lora_b if ah is not None else None, ah=rows(ah),
                                        lora_scale=p.lora_scale if ah is not None else 0.0,
                                        precision=self.precision, out=out, splits=self.splits,
                                        stats_out=None if table is None else table.vals[:, r0:r1])
        if self.splits is None:
            self.splits = int(tiles.split_scale.shape[0])
        return tiles


class TokenTable:
    """The (9, N) fp32 per-token results of a blocked pass (rows :data:`rosa_ext.kernels.epilogue.COMBINE_ROWS`),
    written by each block's combine straight into its columns (``launch(r0, r1, out, table)``): nothing copied."""

    def __init__(self, N: int, device: torch.device) -> None:
        self.vals = torch.empty(len(COMBINE_ROWS), N, dtype=torch.float32, device=device)
        self._rows = dict(zip(COMBINE_ROWS, self.vals.unbind(0)))  # one view per row: ``is`` holds

    def __getattr__(self, name: str) -> torch.Tensor:
        rows = self.__dict__.get("_rows", {})
        if name in rows:
            return rows[name]
        raise AttributeError(name)


# ----------------------------------------------------------------------------------------- hidden mode
def hidden_pass(launch: TileLauncher, blocks: Sequence[Tuple[int, int]], engine: str) -> HiddenPass:
    """lse, lse_off, log p, log(1 - p), r̂ . b and r̂ W of the tokens in ``blocks`` (consecutive, covering
    [0, N)): one launch per block into one reused block buffer, then r̂ W of the block in ONE more launch
    (:func:`rosa_ext.kernels.tile_weight.tile_weight`, K-split at the vocabulary splits; written straight into
    its rows of the (N, d) result, no scratch); one block: the launch's own outputs, nothing copied."""
    prob, ah = launch.prob, launch.ah
    if len(blocks) == 1:
        t = launch(0, prob.num_tokens)
        rw = tile_weight(t, prob.weight)
        return HiddenPass(lse=t.lse, lse_off=t.lse_off, logp=t.logp, logq=t.logq, ah=ah, rb=t.rb, rw=rw, engine=engine)
    dev = prob.weight.device
    tab = TokenTable(prob.num_tokens, dev)
    rw = torch.empty(prob.num_tokens, prob.hidden_size, dtype=torch.float32, device=dev)
    buf = BlockBuffer(max(b - a for a, b in blocks), prob.vocab_size, launch.precision, dev)
    for r0, r1 in blocks:
        tile_weight(launch(r0, r1, buf.out(r1 - r0), tab), prob.weight, rw[r0:r1])
    return HiddenPass(lse=tab.lse, lse_off=tab.lse_off, logp=tab.logp, logq=tab.logq, ah=ah,
                      rb=tab.rb if ah is not None else None, rw=rw, engine=engine)


# ----------------------------------------------------------------------------------------- LoRA: the Gram
def gram_pass(launch: TileLauncher, rows: int, engine: str, offsets: torch.Tensor,
              center: bool = False) -> GramPass:
    """The Gram parts per conversation -- centred (``center``: ``GramPass.centered``) or raw (``r̂_t . r̂_u``,
    ``r̂_t[y_u]``) -- and the per-token results, the tokens in blocks of at most ``rows`` (module doc): whole
    conversations grouped, a longer one in sub-blocks of at most rows / 2 with its Gram assembled blockwise.
    Each group's Gram is two launches (:func:`rosa_ext.kernels.tile_gram.tile_gram`). One launch of the tiles
    when everything fits: the tiles are then kept (:class:`KeptProbTiles`); otherwise the VJP recomputes them
    (:class:`RecomputedTiles`). ``offsets``: (B + 1,) int32 device offsets of the conversations."""
    prob, ah = launch.prob, launch.ah
    N, off, y = prob.num_tokens, prob.offsets, prob.targets
    if N <= rows:
        t = launch(0, N)
        B, Tm = prob.num_conversations, max(prob.lengths)
        batch = None
        if center and one_padded_batch(prob.lengths):  # the centred Grams straight into the plan's padded batch
            batch = (torch.empty if all(n == Tm for n in prob.lengths) else torch.zeros)(
                B, Tm, Tm, dtype=torch.float32, device=prob.weight.device)
        gram, cross = tile_gram(t, y, prob.lengths, offsets=offsets if B > 1 else None, center=center, out=batch)
        return GramPass(lse=t.lse, lse_off=t.lse_off, logp=t.logp, logq=t.logq, ah=ah, rb=t.rb, gram=gram,
                        cross=cross or [], kept=KeptProbTiles(t, t.lse_off), engine=engine, centered=center,
                        padded=batch)
    dev = prob.weight.device
    tab = TokenTable(N, dev)
    buf = BlockBuffer(rows, prob.vocab_size, launch.precision, dev)
    grams: List[torch.Tensor] = []
    cross: List[torch.Tensor] = []
    for b0, b1 in conversation_groups(prob.lengths, rows):
        r0, r1 = off[b0], off[b1]
        if r1 - r0 > rows:  # one long conversation
            G, X = _long_gram(launch, r0, r1, rows // 2, buf, tab, center)
            grams.append(G)
            cross += [X] if X is not None else []
            continue
        t = launch(r0, r1, buf.out(r1 - r0), tab)
        g, x = tile_gram(t, y[r0:r1], prob.lengths[b0:b1], offsets=offsets[b0:b1 + 1] if b1 - b0 > 1 else None,
                         row0=r0, center=center)
        grams += g
        cross += x or []
    kept = RecomputedTiles(launch, balanced_blocks(0, N, rows), normalize=False)
    return GramPass(lse=tab.lse, lse_off=tab.lse_off, logp=tab.logp, logq=tab.logq, ah=ah,
                    rb=tab.rb if ah is not None else None, gram=grams, cross=cross, kept=kept, engine=engine,
                    centered=center)


def _long_gram(launch: TileLauncher, lo: int, hi: int, half: int, buf: BlockBuffer, tab: TokenTable,
               center: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(Gram, cross terms) of the conversation of rows [lo, hi), in sub-blocks of at most ``half`` rows (two held
    at once in ``buf``): the centred Gram and None (``center``), or ``r̂_t . r̂_u`` and ``r̂_t[y_u]``. G[i, i]
    (and the cross rows) from sub-block i's tiles, then G[i, j] = G[j, i]^T for each earlier sub-block j, its
    tiles recomputed; every block two launches (:func:`rosa_ext.kernels.tile_gram.tile_gram`)."""
    T = hi - lo
    dev = buf.p.device
    G = torch.empty(T, T, dtype=torch.float32, device=dev)
    X = None if center else torch.empty(T, T, dtype=torch.float32, device=dev)
    y = launch.prob.targets[lo:hi]
    sub = balanced_blocks(lo, hi, half)
    for i, (a0, a1) in enumerate(sub):
        ti = launch(a0, a1, buf.out(a1 - a0), tab)
        ia = slice(a0 - lo, a1 - lo)
        G[ia, ia] = tile_gram(ti, y[ia], [a1 - a0], center=center)[0][0]
        if X is not None:
            X[ia] = TG.cross_rows(ti, y)
        for c0, c1 in sub[:i]:
            tj = launch(c0, c1, buf.out(c1 - c0, half))
            jc = slice(c0 - lo, c1 - lo)
            Gij = tile_gram(ti, y[ia], [a1 - a0], tb=tj, yb=y[jc], center=center)[0][0]
            G[ia, jc] = Gij
            G[jc, ia] = Gij.T
    return G, X


# ----------------------------------------------------------------------------------------- matrix-free CG
def cg_stats(launch: TileLauncher, rows: int, engine: str) -> HeadStats:
    """The split stats of matrix-free CG (lse, lse_off, log p, log(1 - p), a . h, r̂ . b) with the tiles CG's
    reductions read: one launch when the N x V tiles fit ``rows``, the tiles kept and normalised in place once
    (fp32 with ``launch.precision`` "fp32": each reduction is then one fp32 GEMV per conversation); otherwise
    block by block, r̂ . r̂ kept per token and the tiles recomputed per reduction (:class:`RecomputedTiles`)."""
    prob, ah = launch.prob, launch.ah
    N = prob.num_tokens
    if N <= rows:
        t = launch(0, N).normalize_()
        return HeadStats(lse=t.lse, logp=t.logp, ah=ah, pib=None, lse_off=t.lse_off, logq=t.logq, rb=t.rb,
                         kept=KeptProbTiles(t, t.lse_off), engine=engine, split=True)
    dev = prob.weight.device
    tab = TokenTable(N, dev)
    blocks = balanced_blocks(0, N, rows)
    buf = BlockBuffer(max(b - a for a, b in blocks), prob.vocab_size, launch.precision, dev)
    for r0, r1 in blocks:
        launch(r0, r1, buf.out(r1 - r0), tab)
    del buf
    kept = RecomputedTiles(launch, blocks, normalize=True, norm=tab.lse_off, ss=tab.ss)
    return HeadStats(lse=tab.lse, logp=tab.logp, ah=ah, pib=None, lse_off=tab.lse_off, logq=tab.logq,
                     rb=tab.rb if ah is not None else None, kept=kept, engine=engine, split=True)


# ----------------------------------------------------------------------------------------- the tiles CG and the VJP read
@dataclass
class KeptProbTiles:
    """The probability tiles a pass kept whole, with the log-sum-exp ``norm`` they are normalised by (the one
    pass's off-target tiles: this process's lse_off, so they are r̂): r̂_t = tiles_t exp(norm_t - lse_off_t)
    for any off-target log-sum-exp lse_off (this process's -- the factor is 1 -- or a vocabulary-parallel
    combine's)."""

    tiles: ProbTiles
    norm: torch.Tensor

    @property
    def ss(self) -> torch.Tensor:
        return self.tiles.ss

    def blocks(self) -> Iterator[Tuple[int, int, ProbTiles, torch.Tensor]]:
        """(r0, r1, tiles of rows [r0, r1), their norm): the kept tiles, once."""
        yield 0, int(self.tiles.shape[0]), self.tiles, self.norm


@dataclass
class RecomputedTiles:
    """Tiles over the budget: recomputed block by block when read (one launch per block, the launcher's split
    plan), normalised in place first with ``normalize`` (fp32 tiles: CG's GEMVs). ``norm`` and ``ss`` (N,):
    the pass's lse_off and r̂ . r̂ (None where the pass did not keep them)."""

    launch: TileLauncher
    row_blocks: List[Tuple[int, int]]
    normalize: bool
    norm: Optional[torch.Tensor] = None
    ss: Optional[torch.Tensor] = None

    def blocks(self) -> Iterator[Tuple[int, int, ProbTiles, torch.Tensor]]:
        """(r0, r1, tiles of rows [r0, r1), their own lse_off) for each block in turn (one buffer)."""
        p = self.launch.prob
        buf = BlockBuffer(max(b - a for a, b in self.row_blocks), p.vocab_size, self.launch.precision, p.weight.device)
        for r0, r1 in self.row_blocks:
            t = self.launch(r0, r1, buf.out(r1 - r0))
            if self.normalize:
                t.normalize_()
            yield r0, r1, t, t.lse_off


def _plain(t: ProbTiles) -> bool:
    return t.p is not None and t.split_scale is None


def row_dots(kept, prob: HeadProblem, u: torch.Tensor, lse_off: torch.Tensor) -> torch.Tensor:
    """r̂_t . u[seg_t] -> (N,) fp32 over kept or recomputed tiles (``u`` (B, V)), r̂ normalised by ``lse_off``:
    one fp32 GEMV per conversation over normalised fp32 tiles, else the K-split GEMM."""
    N = prob.num_tokens
    out = None
    U = u.float()
    for r0, r1, t, norm in kept.blocks():
        if _plain(t):
            out = torch.empty(N, dtype=torch.float32, device=u.device) if out is None else out
            o = TG.gemv_rows(t, U, spans(prob.offsets, r0, r1), out[r0:r1])
        else:
            o = TG.off_target_dot(t, U, None if U.shape[0] == 1 else prob.seg[r0:r1])
            if r1 - r0 == N:
                out = o
            else:
                out = torch.empty(N, dtype=torch.float32, device=u.device) if out is None else out
                out[r0:r1] = o
                o = out[r0:r1]
        if norm is not lse_off:
            o.mul_(torch.exp(norm - lse_off[r0:r1]))
    return out


def column_sums(kept, prob: HeadProblem, w: torch.Tensor, lse_off: torch.Tensor,
                out: Optional[torch.Tensor] = None, *, offsets: Optional[torch.Tensor] = None,
                centered: bool = False) -> torch.Tensor:
    """sum_{t in b} w_t r̂_t -> (B, V) fp32 over kept or recomputed tiles, r̂ normalised by ``lse_off`` (with
    ``centered``: sum_{t in b} w_t (e_{y_t} - r̂_t)): one fp32 GEMV per conversation over normalised fp32
    tiles, else one launch per block (:func:`rosa_ext.kernels.tile_vjp.tile_vjp`: split scales applied, the
    scatter fused, blocks added in turn). ``out`` (B, V) to write into; ``offsets`` (B + 1,) int32 device
    offsets of the conversations (needed for B > 1 over split tiles)."""
    B, V, N = prob.num_conversations, prob.vocab_size, prob.num_tokens
    started = False
    for r0, r1, t, norm in kept.blocks():
        w_block = wt = w[r0:r1].float()
        if norm is not lse_off:
            wt = wt * torch.exp(norm - lse_off[r0:r1])
        sp = spans(prob.offsets, r0, r1)
        if out is None:
            out = torch.empty(B, V, dtype=torch.float32, device=w.device)
        if _plain(t) and not centered:  # CG's normalised fp32 tiles: one GEMV per conversation
            fresh = not started and r0 == 0 and r1 == N and len(sp) == B  # every row of out written once
            if not started and not fresh:
                out.zero_()
            TG.gemv_columns(t, wt, sp, out, accumulate=not fresh)
        else:
            tile_vjp(t, wt, out, targets=prob.targets[r0:r1] if centered else None, target_w=w_block,
                     offsets=offsets if B > 1 else None, rows0=r0, accumulate=started)
        started = True
    return out


def sqnorms(kept, lse_off: torch.Tensor) -> torch.Tensor:
    """r̂_t . r̂_t -> (N,): the pass's ``ss`` (times exp(2 (norm - lse_off)), 1 on one process)."""
    if kept.norm is lse_off:
        return kept.ss
    return kept.ss * torch.exp(2 * (kept.norm - lse_off))
