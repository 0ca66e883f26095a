"""Our own FlashAttention-style Triton kernel (forward and backward) and a diffusers attention processor on it.

Attention softmax(q k^T * scale) v is computed tile by tile with the online softmax of FlashAttention
(Dao et al. 2022, Alg. 1; FlashAttention-2, Dao 2023, Alg. 1-2), so the Lq x Lk probability matrix never
reaches memory. The forward saves the per-row log-sum-exp; the backward is FA-2's: a preprocess computing
delta = rowsum(dO * O), one kernel for dK and dV that walks the query tiles of one key tile, and one for dQ that
walks the key tiles of one query tile (no atomics). There is no causal mask: diffusion attention has none.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D), any strides with a unit stride on D (diffusers' head
split is a free view). D is padded inside the kernel to the next power of two >= 16 by masked loads only when it
is not one already: SD1.5's 40 runs as 64 (80 -> 128, 160 -> 256), SDXL's 64 runs unmasked. Sequence ends are
masked in one tail tile per loop, so Lq and Lk need not be multiples of the tiles (cross attention over 77 text
tokens). Tiles, warps and pipeline stages are autotuned per shape on CUDA (`TILES`).

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (slow; for tests). This module imports triton at
the top; stepdistill.core.attention imports it only when the triton backend is chosen.
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

from .attn_processor import SDPAAttnProcessor

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------------------------------------------------------
# Kernels. Grid axis 0 walks tiles along a sequence, axis 1 walks (batch, head) pairs, so neighbouring programs
# read the same head's K / V (or Q / dO) from L2.
#
# The layout of the fast published kernels (FlashAttention-2, Dao 2023, Alg. 1-2 and sec. 3.2):
#   forward    one program per query tile, online softmax over key tiles; stores O and the row log-sum-exp L.
#   preprocess delta_i = rowsum(dO_i * O_i), so the backward needs no second pass over the keys for it.
#   dK, dV     one program per key tile, iterating over query tiles; P is recomputed from L (never stored).
#   dQ         one program per query tile, iterating over key tiles: a second kernel instead of atomic adds.
# Sequence ends: every loop runs its full tiles without masks and one masked tail tile, so an SD length (4096,
# 1024, 256 tokens) whose tiles divide it runs no mask at all. Head dims that are not a power of two (40, 80, 160)
# are padded to BLOCK_D with masked loads; 64 and 128 load unmasked (PAD_D is a compile-time flag).
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile; rows past n_rows (CHECK_ROWS) and padded head columns read as zero."""
    if CHECK_ROWS:
        mask = rows[:, None] < n_rows
        if HEAD_DIM != BLOCK_D:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _load_vec(ptrs, rows, n_rows, CHECK_ROWS: tl.constexpr):
    if CHECK_ROWS:
        vec = tl.load(ptrs, mask=rows < n_rows, other=0.0)
    else:
        vec = tl.load(ptrs)
    return vec


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b with a float32 accumulator. "upcast": the interpreter's tl.dot misreads bfloat16 operands, so there
    they are widened first; a product of two bfloat16 values is exact in float32, as on the tensor cores."""
    if DOT_PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, cols, Lk, offs_d, scale_log2,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_COLS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax (FA-2 Alg. 1, lines 8-10), in log2 units so exp is one exp2."""
    k = _load_rows(k_ptrs, cols, Lk, offs_d, HEAD_DIM, BLOCK_D, CHECK_COLS)
    v = _load_rows(v_ptrs, cols, Lk, offs_d, HEAD_DIM, BLOCK_D, CHECK_COLS)
    s = _dot(q, tl.trans(k), DOT_PRECISION) * scale_log2
    if CHECK_COLS:
        s = tl.where(cols[None, :] < Lk, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    rescale = tl.exp2(m_i - m_new)
    l_i = l_i * rescale + tl.sum(p, 1)
    acc = acc * rescale[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    H, Lq, Lk, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """O = softmax(q k^T scale) v and L = log2-sum-exp2 of each row, for one BLOCK_M tile of queries."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], rows, Lq, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :]
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :]

    # Padded head columns of q and k are zero, so they add nothing to q k^T; those of v are never stored.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs + start_n * skn, v_ptrs + start_n * svn, start_n + offs_n,
                                  Lk, offs_d, scale_log2, HEAD_DIM, BLOCK_D, False, DOT_PRECISION)
    if full < Lk:
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs + full * skn, v_ptrs + full * svn, full + offs_n,
                                  Lk, offs_d, scale_log2, HEAD_DIM, BLOCK_D, True, DOT_PRECISION)

    acc = acc / l_i[:, None]
    o_mask = rows[:, None] < Lq
    if HEAD_DIM != BLOCK_D:
        o_mask = o_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(O + b * sob + h * soh + rows[:, None] * som + offs_d[None, :], acc.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + bh * Lq + rows, m_i + tl.log2(l_i), mask=rows < Lq)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,
    sob, soh, som, sdob, sdoh, sdom,
    H, Lq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id = rowsum(dP * P) (FA-2 Alg. 2, line 4), the softmax-backward row term."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * sob + h * soh + rows[:, None] * som + offs_d[None, :], rows, Lq, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], rows, Lq, offs_d,
                    HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Lq + rows, delta, mask=rows < Lq)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, rows, Lq, offs_d, scale_log2,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query tile's share of dV = P^T dO and dK = dS^T q (FA-2 Alg. 2, lines 11-16), computed transposed
    (keys along rows) so P^T and dS^T come out of the products directly, with no register transpose.

    Query rows past Lq read q = dO = 0 and L = delta = 0: their P^T column is 1 and multiplies dO = 0, their dS^T
    column is 1 * (0 - 0) = 0, so they add nothing and need no mask.
    """
    q = _load_rows(q_ptrs, rows, Lq, offs_d, HEAD_DIM, BLOCK_D, CHECK_ROWS)
    do = _load_rows(do_ptrs, rows, Lq, offs_d, HEAD_DIM, BLOCK_D, CHECK_ROWS)
    lse = _load_vec(lse_ptrs, rows, Lq, CHECK_ROWS)
    delta = _load_vec(delta_ptrs, rows, Lq, CHECK_ROWS)
    p_t = tl.exp2(_dot(k, tl.trans(q), DOT_PRECISION) * scale_log2 - lse[None, :])
    dv += _dot(p_t.to(do.dtype), do, DOT_PRECISION)
    dp_t = _dot(v, tl.trans(do), DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    H, Lq, Lk, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK and dV of one BLOCK_N tile of keys, accumulated over every query tile; each program owns its rows."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # Key rows past Lk read as zero; their dK, dV rows are computed but never stored.
    k = _load_rows(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :], cols, Lk, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], cols, Lk, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    do_ptrs = DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :]
    lse_ptrs, delta_ptrs = LSE + bh * Lq + offs_m, DELTA + bh * Lq + offs_m

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    full = (Lq // BLOCK_M) * BLOCK_M
    for start_m in range(0, full, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs + start_m * sqm, do_ptrs + start_m * sdom, lse_ptrs + start_m,
                            delta_ptrs + start_m, start_m + offs_m, Lq, offs_d, scale_log2, HEAD_DIM, BLOCK_D, False,
                            DOT_PRECISION)
    if full < Lq:
        dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs + full * sqm, do_ptrs + full * sdom, lse_ptrs + full,
                            delta_ptrs + full, full + offs_m, Lq, offs_d, scale_log2, HEAD_DIM, BLOCK_D, True,
                            DOT_PRECISION)

    kv_mask = cols[:, None] < Lk
    if HEAD_DIM != BLOCK_D:
        kv_mask = kv_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + b * sdkb + h * sdkh + cols[:, None] * sdkn + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + b * sdvb + h * sdvh + cols[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, cols, Lk, offs_d, scale_log2,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_COLS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile's share of dQ = dS k (FA-2 Alg. 2, line 15), with dS = P (dO v^T - delta)."""
    k = _load_rows(k_ptrs, cols, Lk, offs_d, HEAD_DIM, BLOCK_D, CHECK_COLS)
    v = _load_rows(v_ptrs, cols, Lk, offs_d, HEAD_DIM, BLOCK_D, CHECK_COLS)
    p = tl.exp2(_dot(q, tl.trans(k), DOT_PRECISION) * scale_log2 - lse[:, None])
    if CHECK_COLS:
        # A zero key past Lk gives P = 2^-L there; it multiplies k = 0, but an overflow would make 0 * inf.
        p = tl.where(cols[None, :] < Lk, p, 0.0)
    ds = p * (_dot(do, tl.trans(v), DOT_PRECISION) - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, DOT_PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
    H, Lq, Lk, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ of one BLOCK_M tile of queries, accumulated over every key tile (no atomics: FA-2 sec. 3.2)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], rows, Lq, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], rows, Lq, offs_d,
                    HEAD_DIM, BLOCK_D, True)
    lse = _load_vec(LSE + bh * Lq + rows, rows, Lq, True)
    delta = _load_vec(DELTA + bh * Lq + rows, rows, Lq, True)
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :]
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_ptrs + start_n * skn, v_ptrs + start_n * svn, start_n + offs_n, Lk,
                      offs_d, scale_log2, HEAD_DIM, BLOCK_D, False, DOT_PRECISION)
    if full < Lk:
        dq = _dq_tile(dq, q, do, lse, delta, k_ptrs + full * skn, v_ptrs + full * svn, full + offs_n, Lk,
                      offs_d, scale_log2, HEAD_DIM, BLOCK_D, True, DOT_PRECISION)

    q_mask = rows[:, None] < Lq
    if HEAD_DIM != BLOCK_D:
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqm + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration. On CUDA each kernel is autotuned per (Lq, Lk, head dim, dtype) over tiles, warps and
# pipeline stages chosen per padded head dim (the register / shared-memory budget shrinks as BLOCK_D grows); tiles
# longer than the sequence are pruned first. Under the interpreter: small fixed tiles, so tests with short
# sequences still cross tile edges and run both the unmasked loop and the masked tail.
# ---------------------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim (64 also serves 16 and 32).
# The backward's dK/dV pass keeps a long key tile and walks short query tiles; dQ the reverse (FA-2's split).
# Chosen by compiling every candidate for sm_90 offline (triton.compile + ptxas -v, no GPU) and keeping the ones that
# spill no or few registers: e.g. a 128 x 64 forward tile at D = 64 spills 304 bytes with 4 warps, none with 8. At
# D = 256 (SD1.5's 160, padded) every candidate spills; those tiles are the least bad. The autotuner picks by time.
TILES = {
    "fwd": {64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
            128: [(64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2), (128, 64, 8, 3)],
            256: [(64, 32, 8, 2), (64, 16, 4, 2), (32, 16, 4, 1), (64, 16, 8, 2)]},
    "dkdv": {64: [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2)],
             128: [(32, 64, 8, 2), (16, 64, 8, 2), (64, 64, 8, 2), (16, 32, 4, 2)],
             256: [(16, 64, 8, 2), (16, 32, 8, 1), (32, 32, 8, 2), (16, 32, 4, 1)]},
    "dq": {64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2)],
           128: [(64, 32, 8, 2), (64, 16, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
           256: [(64, 16, 8, 2), (32, 16, 4, 1), (32, 32, 8, 2), (16, 32, 4, 1)]},
}
_INTERPRET_TILES = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}
PREPROCESS_BLOCK_M = 64


def _d_class(block_d: int) -> int:
    return max(64, block_d)


def _configs(name: str, block_d: int) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in TILES[name][_d_class(block_d)]]


def _prune(configs, named_args, **kwargs):
    """Drop tiles longer than the (power-of-two rounded) sequence they walk; keep the shortest if none fits."""
    lq, lk = (max(16, triton.next_power_of_2(int(named_args[n]))) for n in ("Lq", "Lk"))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= lq and c.kwargs["BLOCK_N"] <= lk]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_tuned: dict = {}


def _launcher(kernel, name: str, block_d: int):
    """The kernel as launched on this device, with the tile kwargs it still needs."""
    if interpreting():
        m, n = _INTERPRET_TILES[name]
        return kernel, {"BLOCK_M": m, "BLOCK_N": n}
    key = (name, _d_class(block_d))
    if key not in _tuned:
        _tuned[key] = triton.autotune(configs=_configs(name, block_d), key=["Lq", "Lk", "HEAD_DIM"],
                                      prune_configs_by={"early_config_prune": _prune})(kernel)
    return _tuned[key], {}


def _block_d(D: int) -> int:
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} > {MAX_HEAD_DIM} is not supported by the triton kernel: use attention=sdpa")
    return max(16, triton.next_power_of_2(D))


def _dot_precision(dtype: torch.dtype) -> str | None:
    # float32 inputs (tests, fp32 training) get exact products rather than TF32's 10-bit mantissa; other
    # dtypes take the backend's default, except bfloat16 in the interpreter (see _dot).
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and interpreting() else None


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels read D with unit stride; diffusers' head split already has it, so this rarely copies."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_inputs(q, k, v):
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"triton attention expects q (B, H, Lq, D) and k, v (B, H, Lk, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}: cast them first")


def _check_device(q):
    # Inside the custom op (run eagerly even under torch.compile), since it reads triton's runtime settings.
    if not (q.is_cuda or interpreting()):
        raise RuntimeError(
            "the triton attention kernel needs CUDA tensors (or TRITON_INTERPRET=1 for slow CPU tests): "
            "use attention=sdpa or attention=math on this device"
        )


def _forward(q, k, v, scale: float):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    block_d = _block_d(D)
    o = _empty_out(q)
    lse = torch.empty(B * H, Lq, device=q.device, dtype=torch.float32)
    kernel, tiles = _launcher(_fwd_kernel, "fwd", block_d)
    kernel[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, Lq, Lk, scale * LOG2E, HEAD_DIM=D, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype), **tiles,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, scale: float):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    block_d = _block_d(D)
    delta = torch.empty_like(lse)
    block_m = _INTERPRET_TILES["fwd"][0] if interpreting() else PREPROCESS_BLOCK_M
    _bwd_preprocess_kernel[(triton.cdiv(Lq, block_m), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, Lq, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    precision = _dot_precision(q.dtype)
    dkdv, tiles = _launcher(_bwd_dkdv_kernel, "dkdv", block_d)
    dkdv[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dk), *_strides(dv), H, Lq, Lk, scale, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=block_d, DOT_PRECISION=precision, **tiles,
    )
    dq_kernel, tiles = _launcher(_bwd_dq_kernel, "dq", block_d)
    dq_kernel[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, Lq, Lk, scale, scale * LOG2E, HEAD_DIM=D, BLOCK_D=block_d, DOT_PRECISION=precision, **tiles,
    )
    return dq, dk, dv


# Registered as torch custom ops, so torch.compile keeps each call as one opaque node (no graph break, no
# tracing into the launch code) and autograd saves q, k, v, O and the row log-sum-exp only.


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    # Laid out as (B, Lq, H, D) so diffusers' merge of heads back to (B, Lq, H*D) is a free view.
    B, H, Lq, D = q.shape
    return torch.empty(B, Lq, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)


@torch.library.custom_op("stepdistill::flash_attention_fwd", mutates_args=())
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(q)
    return _forward(q, k, v, scale)


@_flash_fwd.register_fake
def _(q, k, v, scale):
    B, H, Lq, _ = q.shape
    return _empty_out(q), q.new_empty(B * H, Lq, dtype=torch.float32)


@torch.library.custom_op("stepdistill::flash_attention_bwd", mutates_args=())
def _flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, scale)


@_flash_bwd.register_fake
def _(do, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _flash_grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_bwd(_unit_last(do), q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_flash_fwd.register_autograd(_flash_grad, setup_context=_setup_context)


class _EagerFlash(torch.autograd.Function):
    """The same forward and backward for eager calls, with less host work per call than the custom ops: 20,000
    forward+backward calls of a trivial custom op took 9.7 s of CPU against 6.0 s as an autograd.Function (farm-bench,
    a loaded 2-core VM), about 0.19 ms a call, next to SDPA's 0.4-0.6 ms fwd+bwd at SD shapes on an H200."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        _check_device(q)
        o, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return (*_backward(_unit_last(do), q, k, v, o, lse, ctx.scale), None)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v (Vaswani et al. eq. 1) for q (B, H, Lq, D), k, v (B, H, Lk, D); scale = D^-1/2."""
    _check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if torch.compiler.is_compiling():
        return _flash_fwd(q, k, v, float(scale))[0]
    return _EagerFlash.apply(q, k, v, float(scale))


class TritonAttnProcessor(SDPAAttnProcessor):
    """diffusers attention processor running `flash_attention` (the contract of diffusers' AttnProcessor2_0, as
    core.attn_processor.SDPAAttnProcessor runs it). An attention mask is not supported by the kernel: such a call runs
    PyTorch SDPA instead and says so once in the log.
    """

    _mask_notice_given = False

    def attend(self, query, key, value, scale: float) -> torch.Tensor:
        """softmax(q k^T scale) v over (B, H, L, D) heads: the one step a subclass may run on another kernel."""
        return flash_attention(query, key, value, scale)

    def masked_attend(self, attn, query, key, value, attention_mask, batch_size):
        if not TritonAttnProcessor._mask_notice_given:
            log.warning(
                "attention=triton: an attention mask was passed, which the triton kernel does not support; "
                "those calls run PyTorch SDPA instead"
            )
            TritonAttnProcessor._mask_notice_given = True
        return super().masked_attend(attn, query, key, value, attention_mask, batch_size)


# ---------------------------------------------------------------------------------------------------------------
# attention=auto on CUDA: per shape, whichever of this kernel and SDPA measures faster on the device.
# ---------------------------------------------------------------------------------------------------------------

MEASURE_REPEATS = 5
_choices: dict[tuple, str] = {}


def attention_choices() -> dict[tuple, str]:
    """(device, B, H, Lq, Lk, D, dtype, with gradients) -> "triton" | "sdpa": what auto measured so far."""
    return dict(_choices)


def _median_ms(fn, repeats: int) -> float:
    fn()  # the first call compiles and autotunes the triton kernels for this shape: not timed
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    ends[-1].synchronize()
    return sorted(a.elapsed_time(b) for a, b in zip(starts, ends))[repeats // 2]


def _timed_call(attend, q, k, v, scale: float, grad: bool):
    """fn() running `attend` on copies of q, k, v: forward, or forward and backward when training."""
    if not grad:
        def forward():
            with torch.no_grad():
                attend(q, k, v, scale)
        return forward
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    do = torch.randn_like(q)

    def forward_backward():
        with torch.enable_grad():
            torch.autograd.grad(attend(*leaves, scale), leaves, do)
    return forward_backward


def _sdpa(q, k, v, scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def _kernel_ms(kernel: str, q, k, v, scale: float, grad: bool) -> float:
    attend = flash_attention if kernel == "triton" else _sdpa
    return _median_ms(_timed_call(attend, q, k, v, scale, grad), MEASURE_REPEATS)


def measure_choice(q, k, v, scale: float, grad: bool) -> str:
    """"triton" or "sdpa", whichever runs this shape faster (median of MEASURE_REPEATS after one untimed call)."""
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3])
    what = f"{'fwd+bwd' if grad else 'fwd'} at B, H, Lq, Lk, D = {shape} {str(q.dtype).removeprefix('torch.')}"
    if q.shape[-1] > MAX_HEAD_DIM:
        log.info("attention=auto: sdpa %s (head dim beyond the triton kernel's %d)", what, MAX_HEAD_DIM)
        return "sdpa"
    try:
        ours = _kernel_ms("triton", q, k, v, scale, grad)
    except (RuntimeError, ValueError) as e:  # a kernel this device cannot run (shared memory...) is a loss, logged
        log.warning("attention=auto: sdpa %s (the triton kernel failed here: %s)", what, str(e).splitlines()[0][:200])
        return "sdpa"
    theirs = _kernel_ms("sdpa", q, k, v, scale, grad)
    choice = "triton" if ours < theirs else "sdpa"
    log.info("attention=auto: %s %s (triton %.3f ms, sdpa %.3f ms, median of %d)", choice, what, ours, theirs,
             MEASURE_REPEATS)
    return choice


class FastestAttnProcessor(TritonAttnProcessor):
    """attention=auto on CUDA: each shape runs on whichever of our kernel and SDPA measured faster here.

    The first eager call of a shape measures both (forward, or forward and backward when gradients flow) and caches
    the winner for the process. Inside torch.compile or a CUDA graph capture nothing can be timed: a shape measured
    by an earlier eager call keeps its choice, an unmeasured one runs SDPA (run one eager call first, as
    bench/infer.py does before compiling).
    """

    def attend(self, query, key, value, scale: float) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        shape_key = (query.device.index, *query.shape, key.shape[2], query.dtype, grad)
        choice = _choices.get(shape_key)
        if choice is None:
            if torch.compiler.is_compiling() or (query.is_cuda and torch.cuda.is_current_stream_capturing()):
                choice = "sdpa"
            else:
                choice = _choices[shape_key] = measure_choice(query, key, value, scale, grad)
        if choice == "triton":
            return flash_attention(query, key, value, scale)
        return _sdpa(query, key, value, scale)
