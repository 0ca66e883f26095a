"""Our SDPA attention processor (diffusers AttnProcessor2_0's contract), in a module of its own so that
core.attention (which picks processors) and core.triton_attention (whose processor subclasses this one) both import
it, without importing each other."""

from __future__ import annotations

import torch

from .lora import fused_linears


class SDPAAttnProcessor:
    """diffusers' AttnProcessor2_0 contract (self and cross attention, spatial / group norm, q/k norm, residual,
    output rescale, masks), without the ops that do nothing: AttnProcessor2_0 divides every output by
    `rescale_output_factor` (1.0 in every SD1.5 / SDXL UNet and VAE), a division forward and another backward per
    attention call. `attend` is the one step a subclass runs on another kernel (core.triton_attention)."""

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

        if encoder_hidden_states is not None and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = project_heads(attn, hidden_states, encoder_hidden_states, batch_size)
        head_dim = key.shape[-1]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            hidden_states = self.attend(query, key, value, attn.scale)
        else:
            hidden_states = self.masked_attend(attn, query, key, value, attention_mask, batch_size)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1.0:
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def attend(self, query, key, value, scale: float) -> torch.Tensor:
        """softmax(q k^T scale) v over (B, H, L, D) heads."""
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale)

    def masked_attend(self, attn, query, key, value, attention_mask, batch_size) -> torch.Tensor:
        mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch_size)
        mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)


def project_heads(attn, hidden_states, encoder_hidden_states, batch_size: int):
    """q, k, v of one attention call in (B, H, L, D) heads. The projections that read one input (self-attention: all
    three; cross-attention: k and v, from the text) run as one fused projection where the fused LoRA path runs them
    (core.lora.fused_linears: one base GEMM, one LoRA node), else as one call each."""
    heads = attn.heads
    if encoder_hidden_states is None:
        qkv = fused_linears((attn.to_q, attn.to_k, attn.to_v), hidden_states)
        if qkv is not None:
            return _split_heads(qkv, batch_size, 3, heads)
        query, encoder_hidden_states = attn.to_q(hidden_states), hidden_states
    else:
        query = attn.to_q(hidden_states)
        kv = fused_linears((attn.to_k, attn.to_v), encoder_hidden_states)
        if kv is not None:
            key, value = _split_heads(kv, batch_size, 2, heads)
            return query.view(batch_size, -1, heads, key.shape[-1]).transpose(1, 2), key, value
    key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // heads
    return tuple(x.view(batch_size, -1, heads, head_dim).transpose(1, 2) for x in (query, key, value))


def _split_heads(fused: torch.Tensor, batch_size: int, m: int, heads: int) -> tuple[torch.Tensor, ...]:
    """[B, L, m H D] (m projections side by side) -> m tensors (B, H, L, D): one view, one permute, one unbind."""
    head_dim = fused.shape[-1] // (m * heads)
    return fused.view(batch_size, -1, m, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
