"""Qwen-Image's published constants (QwenImagePipeline's prompt template, scheduler, model configs) and the tiny
test architecture: what both the family (families/qwenimage.py) and its tiny builder (tiny_qwenimage.py) read."""

# QwenImagePipeline's chat template and how many leading tokens of it the pipeline drops (its
# prompt_template_encode / prompt_template_encode_start_idx).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP = 34
TOKENIZER_MAX_LENGTH = 1024  # the pipeline's tokenizer_max_length: the longest prompt it encodes (and accepts)
DEFAULT_SAMPLE_SIZE = 128  # the pipeline's default_sample_size: latents per side when height / width are not given

# Qwen-Image's scheduler_config.json ships shift_terminal 0.02, which stretches every n-step grid so that its last
# sigma is 0.02: the sigmas depend on n and are no fixed training table, so training refuses it (remove the key:
# Qwen-Image-Lightning's published scheduler config has shift_terminal null). This is that config without it.
QWENIMAGE_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "time_shift_type": "exponential",
}

# Qwen-Image (20 B): 60 double-stream blocks of width 3072, text from Qwen2.5-VL-7B's 3584-wide last hidden state.
QWEN_IMAGE_20B = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
                  "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
                  "axes_dims_rope": (16, 56, 56)}
QWEN_IMAGE_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                  "temperal_downsample": [False, True, True]}
QWEN25_VL_7B = {"text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                                "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4},
                "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                                  "out_hidden_size": 3584}}

# Tiny test architecture (models/tiny_qwenimage.py completes it): a VAE of factor 2, 16 latent channels.
TINY_ARCH = {
    "transformer": {"patch_size": 2, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                    "axes_dims_rope": (4, 6, 6)},
    "vae": {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2], "num_res_blocks": 1, "temperal_downsample": [False]},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1},
}
