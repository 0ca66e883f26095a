"""Train the toy world's teachers: real diffusers SD1.5-, SDXL- and SD3-architecture pipelines, small enough for a CPU.

The recipe is Stable Diffusion's, scaled down: an AutoencoderKL (downsampling 2: 32x32 RGB <-> 16x16x4 latents)
trained first for reconstruction, its latents scaled to unit variance (SD's scaling_factor), then the UNet and
text encoder(s) trained together with the eps-prediction loss on SD's noise schedule (scaled_linear
0.00085..0.012, 1000 steps) and 10% caption dropout, so classifier-free guidance works. The result is saved
with save_pretrained and loads with StableDiffusion(XL)Pipeline.from_pretrained like any SD checkpoint.

The SD3-toy teacher is a rectified flow instead (SD3's recipe): an MMDiT transformer on the same VAE's latents,
trained to predict v = eps - x0 at x_t = (1 - sigma) x0 + sigma eps, with sigma drawn logit-normal as SD3 trains; it
loads with StableDiffusion3Pipeline and samples with its FlowMatchEulerDiscreteScheduler.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core import flow
from ..core.ema import ema_update_
from ..core.schedule import NoiseSchedule
from ..data.toy_world import IMAGE_SIZE, TOY_WORDS, ToyWorld, to_float
from ..errors import ConfigError
from ..models.registry import get_family
from ..models.tiny import SD_SCHEDULER_CONFIG, build_tiny_pipeline
from ..models.tokenizer import save_word_tokenizer

LATENT_SIZE = 16  # 32x32 pixels / VAE downsampling 2
DEFAULT_STEPS = {"sd15": 2000, "sdxl": 2000, "sd3": 4000}  # UNet steps of the shipped teachers (assets/toy/*/toy_teacher.json)
# An SD3-toy batch-128 step measured about 2 s on 2 CPU threads (its joint blocks carry T5's 256 padded tokens beside
# the 64 image tokens, as StableDiffusion3Pipeline feeds them), so it takes smaller batches and more of them.
DEFAULT_BATCH_SIZE = {"sd15": 128, "sdxl": 128, "sd3": 64}
# SD3-toy's T5 prompt length (the pipeline's max_sequence_length): every toy caption fits (checked at training), and
# the joint attention does not spend its work on 240 padding tokens as at the pipeline's default 256.
DEFAULT_T5_LENGTH = 16
MAX_TOKENS = 16  # the longest toy caption is 13 words, plus start and end tokens
# SD3-toy's sampling shift. SD3 shifts by 3 at 1024 px (4096 latent tokens) and trained its 256 px stage (1024
# tokens) unshifted (Esser et al. 2024, sec. 5.3.2: shift grows with resolution); the toy's 16x16 latents are 64
# tokens, so no shift. Training draws sigma logit-normal around 0.5 (SD3's best sampler, sec. 5.1) and then shifts
# it like the scheduler, which at shift 1 is the identity.
SD3_TOY_SHIFT = 1.0

# Architecture overrides of models.tiny's defaults. The VAE is shared by both families. It downsamples by 2
# only (32x32x3 <-> 16x16x4): a downsampling-4 VAE (8x8x4 latents) blurred small shapes so much that the judge
# read only 12% of its reconstructions of real images right. It has no mid-block attention, so it is fully
# convolutional and can be trained on crops (train_vae); 1000 steps bring the judge's alignment on its
# reconstructions of real images to 0.96-0.98 (the ceiling of 2x down- and up-sampling is 0.95-0.98). The UNets share
# one small layout (below); SDXL's adds its conditioning (pooled text and size ids, linear projections).
_VAE = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
        "mid_block_add_attention": False}
# Both UNets: three levels (16x16, 8x8, 4x4 latents) with attention only at 8x8 and 4x4, SDXL's own layout. On a
# CPU, attention over the 256 tokens of the 16x16 level cost two thirds of a training step (head dim 8), while
# the 8x8 level is fine enough for "left of" and "above"; the third level widens the receptive field cheaply.
_UNET_LAYOUT = {
    "block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16, "attention_head_dim": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
TOY_ARCH = {
    "sd15": {
        "unet": {
            **_UNET_LAYOUT,
        },
        "vae": _VAE,
        "text_encoder": {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "projection_dim": 64,
        },
    },
    "sdxl": {
        "unet": {
            **_UNET_LAYOUT,
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        },
        "vae": _VAE,
        # SDXL reads the penultimate hidden states, so each encoder gets one layer more than SD1.5's.
        "text_encoder": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "projection_dim": 32,
        },
        "text_encoder_2": {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "projection_dim": 32,
        },
    },
    # An MMDiT (SD3Transformer2DModel) on the shared 4-channel VAE: patch 2 makes the 16x16 latents 64 image tokens,
    # joined in every block by the text tokens (two CLIPs' 16 and T5's 256, the pipeline's max_sequence_length).
    # SD3 reads both CLIPs at their penultimate layer (so one layer more each) and pools their projections.
    "sd3": {
        "transformer": {"patch_size": 2, "num_layers": 4, "attention_head_dim": 16, "num_attention_heads": 4,
                        "pos_embed_max_size": 16},
        "vae": {**_VAE, "use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": 0.0},
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                         "projection_dim": 32},
        "text_encoder_2": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                           "num_attention_heads": 4, "projection_dim": 32},
        "text_encoder_3": {"d_model": 96, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
    },
}
FLOW_FAMILIES = ("sd3",)


# ---------------------------------------------------------------------------------------------------------
# VAE


def vae_loss(vae, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction MSE + kl_weight * KL(q(z|x) || N(0, I)) per latent element (the VAE's ELBO, reweighted)."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    mse = F.mse_loss(recon, x)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return mse + kl_weight * kl, mse


def warmup_constant(opt, warmup: int):
    """Linear warmup, then a constant learning rate: a run stopped at step N equals a run of N steps, so any
    snapshot of a long run is reproduced exactly by `--steps N`."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))


def random_crops(images: np.ndarray, size: int, gen: torch.Generator) -> np.ndarray:
    """One size x size crop of each uint8 image at an even offset (aligned with the VAE's 2x2 latent grid)."""
    n, full = len(images), images.shape[1]
    if size >= full:
        return images
    offsets = 2 * torch.randint(0, (full - size) // 2 + 1, (n, 2), generator=gen).numpy()
    rows = offsets[:, :1, None] + np.arange(size)[None, :, None]
    cols = offsets[:, 1:, None] + np.arange(size)[None, None, :]
    return images[np.arange(n)[:, None, None], rows, cols]


def train_vae(vae, images: np.ndarray, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int,
              progress: bool, crop_size: int = 16, full_steps: int = 0, callback=None, every: int = 50) -> float:
    """Fit the AutoencoderKL to the toy images; returns the final reconstruction MSE (in [-1, 1] units).

    The first steps - full_steps train on crop_size crops: the VAE is fully convolutional, and a 16x16 crop costs
    a quarter of a full image on a CPU. The last full_steps see whole images, so GroupNorm's statistics match
    what the VAE meets at inference. callback(step, mse), every `every` steps, may return True to stop early.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_constant(opt, max(1, steps // 20))
    mse = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    for step in bar:
        batch = images[torch.randint(0, len(images), (batch_size,), generator=gen).numpy()]
        x = to_float(random_crops(batch, crop_size, gen) if step < steps - full_steps else batch)
        loss, mse = vae_loss(vae, x, kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0:
            bar.set_postfix(mse=f"{mse.item():.5f}")
        if callback is not None and (step + 1) % every == 0 and callback(step + 1, mse.item()):
            break
    vae.eval().requires_grad_(False)
    return float(mse.detach())


@torch.no_grad()
def encode_posterior(vae, images: np.ndarray, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every uint8 image: latents are re-sampled from them at each step, as SD trains."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(to_float(images[i:i + batch_size])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------------------
# Text conditioning, with gradients (the pipelines' encode_prompt runs without them)


def encode_text(pipe, family: str, input_ids: list[torch.Tensor], drop: torch.Tensor):
    """Conditioning as the family's pipeline builds it: (encoder_hidden_states, added_cond_kwargs or None).

    SD1.5 reads the last hidden state; dropped captions were tokenized as "" (the pipeline's negative prompt).
    SDXL concatenates both encoders' penultimate hidden states, adds encoder 2's pooled projection and the size
    ids; a dropped caption is all zeros, the pipeline's force_zeros_for_empty_prompt unconditional input.
    """
    if family == "sd15":
        return pipe.text_encoder(input_ids[0]).last_hidden_state, None
    if family == "sd3":
        return encode_text_sd3(pipe, input_ids)
    hidden, pooled = [], None
    for encoder, ids in zip((pipe.text_encoder, pipe.text_encoder_2), input_ids):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", pooled)
    keep = (~drop).to(pooled.dtype)
    hidden = torch.cat(hidden, dim=-1) * keep[:, None, None]
    pooled = pooled * keep[:, None]
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=pooled.dtype)
    return hidden, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(pooled), 1)}


def encode_text_sd3(pipe, input_ids: list[torch.Tensor]):
    """As StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate states side by side, zero-padded to T5's
    width, then T5's sequence; pooled = both CLIP projections. A dropped caption was tokenized as "", which is what
    the pipeline encodes for its negative prompt (it has no force_zeros_for_empty_prompt)."""
    hidden, pooled = [], []
    for encoder, ids in zip((pipe.text_encoder, pipe.text_encoder_2), input_ids[:2]):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    t5 = pipe.text_encoder_3(input_ids[2]).last_hidden_state
    clip = torch.cat(hidden, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), {"pooled_projections": torch.cat(pooled, dim=-1)}


def tokenize(tokenizer, captions: list[str], max_length: int | None = None) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------------------
# UNet + text encoder(s)


def denoising_loss(unet, schedule: NoiseSchedule, x0, t, eps, encoder_hidden_states, added_cond_kwargs):
    """The eps-prediction loss E |eps_theta(x_t, t, c) - eps|^2 (DDPM eq. 14), x_t = alpha_t x0 + sigma_t eps."""
    x_t = schedule.add_noise(x0, eps, t)
    eps_hat = unet(x_t, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample
    return F.mse_loss(eps_hat, eps)


def logit_normal_sigmas(n: int, gen: torch.Generator, shift: float, mean: float = 0.0, std: float = 1.0):
    """sigma = shift(sigmoid(u)), u ~ N(mean, std): SD3's logit-normal timestep sampling (Esser et al. eq. 19),
    which spends the training on the middle of the path, then the scheduler's static shift (eq. 23)."""
    u = torch.sigmoid(mean + std * torch.randn(n, generator=gen, dtype=torch.float64))
    return flow.shift_sigma(u, shift)


def flow_loss(transformer, x0, sigma, eps, encoder_hidden_states, added_cond_kwargs):
    """Rectified-flow loss |v_theta(x_t, sigma) - (eps - x0)|^2 at x_t = (1 - sigma) x0 + sigma eps, the transformer
    told t = 1000 sigma as StableDiffusion3Pipeline tells it; x_t in float32 (the maths in float64)."""
    s = flow.as_sigma(sigma)
    x_t = flow.add_noise(x0, eps, s).float()
    v = transformer(hidden_states=x_t, timestep=(1000.0 * sigma).float(), encoder_hidden_states=encoder_hidden_states,
                    pooled_projections=added_cond_kwargs["pooled_projections"]).sample
    return flow.flow_matching_loss(v, x0, eps).mean()


def _denoise_loss(pipe, family: str, schedule, x0, gen: torch.Generator, hidden, added):
    """The family's training loss on one batch: eps-prediction (SD1.5, SDXL) or rectified flow (SD3)."""
    # Noise level first, then the noise: the order the shipped SD1.5/SDXL teachers drew them in.
    if family in FLOW_FAMILIES:
        sigma = logit_normal_sigmas(len(x0), gen, pipe.scheduler.config.shift)
        return flow_loss(pipe.transformer, x0, sigma, torch.randn(x0.shape, generator=gen), hidden, added)
    t = torch.randint(0, schedule.num_train_timesteps, (len(x0),), generator=gen)
    return denoising_loss(pipe.unet, schedule, x0, t, torch.randn(x0.shape, generator=gen), hidden, added)


def _text_lengths(family: str, tokenizers, t5_length: int | None = None) -> list[int]:
    """Token lengths the pipeline encodes prompts at: the tokenizers' own, and for SD3's T5 the pipeline's
    max_sequence_length (t5_length, or the pipeline default 256), which the transformer is trained to read."""
    lengths = [tok.model_max_length for tok in tokenizers]
    if family == "sd3":
        lengths[2] = t5_length or get_family(family).t5_max_length
    return lengths


def train_denoiser(pipe, family: str, latents: tuple[torch.Tensor, torch.Tensor], captions: list[str], steps: int,
                   batch_size: int, lr: float, caption_dropout: float, ema_decay: float, seed: int,
                   progress: bool, snapshot=None, snapshot_every: int = 0, t5_length: int | None = None) -> float:
    """Train the denoiser (UNet or transformer) and text encoder(s) jointly; the EMA of their weights is written back
    at the end.

    snapshot(step), when given, is called every snapshot_every steps with the EMA weights swapped in (to save
    and inspect a teacher before training ends).
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    family_cls = get_family(family)
    schedule = None if family in FLOW_FAMILIES else NoiseSchedule.from_scheduler_config(pipe.scheduler.config)
    encoders = [getattr(pipe, encoder) for encoder, _, _, _ in family_cls.text_parts]
    tokenizers = [getattr(pipe, tokenizer) for _, tokenizer, _, _ in family_cls.text_parts]
    modules = {family_cls.denoiser_prefix: getattr(pipe, family_cls.denoiser_prefix),
               **{f"text_encoder_{i}": e for i, e in enumerate(encoders)}}
    params = {f"{name}.{k}": p for name, m in modules.items() for k, p in m.named_parameters()}
    for m in modules.values():
        m.train().requires_grad_(True)
    lengths = _text_lengths(family, tokenizers, t5_length)
    ids = [tokenize(tok, captions, n) for tok, n in zip(tokenizers, lengths)]
    empty_ids = [tokenize(tok, [""], n) for tok, n in zip(tokenizers, lengths)]
    latent_mean, latent_std = latents
    scale, shift = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor or 0.0

    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    sched = warmup_constant(opt, warmup=200)
    ema = [p.detach().clone() for p in params.values()]
    loss_avg = None
    bar = tqdm(range(steps), desc=f"{family} {family_cls.denoiser_prefix}", disable=not progress)
    for step in bar:
        # Draw a batch: latents re-sampled from each image's posterior, scaled to unit variance (the pipelines decode
        # latents / scaling_factor + shift_factor; SD3-toy's shift_factor is 0).
        idx = torch.randint(0, len(captions), (batch_size,), generator=gen)
        noise = torch.randn(latent_mean[idx].shape, generator=gen)
        x0 = (latent_mean[idx] + latent_std[idx] * noise - shift) * scale
        # Caption dropout teaches the unconditional model that classifier-free guidance subtracts.
        drop = torch.rand(batch_size, generator=gen) < caption_dropout
        batch_ids = [torch.where(drop[:, None], e, i[idx]) for i, e in zip(ids, empty_ids)]
        hidden, added = encode_text(pipe, family, batch_ids, drop)
        loss = _denoise_loss(pipe, family, schedule, x0, gen, hidden, added)

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        sched.step()
        # Warm the decay up so that early snapshots do not average in the random initial weights.
        ema_update_(ema, list(params.values()), min(ema_decay, (1 + step) / (10 + step)))
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss_avg:.4f}")
        if snapshot is not None and snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            _swap_(list(params.values()), ema)
            snapshot(step + 1)
            _swap_(list(params.values()), ema)
    _swap_(list(params.values()), ema)
    for m in modules.values():
        m.eval().requires_grad_(False)
    return float(loss_avg)


@torch.no_grad()
def _swap_(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """Exchange the values of two parameter lists in place (live weights <-> their EMA)."""
    for x, y in zip(a, b, strict=True):
        tmp = x.detach().clone()
        x.copy_(y)
        y.copy_(tmp)


# ---------------------------------------------------------------------------------------------------------
# The whole recipe


@contextmanager
def flushed_denormals():
    """Subnormal floats flushed to zero while the body runs, then back to torch's default.

    Subnormals are slow on x86 CPUs (a teacher step measured ~8% faster flushed), and the shipped teachers were
    trained with them flushed, so it is part of the recipe. The setting is process-wide: left on, it broke later
    code in the same process that needs IEEE subnormals (hypothesis's float strategies, in the test suite)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@flushed_denormals()
def train_toy_teacher(
    out_dir,
    family: str = "sd15",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    lr: float = 1e-3,
    vae_steps: int = 1000,
    vae_batch_size: int = 64,
    vae_lr: float = 2e-3,
    kl_weight: float = 1e-6,
    num_images: int = 30_000,
    caption_dropout: float = 0.1,
    ema_decay: float = 0.999,
    vae_from=None,
    snapshot_every: int = 0,
    progress: bool = True,
    max_sequence_length: int | None = None,
) -> Path:
    """Train a toy teacher pipeline on the toy world and save it to out_dir (diffusers format).

    Args:
        out_dir: folder for the pipeline (created; loads with StableDiffusion(XL)Pipeline.from_pretrained).
        family: "sd15", "sdxl" or "sd3" (architecture, conditioning and training objective of the real family, at
            toy size; sd3 is a rectified flow sampled by FlowMatchEulerDiscreteScheduler).
        steps: UNet + text encoder optimisation steps (None: DEFAULT_STEPS[family], what the CLI passes
            without --steps).
        seed: seeds the data, the initial weights and every random draw: same arguments, same teacher.
        vae_from: a toy pipeline folder whose VAE to reuse instead of training one (e.g. SDXL-toy reusing
            SD1.5-toy's), so the teachers share a latent space and the VAE's CPU time is spent once.
        snapshot_every: also save the pipeline (EMA weights) to out_dir every this many steps (0: only at the end).
        max_sequence_length: SD3's T5 prompt length (None: DEFAULT_T5_LENGTH); refused when it would truncate a
            toy caption, or for a family without T5. Recorded in toy_teacher.json; sample with the same length.
    Records the recipe and CPU seconds in out_dir/toy_teacher.json.
    """
    from diffusers import AutoencoderKL

    if family not in TOY_ARCH:
        raise ConfigError(f"there is no toy teacher recipe for family {family!r}: use one of {sorted(TOY_ARCH)} "
                         "(the flow recipe is SD3's; a FLUX-toy teacher is not built)")
    out_dir = Path(out_dir)
    steps = DEFAULT_STEPS[family] if steps is None else steps
    batch_size = DEFAULT_BATCH_SIZE[family] if batch_size is None else batch_size
    torch.manual_seed(seed)
    start = time.process_time()
    pipe = build_tiny_pipeline(family, seed, words=list(TOY_WORDS), sample_size=LATENT_SIZE, arch=TOY_ARCH[family],
                               scheduler="ddim", model_max_length=MAX_TOKENS)
    if family in FLOW_FAMILIES:
        pipe.scheduler = type(pipe.scheduler).from_config(toy_scheduler_config(family))
    images, captions, _ = ToyWorld().sample(num_images, seed=seed)  # uint8: 3 KB an image
    record = {"family": family, "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
              "num_images": num_images, "caption_dropout": caption_dropout, "ema_decay": ema_decay}
    t5_length = _toy_t5_length(family, max_sequence_length, pipe)
    if t5_length is not None:
        record["max_sequence_length"] = t5_length
    if family in FLOW_FAMILIES:
        record.update(objective="rectified flow (v = eps - x0)", sigma_sampling="logit-normal(0, 1)",
                      shift=SD3_TOY_SHIFT)

    # Stage 1: the autoencoder, and SD's scaling factor 1 / std(latents) so the UNet sees unit-variance data.
    if vae_from is not None:
        pipe.vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae").eval().requires_grad_(False)
        record["vae_from"] = str(vae_from)
        if pipe.vae.config.latent_channels != TOY_ARCH[family]["vae"]["latent_channels"]:
            raise ValueError(f"{vae_from}/vae has {pipe.vae.config.latent_channels} latent channels; the toy "
                             f"{family} denoiser reads {TOY_ARCH[family]['vae']['latent_channels']}: use a toy VAE")
    else:
        record["vae_mse"] = train_vae(pipe.vae, images, vae_steps, vae_batch_size, vae_lr, kl_weight, seed, progress,
                                      full_steps=vae_steps // 5)
        record.update(vae_steps=vae_steps, vae_batch_size=vae_batch_size, vae_lr=vae_lr, kl_weight=kl_weight)
    if family in FLOW_FAMILIES:
        # StableDiffusion3Pipeline decodes latents / scaling_factor + shift_factor: SD1.5-toy's VAE has none (None).
        pipe.vae.register_to_config(shift_factor=0.0)
    latent_mean, latent_std = encode_posterior(pipe.vae, images)
    if vae_from is None:
        scaling_factor = float(1.0 / latent_mean.std())
        pipe.vae.register_to_config(scaling_factor=round(scaling_factor, 5))
    record["vae_seconds"] = round(time.process_time() - start, 1)

    # Stage 2: UNet or transformer and text encoder(s), on the eps or flow loss, with caption dropout.
    def save(step: int, loss: float | None = None) -> None:
        save_toy_pipeline(pipe, out_dir, family)
        done = {**record, "steps_done": step, "cpu_seconds": round(time.process_time() - start, 1)}
        if loss is not None:
            done["final_loss"] = loss
        (out_dir / "toy_teacher.json").write_text(json.dumps(done, indent=2) + "\n")

    loss = train_denoiser(pipe, family, (latent_mean, latent_std), captions, steps, batch_size, lr, caption_dropout,
                          ema_decay, seed + 1, progress, snapshot=save, snapshot_every=snapshot_every,
                          t5_length=t5_length)
    save(steps, loss)
    return out_dir


def toy_scheduler_config(family: str) -> dict:
    """The shipped scheduler's config: SD's DDIM (SD1.5, SDXL) or SD3's flow Euler at the toy's shift."""
    if family in FLOW_FAMILIES:
        return {**get_family(family).default_scheduler_config, "shift": SD3_TOY_SHIFT}
    return SD_SCHEDULER_CONFIG


def save_toy_pipeline(pipe, out_dir: Path, family: str) -> None:
    """save_pretrained, plus tokenizer vocab.json/merges.txt so every transformers version reads them."""
    pipe.scheduler = type(pipe.scheduler).from_config(toy_scheduler_config(family))
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for _, sub, _, tokenizer_class in get_family(family).text_parts:
        if tokenizer_class == "CLIPTokenizer":  # SD3's T5 tokenizer saved itself (tokenizer.json)
            save_word_tokenizer(out_dir / sub, list(TOY_WORDS), MAX_TOKENS)



def _toy_t5_length(family: str, length: int | None, pipe) -> int | None:
    """The T5 length a toy teacher trains at: SD3's default DEFAULT_T5_LENGTH; refused if a toy caption would not fit."""
    if getattr(pipe, "tokenizer_3", None) is None:
        if length is not None:
            raise ConfigError(f"max_sequence_length={length}: the {family} toy teacher has no T5 encoder; drop it")
        return None
    length = DEFAULT_T5_LENGTH if length is None else length
    need = longest_t5_caption(pipe.tokenizer_3)
    if length < need:
        raise ConfigError(f"max_sequence_length={length} truncates toy captions (the longest is {need} T5 tokens "
                          f"with </s>): use at least {need}")
    return length


def longest_t5_caption(tokenizer) -> int:
    """T5 tokens (with the end token) of the longest toy caption: the shortest max_sequence_length that keeps all."""
    import itertools

    from ..data.toy_world import COLOURS, LAYOUTS, SHAPES, SIZES, caption_from_label

    objects = list(itertools.product(range(len(SHAPES)), range(len(COLOURS)), range(len(SIZES))))
    captions = {caption_from_label((layout, *a, *b)) for layout in range(len(LAYOUTS)) for a in objects for b in objects}
    return max(len(ids) for ids in tokenizer(sorted(captions), add_special_tokens=True).input_ids)
