"""Every method end to end on the released SD1.5 and SDXL architectures (random weights, nothing downloaded), on CPU.

Per method x family: a couple of updates at 64 px (batch 1, LoRA rank 4), then the exported LoRA, in diffusers and
in kohya format, loads into a fresh StableDiffusion(XL)Pipeline of the same folder with every LoRA layer applied and
no unmatched key, and reproduces the training-time student on the same latents and timesteps.

Memory (24 GB machine): SD1.5 trains and compares in fp32 (UNet 3.4 GB); SDXL trains with a bf16 frozen base
(`model.dtype=bf16`: UNet 5.1 GB instead of 10.3 GB) and the fresh pipeline loads in bf16, after the trainer is freed.
The full-size folders (fp16 weights on disk, 2 GB and 6.5 GB) are written once per family per session.
Slow (opt-in): pytest -m slow tests/slow/test_full_size.py; docs/testing.md has the time it takes.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from stepdistill.bench.memory import METHODS

from stepdistill.config import load_config
from stepdistill.core.recipe import Recipe
from stepdistill.export import KOHYA_WEIGHT_NAME
from stepdistill.models.random_init import save_random_pipeline
from stepdistill.models.registry import get_family
from stepdistill.models.tiny import TINY_PROMPTS
from stepdistill.train.loop import Trainer
from tests.tiny.helpers import ROOT, student_latents

pytestmark = pytest.mark.slow

FAMILIES = ["sd15", "sdxl"]
BASE_DTYPE = {"sd15": "fp32", "sdxl": "bf16"}
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMMON = ["model.resolution=64", "data.batch_size=1", "lora.rank=4", "lora.alpha=4", "loop.progress=false",
          "loop.checkpoint_every=1000", "export.formats=[diffusers,kohya]", "loop.max_steps=2"]
# (preset, overrides) per method, the same as the memory benchmark's: every phase of the method within two updates
# (tscd: a two-stage preset k = 2 -> 1; dmd: GAN head on toy latents and the regression term; disback: stage 1
# records node 1 at update 1, stage 2 backtracks at update 2).
KEY_PROBLEM = re.compile(r"(unexpected|missing|not found|incompatible)[_ ]?keys?|target modules", re.IGNORECASE)


@pytest.fixture(scope="session")
def full_size_dir(tmp_path_factory):
    """family -> a full-size random pipeline folder, written on first use, once per session."""
    made = {}
    reuse = os.environ.get("STEPDISTILL_FULL_SIZE_DIR")  # DIR/<family> folders written before, to rerun faster

    def get(family):
        if reuse and (Path(reuse) / family / "model_index.json").is_file():
            return Path(reuse) / family
        if family not in made:
            made[family] = save_random_pipeline(tmp_path_factory.mktemp("full") / family, family, torch.float16,
                                                log=lambda _: None)
        return made[family]

    return get


@pytest.fixture(scope="session")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.txt"
    path.write_text("\n".join(TINY_PROMPTS[:4]) + "\n")
    return path


def fresh_pipeline_latents(family, base, final, prompt, x_T, dtype, weight_name=None):
    """A fresh pipeline of `base` with the exported LoRA and its recipe; (latents, LoRA layers applied, messages)."""
    pipe = get_family(family).load_pipeline(str(base), dtype)
    recipe = Recipe.load(final)
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    for name in ("diffusers", "peft"):
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(final), **({"weight_name": weight_name} if weight_name else {}))
    finally:
        for name in ("diffusers", "peft"):
            logging.getLogger(name).removeHandler(handler)
    messages += [str(w.message) for w in caught]
    applied = sum(1 for m in pipe.unet.modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)
    out = pipe(prompt=[prompt], latents=x_T.clone().to(dtype), generator=torch.Generator().manual_seed(7),
               output_type="latent", **recipe.call_kwargs(pipe.scheduler)).images
    del pipe
    gc.collect()
    return out.float(), applied, messages


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_end_to_end_at_full_size(method, family, full_size_dir, prompts, tmp_path):
    base = full_size_dir(family)
    preset, sets = METHODS[method]
    base_dtype = BASE_DTYPE[family]
    cfg = load_config(ROOT / preset.format(family=family), [
        f"model.path={base}", f"data.prompts={prompts}", f"model.dtype={base_dtype}", *COMMON,
        *(s.format(family=family) for s in sets)])
    trainer = Trainer(cfg, tmp_path / "run")
    final = trainer.run()
    b = trainer.built
    assert b.family.name == family and tuple(b.family.unet.config.block_out_channels) == \
        tuple(get_family(family).full_configs["unet"]["block_out_channels"])
    prompt = b.data.prompts[0]
    ours, _, x_T = student_latents(b, prompt)
    ours = ours.float()
    trainer.close()
    del trainer, b
    gc.collect()

    from safetensors import safe_open

    with safe_open(str(final / KOHYA_WEIGHT_NAME), framework="pt") as f:
        kohya_layers = len([k for k in f.keys() if k.endswith(".lora_down.weight")])  # noqa: SIM118
    dtype = TORCH_DTYPE[base_dtype]
    # bf16 base: the pipeline's LoRA runs in bf16, the trainer's in fp32 master weights
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for weight_name in (None, KOHYA_WEIGHT_NAME):
        theirs, applied, messages = fresh_pipeline_latents(family, base, final, prompt, x_T, dtype, weight_name)
        assert not [m for m in messages if KEY_PROBLEM.search(m)], messages
        assert applied == kohya_layers, (weight_name, applied, kohya_layers)  # every LoRA layer of the file applied
        scale = theirs.abs().max().clamp(min=1.0)
        err = ((ours - theirs).abs().max() / scale).item()
        assert err <= tol, (weight_name, err)
