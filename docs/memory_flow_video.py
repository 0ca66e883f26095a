"""docs/memory.md sec. 8: parameter counts and checkpointed activations of Qwen-Image / Wan 2.1 on the meta device.

    python docs/memory_flow_video.py qwenimage | wan1.3b | wan14b
"""

import sys

import torch

from stepdistill.core.lora import add_adapter
from stepdistill.models.base import library_class, size_hw
from stepdistill.models.registry import get_family

GIB = 2**30


def build(family, transformer_cfg):
    """(denoiser with a rank-64 `full` student LoRA, base / LoRA / VAE / text-encoder parameter counts), on meta."""
    cls = get_family(family)
    with torch.device("meta"):
        net = cls.denoiser_class(**transformer_cfg).to(torch.bfloat16).requires_grad_(False)
        base = sum(p.numel() for p in net.parameters())
        add_adapter(net, "student", 64, 64.0, cls.lora_targets("full"))
        lora = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
        vae = sum(p.numel() for p in cls.vae_class(**cls.full_configs["vae"]).parameters())
        encoder = library_class("transformers", cls.text_parts[0][2])
        text = sum(p.numel() for p in encoder(encoder.config_class(**cls.full_configs["text_encoder"])).parameters())
    return net, base, lora, vae, text


def checkpointed_activations(net, forward) -> int:
    """Bytes autograd keeps with gradient checkpointing: block inputs plus the tensors outside the blocks (sec. 5)."""
    params = {id(p) for p in net.parameters()}
    saved, block_inputs = {}, {}

    def pack(t):
        if id(t) not in params:
            saved[id(t)] = t.numel() * t.element_size()
        return t

    def checkpoint_fn(module, *args):
        block_inputs.update({id(a): a.numel() * a.element_size() for a in args if torch.is_tensor(a)})
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return module(*args)

    net.enable_gradient_checkpointing(checkpoint_fn)
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.device("meta"):
        forward(net)
    return sum(saved.values()) + sum(block_inputs.values())


def main(which: str) -> None:
    bf16 = torch.bfloat16
    if which == "qwenimage":
        from stepdistill.models.families.qwenimage import QWEN_IMAGE_20B as cfg

        def forward(net):  # 1024 x 1024: 64 x 64 packed tokens, 512 text tokens
            net(hidden_states=torch.zeros(1, 4096, 64, dtype=bf16), timestep=torch.zeros(1, dtype=bf16),
                encoder_hidden_states=torch.zeros(1, 512, 3584, dtype=bf16), img_shapes=[[(1, 64, 64)]],
                return_dict=False)
        family = "qwenimage"
    else:
        from stepdistill.models.families.wan import WAN21_1_3B, WAN21_14B

        cfg = WAN21_1_3B if which == "wan1.3b" else WAN21_14B
        wan = get_family("wan")
        height, width = size_hw(wan.default_resolution)  # WanPipeline's 480 x 832
        frames = (wan.default_frames - 1) // 4 + 1  # 81 frames: 21 latent frames (the VAE's temporal factor 4)

        def forward(net):  # latents 21 x 60 x 104 (VAE factor 8), 512 text tokens
            net(hidden_states=torch.zeros(1, 16, frames, height // 8, width // 8, dtype=bf16), timestep=torch.zeros(1),
                encoder_hidden_states=torch.zeros(1, 512, 4096, dtype=bf16), return_dict=False)
        family = "wan"
    net, base, lora, vae, text = build(family, cfg)
    print(f"{which}: denoiser {base / 1e9:.2f} B ({base * 2 / GIB:.1f} GiB bf16), LoRA r64 full {lora / 1e6:.0f} M, "
          f"VAE {vae / 1e6:.0f} M, text encoder {text / 1e9:.2f} B ({text * 2 / GIB:.1f} GiB bf16)")
    print(f"{which}: activations per sample, checkpointed: {checkpointed_activations(net, forward) / GIB:.2f} GiB")


if __name__ == "__main__":
    main(sys.argv[1])
