"""Our own FlashAttention-style Triton kernel (forward and backward) and a diffusers attention processor on it.

Attention softmax(q k^T * scale) v is computed tile by tile with the online softmax of FlashAttention
(Dao et al. 2022, Alg. 1; FlashAttention-2, Dao 2023, Alg. 1-2), so the Lq x Lk probability matrix never
reaches memory; only the per-row log-sum-exp is kept for the backward pass.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D), any strides with a unit stride on D (diffusers' head
split is a free view). D is padded inside the kernel to the next power of two >= 16 by masked loads, so
SD1.5's D = 40 runs as 64 (80 -> 128, 160 -> 256) and SDXL's 64 runs as is. Sequence ends are masked,
so Lq and Lk need not be multiples of the block sizes (e.g. cross attention over 77 text tokens).

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (slow; for tests). This module imports triton at
the top; stepdistill.core.attention imports it only when the triton backend is chosen.
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------------------------------------------------------
# Kernels. Grid axis 0 walks tiles along a sequence, axis 1 walks (batch, head) pairs.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    H, Lq, Lk, D, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """O = softmax(q k^T scale) v for one BLOCK_M tile of queries, with the online softmax (FA-2 Alg. 1)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < Lq, offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh

    # Running row max m_i (log2 units), normaliser l_i and unnormalised output; padded D columns of q and k
    # are zero so they add nothing to q k^T, and padded columns of v are never stored.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < Lk
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        rescale = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + bh * Lq + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,
    sob, soh, som, sdob, sdoh, sdom,
    H, Lq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id = rowsum(dP * P) (FA-2 Alg. 2, line 4), the softmax-backward row term."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _probs(q, k, lse, mask_m, mask_n, scale_log2, DOT_PRECISION: tl.constexpr):
    """P = exp(q k^T scale - lse), recomputed from the saved log-sum-exp (log2 units); zero outside the sequences."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    p = tl.exp2(s - lse[:, None])
    return tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    H, Lq, Lk, D, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dV = P^T dO and dK = scale dS^T q, dS = P (dO v^T - delta), for one BLOCK_N tile of keys (FA-2 Alg. 2)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n, mask_d = offs_n < Lk, offs_d < D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    q_base, do_base = Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < Lq
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdom + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * Lq + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + bh * Lq + rows, mask=mask_m, other=0.0)
        p = _probs(q, k, lse, mask_m, mask_n, scale_log2, DOT_PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
    H, Lq, Lk, D, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ = scale dS k for one BLOCK_M tile of queries; a separate pass so no tile needs atomics (FA-2 sec. 3.2)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < Lq, offs_d < D
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=mask_m, other=0.0)
    k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < Lk
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        p = _probs(q, k, lse, mask_m, mask_n, scale_log2, DOT_PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration: autotuned on CUDA; small fixed tiles under the interpreter, so tests with short
# sequences still cross tile boundaries.
# ---------------------------------------------------------------------------------------------------------------

_INTERPRET_TILES = {"BLOCK_M": 32, "BLOCK_N": 16}


def _cuda_configs(block_d_small: bool, backward: bool) -> list[triton.Config]:
    # A few conservative tiles; the autotuner drops any that exceed a GPU's shared memory or registers.
    if block_d_small:
        tiles = [(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 2)]
        if backward:
            tiles = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 32, 4, 2)]
    else:
        tiles = [(64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


_tuned: dict = {}


def _launcher(kernel, name: str, block_d: int, backward: bool):
    """The kernel as launched on this device: autotuned per (sequence lengths, padded D) on CUDA."""
    if interpreting():
        return kernel, dict(_INTERPRET_TILES)
    key = (name, block_d <= 64, backward)
    if key not in _tuned:
        configs = _cuda_configs(block_d <= 64, backward)
        _tuned[key] = triton.autotune(configs=configs, key=["Lq", "Lk", "BLOCK_D"])(kernel)
    return _tuned[key], {}


def _block_d(D: int) -> int:
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} > {MAX_HEAD_DIM} is not supported by the triton kernel: use attention=sdpa")
    return max(16, triton.next_power_of_2(D))


def _dot_precision(dtype: torch.dtype) -> str | None:
    # float32 inputs (tests, fp32 training) get exact products rather than TF32's 10-bit mantissa; other
    # dtypes take the backend's default.
    return "ieee" if dtype == torch.float32 else None


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
    kernel, tiles = _launcher(_fwd_kernel, "fwd", block_d, backward=False)

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    kernel[grid](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, Lq, Lk, D, scale * LOG2E, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype), **tiles,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, scale: float):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    block_d = _block_d(D)
    delta = torch.empty_like(lse)
    delta_block = _INTERPRET_TILES["BLOCK_M"] if interpreting() or block_d > 128 else 64
    _bwd_delta_kernel[(triton.cdiv(Lq, delta_block), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, Lq, D, BLOCK_M=delta_block, BLOCK_D=block_d,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dkdv, tiles = _launcher(_bwd_dkdv_kernel, "dkdv", block_d, backward=True)
    dkdv[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dk), *_strides(dv), H, Lq, Lk, D, scale, scale * LOG2E,
        BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype), **tiles,
    )
    dq_kernel, tiles = _launcher(_bwd_dq_kernel, "dq", block_d, backward=True)
    dq_kernel[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, Lq, Lk, D, scale, scale * LOG2E, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype), **tiles,
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


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v (Vaswani et al. eq. 1) for q (B, H, Lq, D), k, v (B, H, Lk, D); scale = D^-1/2."""
    _check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _flash_fwd(_unit_last(q), _unit_last(k), _unit_last(v), float(scale))[0]


class TritonAttnProcessor:
    """diffusers attention processor running `flash_attention` (the contract of diffusers' AttnProcessor2_0).

    Handles self and cross attention, spatial / group norm, q/k norm, residual and output rescale, as
    the SD1.5 and SDXL UNets and VAEs use them. An attention mask is not supported by the kernel: such a
    call runs PyTorch SDPA instead and says so once in the log.
    """

    _mask_notice_given = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            hidden_states = flash_attention(query, key, value, attn.scale)
        else:
            hidden_states = self._masked_sdpa(attn, query, key, value, attention_mask, batch_size)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _masked_sdpa(self, attn, query, key, value, attention_mask, batch_size):
        if not TritonAttnProcessor._mask_notice_given:
            log.warning(
                "attention=triton: an attention mask was passed, which the triton kernel does not support; "
                "those calls run PyTorch SDPA instead"
            )
            TritonAttnProcessor._mask_notice_given = True
        mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch_size)
        mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
