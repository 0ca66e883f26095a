"""Wan 2.1 / 2.2's published configs (transformer, VAE, UMT5, scheduler) and the tiny test architecture: what both
the family (families/wan.py) and its tiny builder (tiny_wan.py) read."""

# Wan2.1-T2V-1.3B / 14B transformers (diffusers' Wan-AI/Wan2.1-T2V-*-Diffusers configs).
WAN21_1_3B = {"patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
              "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
              "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
WAN21_14B = dict(WAN21_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
WAN_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
           "temperal_downsample": [False, True, True]}
# google/umt5-xxl's encoder (5.7 B with its 256k vocabulary).
UMT5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 256384,
            "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "dropout_rate": 0.0}
# Wan 2.1's scheduler: UniPC over flow sigmas shifted by flow_shift (3.0 for 480p; 5.0 for 720p).
WAN_SCHEDULER_CONFIG = {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "flow_shift": 3.0,
                        "use_flow_sigmas": True, "prediction_type": "flow_prediction"}

TINY_ARCH = {
    "transformer": {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32,
                    "freq_dim": 16, "num_layers": 2, "rope_max_seq_len": 32},
    # Temporal and spatial factor 2 (the real VAE: 4 and 8); 16 latent channels like the real one.
    "vae": {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2], "num_res_blocks": 1, "temperal_downsample": [True],
            "scale_factor_temporal": 2, "scale_factor_spatial": 2},
    "text_encoder": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
                     "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "relative_attention_num_buckets": 8,
                     "relative_attention_max_distance": 32},
}
