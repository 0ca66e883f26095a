"""Can dmd's GAN head tell real toy latents from a one-step student's, on the toy teacher's mid-block features?

    python tests/experiments/gan_head_probe.py demo_out/run/final    # a one-step LoRA, e.g. `stepdistill demo`'s

Trains a fresh MidBlockHead alone (300 Adam steps, lr 1e-3, batch 32 + 32, t ~ U[0, 1000)) with 2, 4, 8 and 16
channels per GroupNorm group and prints the logistic D loss of the last 50 steps (2 ln 2 = 1.386 is chance).
docs/dmd.md, "The GAN head", quotes its output.
"""
import sys

import numpy as np
import torch
from stepdistill.eval.toy import teacher_pipeline
from stepdistill.pipelines import Recipe

from stepdistill import pipelines
from stepdistill.data.toy_world import ToyWorld, to_float
from stepdistill.methods import gan

torch.set_num_threads(2)
lora = sys.argv[1]
teacher = teacher_pipeline("sd15")
unet, vae, scheduler = teacher.unet, teacher.vae, teacher.scheduler
n = 512
images, captions, _ = ToyWorld().sample(n, seed=1)
with torch.no_grad():
    real = vae.encode(to_float(images)).latent_dist.mean * vae.config.scaling_factor
    text = teacher.encode_prompt(captions, "cpu", 1, False)[0]
    student = pipelines.load(None, lora)
    student.set_progress_bar_config(disable=True)
    fake = torch.cat([pipelines.generate(student, Recipe.load(lora), captions[i:i + 64], i, output_type="latent")
                      for i in range(0, n, 64)])

features = {}
unet.mid_block.register_forward_hook(lambda m, i, o: features.__setitem__("mid", o[0] if isinstance(o, tuple) else o))


def mid_features(x0, cond):
    t = torch.randint(0, 1000, (len(x0),))
    with torch.no_grad():
        unet(scheduler.add_noise(x0, torch.randn_like(x0), t), t, cond)
    return features["mid"]


channels, side = (unet.config.block_out_channels[-1], real.shape[-1] // 2 ** (len(unet.config.block_out_channels) - 1))
for per_group in (2, 4, 8, 16):
    gan.MIN_GROUP_CHANNELS = per_group
    torch.manual_seed(0)
    head = gan.MidBlockHead(channels, side)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    losses = []
    for _ in range(300):
        i = torch.randint(0, n - 32, (1,)).item()
        rows = slice(i, i + 32)
        loss = gan.gan_discriminator_loss(head(mid_features(real[rows], text[rows])),
                                          head(mid_features(fake[rows], text[rows]))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"{per_group:2d} channels a group ({channels // gan.head_norm(channels).num_groups} in use): "
          f"D loss, last 50 steps {np.mean(losses[-50:]):.3f}", flush=True)
