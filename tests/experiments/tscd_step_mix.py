"""Which of a 4-step tscd student's steps cost it alignment? Mix teacher steps (DDIM + CFG 4) and student steps
(the LoRA, guidance 0) on one 4-step DDIM schedule, from the same noise, and judge the images.

    python tests/experiments/tscd_step_mix.py RUN/final [--spacing trailing|leading] tttt ssss tsss sttt

A pattern names each step's model in order: t = teacher, s = student. `trailing` (999, 749, 499, 249) is the
student's recipe; `leading` (751, 501, 251, 1) is the toy teacher's own scheduler, the one `stepdistill eval toy
--teacher --steps 4` runs. docs/tscd.md quotes its output.
"""
import argparse

import torch
from diffusers import DDIMScheduler
from stepdistill.eval.toy import toy_prompts

from stepdistill import pipelines
from stepdistill.metrics.toy_judge import load_judge, matches

parser = argparse.ArgumentParser()
parser.add_argument("lora")
parser.add_argument("patterns", nargs="+")
parser.add_argument("--spacing", choices=("trailing", "leading"), default="trailing")
parser.add_argument("--n", type=int, default=500)
args = parser.parse_args()

pipe = pipelines.load(None, args.lora)
scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=args.spacing,
                                      set_alpha_to_one=args.spacing == "trailing")  # the recipe's / the teacher's
scheduler.set_timesteps(4)
judge, prompts = load_judge(), toy_prompts(args.n, 0)
with torch.no_grad():
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * args.n)[:2]


@torch.no_grad()
def eps(x, t, teacher: bool):
    if not teacher:
        return pipe.unet(x, t, cond).sample
    pipe.disable_lora()
    e_uncond, e_cond = pipe.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
    pipe.enable_lora()
    return e_uncond + 4.0 * (e_cond - e_uncond)


@torch.no_grad()
def alignment(pattern: str) -> float:
    x = torch.randn(args.n, pipe.unet.config.in_channels, *(2 * [pipe.unet.config.sample_size]),
                    generator=torch.Generator().manual_seed(0))
    for who, t in zip(pattern, scheduler.timesteps, strict=True):
        x = scheduler.step(eps(x, t, who == "t"), t, x).prev_sample
    images = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    return float(matches(judge.predict(images), prompts).mean())


for pattern in args.patterns:
    print(f"{args.spacing} {pattern}: alignment {alignment(pattern):.3f}", flush=True)
