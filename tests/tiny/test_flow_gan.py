"""The adversarial terms on tiny flow-matching teachers (SD3, FLUX.1-dev): dmd's GAN head on the fake score's middle
transformer block and tscd's heads on the teacher's image tokens. A GAN run on real latents (data.images=toy:8)
trains and resumes bit-identically; each term's gradients reach only their own phase; the features are the image
tokens the transformer's own forward computes there."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.methods.gan import TokenFeatures, TokenHead, feature_reader
from stepdistill.train.build import build
from stepdistill.train.loop import Trainer

from .helpers import (
    ROOT,
    assert_gan_gradients_reach_only_their_phase,
    assert_same_lora,
    gan_batch,
    grads_reached,
    randomise_lora_b,
    zero_grads,
)

FAMILIES = ["sd3", "flux"]

torch.set_num_threads(1)


def _config(preset, model, prompts, *sets):
    return load_config(ROOT / preset, [f"model.path={model}", f"data.prompts={prompts}", "loop.progress=false", *sets])


@pytest.mark.parametrize("family", FAMILIES)
def test_dmd_gan_run_trains_and_resumes_bit_identically(request, family, prompts_file, tmp_path):
    """Four steps straight vs two, stop, two more: the same student LoRA, so the head, critic phases and noise are all
    restored."""
    model = request.getfixturevalue(f"tiny_{family}_dir")
    preset = f"configs/tiny/dmd_{family}.yaml"
    sets = ("loop.checkpoint_every=2", "method.gan=true", "data.images=toy:8")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer = Trainer(_config(preset, model, prompts_file, "loop.max_steps=4", *sets), straight)
    trainer.run()
    assert isinstance(trainer.built.distiller.head, TokenHead)
    lines = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    assert lines and all(math.isfinite(x["gan_g_loss"]) and math.isfinite(x["gan_d_loss"]) for x in lines)
    Trainer(_config(preset, model, prompts_file, "loop.max_steps=2", *sets), resumed).run()
    shutil.rmtree(resumed / "final")
    Trainer(_config(preset, model, prompts_file, "loop.max_steps=4", *sets), resumed).run()
    assert_same_lora(straight / "final", resumed / "final")


@pytest.fixture(scope="module", params=FAMILIES)
def dmd_gan(request, prompts_file):
    model = request.getfixturevalue(f"tiny_{request.param}_dir")
    torch.manual_seed(0)
    built = build(_config(f"configs/tiny/dmd_{request.param}.yaml", model, prompts_file, "method.gan=true"),
                  torch.device("cpu"), progress=False)
    randomise_lora_b(built.nets.denoiser)
    return built


def test_dmd_gan_gradients_reach_only_their_phase(dmd_gan):
    assert_gan_gradients_reach_only_their_phase(dmd_gan)


def test_middle_features_are_the_image_tokens_of_the_full_forward(dmd_gan):
    """The head reads the middle block's image tokens under the fake score's adapter, laid on the latent grid."""
    nets, batch = dmd_gan.nets, gan_batch(dmd_gan)
    reader = feature_reader(nets.denoiser)
    assert isinstance(reader, TokenFeatures)
    x_t, t = torch.randn(batch.latent_shape), torch.full((batch.size,), 500)
    seen = []
    handle = reader.blocks[reader.mid].register_forward_hook(lambda m, i, o: seen.append(o[-1]))
    try:
        nets.fake_score.raw(x_t, t, batch.cond)
    finally:
        handle.remove()
    features = reader.middle(nets.fake_score, x_t, t, batch.cond)
    b, d, h, w = features.shape
    assert (b, d) == (batch.size, nets.denoiser.inner_dim) and (h, w) == (x_t.shape[-2] // 2, x_t.shape[-1] // 2)
    assert torch.equal(features.flatten(2).transpose(1, 2), seen[0])
    # ... and another adapter (the student's) gives other features: the head reads the fake score's branch.
    assert not torch.equal(reader.middle(nets.student, x_t, t, batch.cond), features)
    # The logit depends on the sample (methods.gan.head_norm keeps enough channels in each group of its last norm).
    logits = dmd_gan.distiller.head(features)
    assert logits.shape == (batch.size,) and not torch.allclose(logits[0], logits[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_tscd_adversarial_gradients_reach_only_the_heads_in_the_critic_phase(request, family, prompts_file):
    """tscd's preset turns the adversarial term on from the second stage: the student update's gradient reaches the
    student only, the critic update's the heads only (the teacher and the EMA target stay frozen)."""
    model = request.getfixturevalue(f"tiny_{family}_dir")
    torch.manual_seed(0)
    b = build(_config(f"configs/tiny/tscd_{family}.yaml", model, prompts_file), torch.device("cpu"), progress=False)
    randomise_lora_b(b.nets.denoiser)
    distiller = b.distiller
    distiller.ctx.max_steps = b.cfg.loop.max_steps
    assert len(distiller.head.heads) == len(TokenFeatures(b.nets.denoiser).levels)
    zero_grads(b)
    out = distiller.student_loss(b.nets, gan_batch(b, latents=False), step=1)
    out.loss.mean().backward()
    assert math.isfinite(out.logs["adv_g_loss"])
    assert grads_reached(b, ("student", "target")) == {"student": True, "target": False, "head": False}
    zero_grads(b)
    out = distiller.critic_loss(b.nets, gan_batch(b, latents=False), out.critic_inputs)
    out.loss.mean().backward()
    assert math.isfinite(out.logs["adv_d_loss"])
    assert grads_reached(b, ("student", "target")) == {"student": False, "target": False, "head": True}
    zero_grads(b)
