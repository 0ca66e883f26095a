"""Pieces the Stable Diffusion families (sd15, sdxl) share: noise schedule, CLIP-L and VAE architectures.

Not a family itself: families live in models/families/, one module each.
"""

from __future__ import annotations

# Stable Diffusion's training noise schedule, shared by SD1.5 and SDXL.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", clip_sample=False,
    set_alpha_to_one=False, skip_prk_steps=True,
)

# Public architectures of the released checkpoints (text_encoder*/ and vae/ config.json), written out so nothing is
# downloaded.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
)

# The tiny test models' VAE and first CLIP encoder (32/64 channels), completed by models.tiny.
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                 hidden_act="quick_gelu")
