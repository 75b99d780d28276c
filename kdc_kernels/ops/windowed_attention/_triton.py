r"""Triton kernels for ``windowed_attention``: fused forward and backward (the kernels are in
``_triton_kernels.py``; this file holds the tile plans, launchers, registered ops and autograd).

Maths (the op contract; see api.windowed_attention). For batch b, head h, query i, key j::

    x[i, j] = scale <q_i, k_j> + rel_bias[h, clamp(j - i, -R, R) + R] - (i - j)^2 / (2 sigma_i^2)
    key j is excluded when j >= lengths[b] or |i - j| > cutoff * sigma_i
    out[i]  = sum_j P[i, j] v_j,   P = softmax_j(x),   out[i] = 0 for padded rows i >= lengths[b]

Backward, with dP = dO V^T, Delta_i = rowsum(P_i * dP_i) = rowsum(dO_i * O_i), dS = P * (dP - Delta)::

    dV = P^T dO     dQ = scale dS K     dK = scale dS^T Q
    d rel_bias[h, r] = sum of dS over (b, i, j) with clamp(j - i, -R, R) + R = r
    d sigma_i = sum_j dS[i, j] (i - j)^2 / sigma_i^3

How the work is laid out:

* A tile holds ``G`` sequences (batch rows of one head) x ``BM`` query positions against ``G`` x
  ``BN`` key positions, with a block-diagonal mask between sequences. Short sequences (L <= 64)
  are packed whole, e.g. 2 sequences of L = 32 in one 64 x 64 tile (not one in a 128-row tile);
  long ones use ``G = 1`` and FlashAttention-style query/key blocks.
* Up to L = 128 (D <= 128) a forward program owns every query of its sequences (one query
  block), so K and V are read from memory once; beyond, each query block streams the key blocks
  it can reach.
* Softmax is online, in fp32, in log2 units; the forward saves the log-sum-exp (0 for padded
  rows, so it stays finite) and the backward recomputes P from it. No ``[B, H, L, L]`` tensor.
* With ``cutoff``, a tile only visits key blocks that intersect
  ``[i - cutoff * max(sigma), i + cutoff * max(sigma)]`` over its valid rows: cost O(L * window).
  Blocks past the longest sequence of a tile are never visited either.
* Backward for L <= 64 (L <= 128 when D <= 64; fp32 with IEEE dots: L <= 64 and D <= 64, see
  the tile plans) is one kernel per group of whole sequences (the
  key block is the whole sequence, so dq, d sigma and the bias partials of every query block are
  complete in the program that computes them: no atomics, and Delta comes exactly from the tile
  instead of the rounded output). Longer sequences use two kernels: ``_bwd_q`` (Delta from dO
  and O, dq, d sigma, bias partials; one program per query block) then ``_bwd_kv`` (dk, dv; one
  program per key block, skipping query blocks beyond cutoff * max(sigma)). Their Delta is the
  FlashAttention one: with fp16/bf16 outputs the rounding of O leaves each row's sum of dS at
  about eps * |dO| |O| instead of 0, which a bias bin summing dS over many rows accumulates.
* d rel_bias: each tile of dS is reduced along its diagonals on chip (a gather that skews the
  tile, then a column sum), the diagonal sums are binned into the ``2R+1`` table columns in
  registers, and each program writes one row of a ``[programs, bins]`` partial buffer. A small
  second kernel sums the partials in a fixed order into the table gradient. Nothing uses
  atomics, so the gradients are bitwise reproducible run to run; ``KDC_DETERMINISTIC=1``
  additionally pins the launch configuration (kdc_kernels/_launch.py), so they are reproducible
  across processes too.
* Launches: 1 forward; backward 2 (fused: dq/dk/dv/d sigma + the bias sum) or 3-4 (long L).
* Dots take the inputs' dtype on the GPU (tensor cores) with fp32 accumulation; fp32 inputs use
  IEEE fp32 dots unless TF32 is allowed the torch way (``_config.fp32_dot_precision``). Under the
  CPU interpreter every tile is converted to fp32 first (its bf16 arithmetic is wrong).
* Excluded means excluded: padded query rows and keys are never read (masked loads); a key
  whose k or v holds NaN/inf inside the length is zeroed, and a NaN added to its logits poisons
  exactly the rows whose window holds it (output NaN, lse +inf: P = 0 and Delta = 0 in the
  backward), so a NaN/inf in a position a row excludes never reaches that row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ... import _config, _launch
from ._triton_kernels import (
    _window_attn_bias_reduce_kernel,
    _window_attn_bwd_kv_kernel,
    _window_attn_bwd_q_kernel,
    _window_attn_fwd_kernel,
)

# Bias-table gradient bins kept in registers per program: 2 * min(R, L - 1) + 1 must fit.
MAX_BIAS_BINS = 4096
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------- tile plans
@dataclass(frozen=True)
class _Tiles:
    """Launch shape: G sequences per program, BM query and BN key positions per sequence, and the
    (num_warps, num_stages) pairs to autotune over (the first is the pinned one). Block sizes are
    never autotuned: grids and partial buffers follow from them."""

    G: int
    BM: int
    BN: int
    warps_stages: tuple[tuple[int, int], ...] = ((4, 2),)

    @property
    def num_warps(self) -> int:
        return self.warps_stages[0][0]

    @property
    def num_stages(self) -> int:
        return self.warps_stages[0][1]

    def configs(self) -> list[dict]:
        return [dict(num_warps=w, num_stages=s) for w, s in self.warps_stages]


def _pack(B: int, LP: int, rows: int) -> int:
    """Sequences per program for short sequences: a tile of about ``rows`` rows, at least the 16
    a dot needs. Packing G sequences block-diagonally costs G x the elementwise work of one, so on
    a GPU it stops at the row count the tensor cores and memory transactions want."""
    return max(1, min(rows // LP, _launch.next_pow2(B)), 16 // LP)


# Tile plans (block sizes and warps per regime). On the GPU every (num_warps, num_stages) listed
# compiles for sm_90 without register spills (scripts/kernel_report.py checks it on every commit).
# The CPU interpreter pays per operation, not per element, so there short sequences are packed
# into larger tiles (the same code paths: packing, several query blocks per fused program,
# skipped key blocks); from L = 65 on it runs the GPU plan itself.
#
# fp32 inputs with IEEE dots (``fma``: the contract's default for fp32 on the GPU) run their dots
# on the CUDA cores, which hold whole rows of both operands in registers: those plans use one
# pipeline stage and smaller tiles where the tensor-core plan would spill (up to L = 128 and
# D = 128 the forward still reads K and V once; the backward of L = 65..128 takes the two
# kernels). D > 128 is outside the checked shapes: its IEEE fp32 query-block backward spills.
def _fwd_tiles(B: int, L: int, D: int, interpret: bool = False, fma: bool = False) -> _Tiles:
    LP = _launch.next_pow2(L)
    if LP <= 64:  # whole sequences, packed: one query and one key block per program
        if fma and not interpret:
            configs = ((4, 1), (8, 1)) if D <= 64 else ((8, 1),)
        else:
            configs = ((4, 2), (4, 1), (8, 2)) if D <= 64 else ((8, 2), (8, 1))
        return _Tiles(_pack(B, LP, 128 if interpret else min(64, 2 * LP)), LP, LP, configs)
    wide = D > 128
    if fma and not interpret:
        return _Tiles(1, 64 if wide else 128, 32 if D > 64 else 64, ((8, 1),))
    # L <= 128: one query block holds the whole sequence, so K and V are read once
    return _Tiles(1, 64 if wide else 128, 32 if wide else 64, ((8, 2), (8, 3)))


def _bwd_tiles(B: int, L: int, D: int, interpret: bool = False, elem_bytes: int = 2,
               fma: bool = False) -> tuple[bool, _Tiles, _Tiles]:
    """(fused, tiles of _bwd_q, tiles of _bwd_kv). Fused: each key block is a whole sequence, so
    _bwd_kv alone computes every gradient (the _bwd_q tiles are then unused). fp32 inputs
    (``elem_bytes`` 4) hold twice the registers per tile: long sequences take 32 query rows;
    with IEEE dots (``fma``) see the note above the plans."""
    LP = _launch.next_pow2(L)
    fma = fma and not interpret
    if (LP <= 64 or (LP <= 128 and D <= 64)) and not (fma and (LP > 64 or D > 64)):
        # dk, dv of whole sequences stay in registers
        G = _pack(B, LP, 128 if interpret else min(64, 2 * LP))
        kv = _Tiles(G, min(LP, max(1, (64 if interpret else 32) // G)), LP, ((8, 1),) if fma else ((8, 1), (8, 2)))
        return True, kv, kv
    if interpret:
        return False, _Tiles(1, 64, 64), _Tiles(1, 64, 64)
    if fma:
        return False, _Tiles(1, 16, 32 if D <= 64 else 16, ((8, 1),)), _Tiles(1, 16, 64 if D <= 128 else 32, ((8, 1),))
    wide = D > 64 or elem_bytes > 2
    return (False, _Tiles(1, 32 if wide else 64, 32, ((8, 1), (8, 2))),
            _Tiles(1, 32, 64 if D <= 128 else 32, ((8, 1),) if wide else ((4, 1), (4, 2), (8, 1))))


def _block_d(D: int) -> int:
    return max(16, _launch.next_pow2(D))


def _bias_radius(rel_bias: Optional[torch.Tensor], L: int) -> tuple[int, int]:
    """(R of the table, RB = the clamp radius the gradient bins need: offsets never exceed L - 1)."""
    if rel_bias is None:
        return 0, 0
    R = (rel_bias.shape[1] - 1) // 2
    return R, min(R, L - 1)


# ---------------------------------------------------------------------------------- launchers
def _dot_fp32(kernel) -> bool:
    """Convert tiles to fp32 before each dot: on the interpreter, unless the native_dots hook
    asks for the GPU's dtype path (meaningful for fp16: the interpreter's bf16 arithmetic is wrong)."""
    return _launch.interpreted(kernel) and not _launch.hooks.native_dots


def _precision(q: torch.Tensor) -> str:
    """``input_precision`` of the dots: fp32 inputs follow the package's TF32 rule
    (``_config.fp32_dot_precision``); fp16/bf16 tiles use the tensor cores as they are."""
    return _config.fp32_dot_precision(q.device.type) if q.dtype == torch.float32 else "ieee"


def _fma(q: torch.Tensor) -> bool:
    """fp32 inputs with IEEE dots: the dots run on the CUDA cores (the tile plans differ)."""
    return q.dtype == torch.float32 and _precision(q) == "ieee"


def _visit_buffer(grid, device: torch.device) -> Optional[torch.Tensor]:
    if _launch.hooks.visit_log is None:
        return None
    return torch.full((grid[0] * grid[1],), -1, dtype=torch.int32, device=device)


def _log_visits(kernel: str, visits: Optional[torch.Tensor], grid, tiles: _Tiles, blocks: int) -> None:
    """Tell the visit_log hook which blocks the programs of ``kernel`` visited: ``visited`` against
    the ``total`` a dense kernel would visit (``blocks`` per program)."""
    if visits is not None and _launch.hooks.visit_log is not None:
        _launch.hooks.visit_log.append(dict(
            kernel=kernel, visited=int(visits.sum()), total=grid[0] * grid[1] * blocks,
            unwritten=int((visits < 0).sum()), programs=grid[0] * grid[1], blocks_per_sequence=grid[1],
            max_per_program=int(visits.max()), G=tiles.G, BM=tiles.BM, BN=tiles.BN))


def _run(kernel, grid, args: list, meta: dict, tiles: _Tiles, key: tuple, device: torch.device) -> None:
    """Launch ``kernel`` with the plan's block sizes; num_warps / num_stages follow the launch
    policy (kdc_kernels/_launch.py: autotuned on bucketed keys, pinned, or the interpreter's)."""

    def launch(config):
        kernel[grid](*args, **meta, **config)

    _launch.run(kernel, tiles.configs(), tiles.configs()[0], key, launch, device)


def _tune_key(q: torch.Tensor, meta: dict, L: int) -> tuple:
    """What changes the best (num_warps, num_stages): the dtype, the constexprs (tiles, flags),
    and the sizes, bucketed to powers of two (B * H programs' worth of work and L)."""
    B, H = q.shape[:2]
    return (q.dtype, *sorted(meta.items()), _launch.bucket(B * H), _launch.bucket(L))


def _common_args(q, k, v, rel_bias, sigma):
    """Strides of q, k, v and of the optional bias table and sigma (zeros when absent)."""
    return [*q.stride(), *k.stride(), *v.stride()], [
        *(rel_bias.stride() if rel_bias is not None else (0, 0)),
        *(sigma.stride() if sigma is not None else (0, 0, 0)),
    ]


def _or(x: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """A placeholder pointer for an absent optional tensor (never dereferenced)."""
    return dummy if x is None else x


def _window_attn_fwd(q, k, v, rel_bias, sigma, lengths, scale: float, cutoff: Optional[float]):
    """Forward launcher: ``(out [B, H, L, D] in q's dtype, lse [B, H, L] fp32, log2 units)``."""
    B, H, L, D = q.shape
    t = _fwd_tiles(B, L, D, _launch.interpreted(_window_attn_fwd_kernel), _fma(q))
    out = _launch.new_buffer("out", (B, H, L, D), q.dtype, q.device)
    lse = _launch.new_buffer("lse", (B, H, L), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    lengths = lengths.contiguous() if lengths is not None else None
    grid = (H * _launch.cdiv(B, t.G), _launch.cdiv(L, t.BM))
    visits = _visit_buffer(grid, q.device)
    R, _ = _bias_radius(rel_bias, L)
    qkv_strides, table_strides = _common_args(q, k, v, rel_bias, sigma)
    args = [q, k, v, _or(rel_bias, q), _or(sigma, q), _or(lengths, q), out, lse, _or(visits, q),
            *qkv_strides, *table_strides, B, H, L, D, R, scale * math.log2(math.e), cutoff or 0.0]
    meta = dict(HAS_BIAS=rel_bias is not None, HAS_SIGMA=sigma is not None, HAS_CUTOFF=cutoff is not None,
                HAS_LENGTHS=lengths is not None, G=t.G, BM=t.BM, BN=t.BN, BLOCK_D=_block_d(D),
                DOT_FP32=_dot_fp32(_window_attn_fwd_kernel), PRECISION=_precision(q),
                COUNT_VISITS=visits is not None)
    _run(_window_attn_fwd_kernel, grid, args, meta, t, _tune_key(q, meta, L), q.device)
    _log_visits("fwd", visits, grid, t, _launch.cdiv(L, t.BN))
    return out, lse


def _window_attn_bwd(dout, q, k, v, out, lse, rel_bias, sigma, lengths, scale: float, cutoff: Optional[float],
                     need_bias: bool, need_sigma: bool):
    """Backward launcher: ``(dq, dk, dv, d rel_bias, d sigma)``; the last two are empty tensors
    when not asked for."""
    B, H, L, D = q.shape
    fused, tq, tkv = _bwd_tiles(B, L, D, _launch.interpreted(_window_attn_bwd_kv_kernel), q.element_size(), _fma(q))
    dev = q.device
    need_bias = need_bias and rel_bias is not None
    need_sigma = need_sigma and sigma is not None
    dq, dk, dv = (_launch.new_buffer(name, (B, H, L, D), q.dtype, dev) for name in ("dq", "dk", "dv"))
    dsigma = _launch.new_buffer("dsigma", (B, H, L), sigma.dtype, dev) if need_sigma else q.new_empty(0)
    dbias = _launch.new_buffer("dbias", rel_bias.shape, rel_bias.dtype, dev) if need_bias else q.new_empty(0)
    if dq.numel() == 0:
        return dq, dk, dv, dbias.zero_(), dsigma
    if not fused:
        out = out.contiguous()  # as the forward wrote it (the fused path does not read it)
    lengths = lengths.contiguous() if lengths is not None else None
    R, RB = _bias_radius(rel_bias, L)
    NBP = _launch.next_pow2(2 * RB + 1) if need_bias else 1
    qkv_strides, table_strides = _common_args(q, k, v, rel_bias, sigma)
    tail = [*qkv_strides, *dout.stride(), *table_strides,
            B, H, L, D, R, RB, scale, scale * math.log2(math.e), cutoff or 0.0]
    inputs = [q, k, v, _or(rel_bias, q), _or(sigma, q), _or(lengths, q), out, dout, lse]

    def meta(t: _Tiles, **extra):
        return dict(HAS_BIAS=rel_bias is not None, HAS_SIGMA=sigma is not None, HAS_CUTOFF=cutoff is not None,
                    HAS_LENGTHS=lengths is not None, NEED_BIAS=need_bias, NEED_SIGMA=need_sigma,
                    G=t.G, BM=t.BM, BN=t.BN, BLOCK_D=_block_d(D), NBP=NBP,
                    DOT_FP32=_dot_fp32(_window_attn_bwd_kv_kernel), PRECISION=_precision(q),
                    NC=_launch.next_pow2(max(1, min(t.BM + t.BN - 1, 2 * RB - 1))), **extra)

    grid_kv = (H * _launch.cdiv(B, tkv.G), _launch.cdiv(L, tkv.BN))
    if fused:
        partial = _launch.new_buffer("dbias_partials", (grid_kv[0] * grid_kv[1], NBP), torch.float32, dev) \
            if need_bias else None
        visits = _visit_buffer(grid_kv, dev)
        m = meta(tkv, FUSED=True, COUNT_VISITS=visits is not None)
        _run(_window_attn_bwd_kv_kernel, grid_kv,
             [*inputs, lse, q, dq, dk, dv, _or(dsigma if need_sigma else None, q), _or(partial, q),
              _or(visits, q), *tail], m, tkv, _tune_key(q, m, L), dev)
        _log_visits("bwd_kv", visits, grid_kv, tkv, _launch.cdiv(L, tkv.BM))
    else:
        delta = _launch.new_buffer("delta", (B, H, L), torch.float32, dev)
        grid_q = (H * _launch.cdiv(B, tq.G), _launch.cdiv(L, tq.BM))
        partial = _launch.new_buffer("dbias_partials", (grid_q[0] * grid_q[1], NBP), torch.float32, dev) \
            if need_bias else None
        visits = _visit_buffer(grid_q, dev)
        m = meta(tq, COUNT_VISITS=visits is not None)
        _run(_window_attn_bwd_q_kernel, grid_q,
             [*inputs, delta, dq, _or(dsigma if need_sigma else None, q), _or(partial, q), _or(visits, q), *tail],
             m, tq, _tune_key(q, m, L), dev)
        _log_visits("bwd_q", visits, grid_q, tq, _launch.cdiv(L, tq.BN))
        sigma_max = q
        if cutoff is not None:  # widest window of each (b, h) over its valid rows
            sig = sigma.float()
            if lengths is not None:
                sig = sig.masked_fill(torch.arange(L, device=dev) >= lengths[:, None, None], 0.0)
            sigma_max = sig.amax(-1).contiguous()
        visits = _visit_buffer(grid_kv, dev)
        m = meta(tkv, FUSED=False, COUNT_VISITS=visits is not None) | dict(NEED_BIAS=False, NEED_SIGMA=False)
        _run(_window_attn_bwd_kv_kernel, grid_kv,
             [*inputs, delta, sigma_max, dq, dk, dv, q, q, _or(visits, q), *tail], m, tkv, _tune_key(q, m, L), dev)
        _log_visits("bwd_kv", visits, grid_kv, tkv, _launch.cdiv(L, tkv.BM))
    if need_bias:
        # Second pass: the per-program partials (rows ordered group-major, and a group's head is
        # its index // groups per head, so they view as [H, programs of a head, bins]) summed in
        # a fixed order and placed into the 2 R + 1 table columns.
        _bias_reduce(partial, dbias, H, R, RB, NBP)
    return dq, dk, dv, dbias, dsigma


_BIAS_REDUCE = [dict(BLOCK_P=32, BLOCK_R=32, num_warps=4, num_stages=1)]
_BIAS_REDUCE_INTERPRET = dict(BLOCK_P=64, BLOCK_R=64)


def _bias_reduce(partial: torch.Tensor, dbias: torch.Tensor, H: int, R: int, RB: int, NBP: int) -> None:
    P = partial.shape[0] // H

    def launch(config):
        meta, options = _launch.launch_options(config)
        _window_attn_bias_reduce_kernel[(H, _launch.cdiv(2 * R + 1, meta["BLOCK_R"]))](
            partial, dbias, P, R, RB, *dbias.stride(), NBP=NBP, **meta, **options)

    _launch.run(_window_attn_bias_reduce_kernel, _BIAS_REDUCE, _BIAS_REDUCE_INTERPRET, (), launch, partial.device)


# ------------------------------------------------------------------ registered ops and autograd
@torch.library.custom_op("kdc_triton::windowed_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_bias: Optional[torch.Tensor],
            sigma: Optional[torch.Tensor], lengths: Optional[torch.Tensor], scale: float,
            cutoff: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, L, D], lse [B, H, L] fp32)`` of windowed attention (the lse is for backward)."""
    return _window_attn_fwd(q, k, v, rel_bias, sigma, lengths, scale, cutoff)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, rel_bias, sigma, lengths, scale, cutoff):
    B, H, L, D = q.shape
    return q.new_empty((B, H, L, D)), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("kdc_triton::windowed_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, rel_bias: Optional[torch.Tensor], sigma: Optional[torch.Tensor],
            lengths: Optional[torch.Tensor], scale: float, cutoff: Optional[float], need_bias: bool,
            need_sigma: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, d rel_bias, d sigma)``; the last two are empty unless asked for."""
    return _window_attn_bwd(dout, q, k, v, out, lse, rel_bias, sigma, lengths, scale, cutoff, need_bias, need_sigma)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, rel_bias, sigma, lengths, scale, cutoff, need_bias, need_sigma):
    B, H, L, D = q.shape
    grads = [q.new_empty((B, H, L, D)) for _ in range(3)]
    dbias = rel_bias.new_empty(rel_bias.shape) if need_bias and rel_bias is not None else q.new_empty(0)
    dsigma = sigma.new_empty((B, H, L)) if need_sigma and sigma is not None else q.new_empty(0)
    return (*grads, dbias, dsigma)


def _setup_context(ctx, inputs, output):
    q, k, v, rel_bias, sigma, lengths, scale, cutoff = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rel_bias, sigma, lengths)
    ctx.scale, ctx.cutoff = scale, cutoff
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, rel_bias, sigma, lengths = ctx.saved_tensors
    need_bias = rel_bias is not None and ctx.needs_input_grad[3]
    need_sigma = sigma is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dbias, dsigma = _bwd_op(dout, q, k, v, out, lse, rel_bias, sigma, lengths, ctx.scale,
                                        ctx.cutoff, need_bias, need_sigma)
    return dq, dk, dv, dbias if need_bias else None, dsigma if need_sigma else None, None, None, None


torch.library.register_autograd("kdc_triton::windowed_attention_fwd", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- fast-path protocol
def windowed_attention_triton(q, k, v, rel_bias=None, sigma=None, lengths=None, scale=None, cutoff=None):
    """Run the fused Triton kernels on validated arguments (see ``api.windowed_attention``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _fwd_op(q, k, v, rel_bias, sigma, lengths, scale, cutoff)
    return out


def windowed_attention_unsupported(q, k, v, rel_bias=None, sigma=None, lengths=None, scale=None,
                                   cutoff=None) -> list[str]:
    """Why these kernels cannot run this case (shapes/dtypes only; empty when they can)."""
    reasons = []
    B, H, L, D = q.shape
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"the Triton kernels take float32/float16/bfloat16 inputs, got {q.dtype} "
                       "(convert with .float(), or use impl='reference')")
    if D > MAX_HEAD_DIM:
        reasons.append(f"head dim D = {D} is larger than the {MAX_HEAD_DIM} the Triton kernels support")
    if rel_bias is not None and rel_bias.requires_grad and torch.is_grad_enabled():
        _, RB = _bias_radius(rel_bias, L)
        if 2 * RB + 1 > MAX_BIAS_BINS:
            reasons.append(
                f"the rel_bias gradient needs 2 * min(R, L - 1) + 1 = {2 * RB + 1} bins per program, more than "
                f"the {MAX_BIAS_BINS} the Triton kernels keep in registers (R = {(rel_bias.shape[1] - 1) // 2}, L = {L})"
            )
    return reasons
