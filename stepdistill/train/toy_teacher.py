"""Train the toy world's teachers: real diffusers pipelines of every family with a toy recipe, small enough for a CPU.

The recipe is Stable Diffusion's, scaled down: an AutoencoderKL (downsampling 2: 32x32 RGB <-> 16x16x4 latents)
trained first for reconstruction (or reused from another toy teacher), its latents scaled to unit variance (SD's
scaling_factor), then the denoiser and text encoder(s) trained together with 10% caption dropout, so
classifier-free guidance works, and an EMA of their weights. The result is saved with save_pretrained and loads with
the family's pipeline class like any checkpoint of it.

Everything that differs between families comes from the family's toy hooks (models.base.FamilyModel.toy_*): the
toy-size architecture, how captions become conditioning, the training objective (eps prediction on SD's DDPM
schedule, or a rectified flow with logit-normal sigma as the flow families train: models.toy_recipe), the scheduler
saved with it and the default steps and batch size. This module names no family.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.ema import ema_update_
from ..core.lr import check_lr_schedule, lr_factor
from ..data.toy_world import TOY_WORDS, ToyWorld, to_float
from ..errors import ConfigError
from ..models.registry import get_family
from ..models.tiny import build_tiny_pipeline
from ..models.tokenizer import save_word_tokenizer
from ..models.toy_recipe import TOY_T5_LENGTH, flow_loss, logit_normal_sigmas  # noqa: F401  (re-exported)

LATENT_SIZE = 16  # 32x32 pixels / VAE downsampling 2
MAX_TOKENS = 16  # the longest toy caption is 13 words, plus start and end tokens
WARMUP_STEPS = 200

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
    """Linear warmup, then a constant learning rate (any snapshot of a long run is a shorter run)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor("constant", 0, warmup))


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
# Denoiser + text encoder(s), through the family's toy hooks (models.base.FamilyModel.toy_*)


def tokenize(tokenizer, captions: list[str], max_length: int | None = None) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def text_lengths(family_cls, tokenizers, t5_length: int | None = None) -> list[int]:
    """Token lengths the pipeline encodes prompts at: the tokenizers' own, and for a T5 part the pipeline's
    max_sequence_length (t5_length, or the family's pipeline default), which the denoiser is trained to read."""
    lengths = [tok.model_max_length for tok in tokenizers]
    if family_cls.toy_t5_part is not None:
        lengths[family_cls.toy_t5_part] = t5_length or family_cls.t5_max_length
    return lengths


def train_denoiser(pipe, family: str, latents: tuple[torch.Tensor, torch.Tensor], captions: list[str], steps: int,
                   batch_size: int, lr: float, caption_dropout: float, ema_decay: float, seed: int,
                   progress: bool, snapshot=None, snapshot_every: int = 0, t5_length: int | None = None,
                   loss_fn=None, lr_schedule: str = "constant", lr_final: float = 0.0) -> float:
    """Train the denoiser (UNet or transformer) and text encoder(s) jointly with the family's toy loss (loss_fn, or
    the family's default toy_loss_fn); the EMA of their weights is written back at the end.

    snapshot(step, loss), when given, is called every snapshot_every steps with the EMA weights swapped in (to save
    and inspect a teacher before training ends).
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    family_cls = get_family(family)
    loss_fn = loss_fn or family_cls.toy_loss_fn(pipe)
    encoders = [getattr(pipe, encoder) for encoder, _, _, _ in family_cls.text_parts]
    tokenizers = [getattr(pipe, tokenizer) for _, tokenizer, _, _ in family_cls.text_parts]
    modules = {family_cls.denoiser_prefix: getattr(pipe, family_cls.denoiser_prefix),
               **{f"text_encoder_{i}": e for i, e in enumerate(encoders)}}
    params = {f"{name}.{k}": p for name, m in modules.items() for k, p in m.named_parameters()}
    for m in modules.values():
        m.train().requires_grad_(True)
    lengths = text_lengths(family_cls, tokenizers, t5_length)
    ids = [tokenize(tok, captions, n) for tok, n in zip(tokenizers, lengths)]
    empty_ids = [tokenize(tok, [""], n) for tok, n in zip(tokenizers, lengths)]
    latent_mean, latent_std = latents
    scale, shift = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor or 0.0

    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(lr_schedule, steps, WARMUP_STEPS, lr_final))
    ema = [p.detach().clone() for p in params.values()]
    loss_avg = None
    bar = tqdm(range(steps), desc=f"{family} {family_cls.denoiser_prefix}", disable=not progress)
    for step in bar:
        # Draw a batch: latents re-sampled from each image's posterior, scaled to unit variance (the pipelines decode
        # latents / scaling_factor + shift_factor).
        idx = torch.randint(0, len(captions), (batch_size,), generator=gen)
        noise = torch.randn(latent_mean[idx].shape, generator=gen)
        x0 = (latent_mean[idx] + latent_std[idx] * noise - shift) * scale
        # Caption dropout teaches the unconditional model that classifier-free guidance subtracts.
        drop = torch.rand(batch_size, generator=gen) < caption_dropout
        batch_ids = [torch.where(drop[:, None], e, i[idx]) for i, e in zip(ids, empty_ids)]
        hidden, added = family_cls.toy_encode_text(pipe, batch_ids, drop)
        loss = loss_fn(x0, gen, hidden, added)

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
            snapshot(step + 1, loss_avg)
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
    family: str,
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
    lr_schedule: str = "constant",
    lr_final: float = 0.0,
    timestep_sampling: str | None = None,
    logit_normal: tuple[float, float] | None = None,
    init_from=None,
    keep_snapshots: bool = False,
    arch: dict[str, dict] | None = None,
) -> Path:
    """Train a toy teacher pipeline on the toy world and save it to out_dir (diffusers format).

    Everything family-specific comes from the family's toy hooks (FamilyModel.toy_*): architecture, conditioning,
    training objective, scheduler, defaults.

    Args:
        out_dir: folder for the pipeline (created; loads with the family's pipeline class from_pretrained).
        family: a registered family with a toy recipe (toy_arch).
        steps: denoiser + text encoder optimisation steps (None: the family's toy_defaults, what the CLI passes
            without --steps).
        seed: seeds the data, the initial weights and every random draw: same arguments, same teacher.
        vae_from: a toy pipeline folder whose VAE to reuse instead of training one (e.g. reusing the first toy
            teacher's), so the teachers share a latent space and the VAE's CPU time is spent once.
        snapshot_every: also save the pipeline (EMA weights) to out_dir every this many steps (0: only at the end);
            keep_snapshots: and a copy of each in out_dir/snapshots/step-N, to evaluate later.
        max_sequence_length: a T5 family's prompt length (None: TOY_T5_LENGTH); refused when it would truncate a
            toy caption, or for a family without T5. Recorded in toy_teacher.json; sample with the same length.
        lr_schedule, lr_final: "constant" after warm-up, or "cosine" decay to lr_final x lr at the last step.
        timestep_sampling, logit_normal: a flow family's sigma sampling, "logit-normal" (default, (mean, std) =
            logit_normal or (0, 1)) or "uniform"; refused for an eps-prediction family.
        init_from: a toy teacher folder of the same family and architecture to start from (its denoiser and text
            encoders, and its VAE unless vae_from is given): a continued run. The optimizer state starts afresh.
        arch: overrides of the family's toy architecture, {part: {config key: value}} (e.g. a wider transformer);
            recorded in toy_teacher.json, and taken from init_from's record when not given.
    Records the recipe and CPU seconds in out_dir/toy_teacher.json.
    """
    from diffusers import AutoencoderKL

    family_cls = get_family(family)
    if not family_cls.toy_arch:
        raise ConfigError(f"there is no toy teacher recipe for family {family!r}: give its family class a toy_arch and "
                          "the toy_* hooks (models.base.FamilyModel)")
    overrides = _arch_overrides(family_cls, arch, init_from)
    arch = {part: {**config, **overrides.get(part, {})} for part, config in family_cls.toy_arch.items()}
    out_dir = Path(out_dir)
    steps = family_cls.toy_defaults["steps"] if steps is None else steps
    batch_size = family_cls.toy_defaults["batch_size"] if batch_size is None else batch_size
    if keep_snapshots and not snapshot_every:
        raise ConfigError("keep_snapshots needs snapshot_every > 0 (the steps to snapshot at)")
    torch.manual_seed(seed)
    start, wall_start = time.process_time(), time.time()
    try:
        pipe = build_tiny_pipeline(family, seed, words=list(TOY_WORDS), sample_size=LATENT_SIZE, arch=arch,
                                   scheduler="ddim", model_max_length=MAX_TOKENS)
    except TypeError as err:  # a diffusers part given a key its constructor does not take
        raise ConfigError(f"arch {overrides}: {str(err).splitlines()[0]}") from err
    _check_arch_keys(pipe, overrides)
    pipe.scheduler = type(pipe.scheduler).from_config(family_cls.toy_scheduler_config())
    # The loss first: a sampling option the family's objective cannot take is refused before any training.
    loss_fn = family_cls.toy_loss_fn(pipe, timestep_sampling, logit_normal)
    check_lr_schedule(lr_schedule, lr_final)  # now, not after the VAE
    t5_length = _toy_t5_length(family_cls, max_sequence_length, pipe)
    record = {"family": family, "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
              "num_images": num_images, "caption_dropout": caption_dropout, "ema_decay": ema_decay}
    if lr_schedule != "constant":
        record.update(lr_schedule=lr_schedule, lr_final=lr_final)
    if overrides:
        record["arch"] = overrides
    if t5_length is not None:
        record["max_sequence_length"] = t5_length
    record.update(family_cls.toy_objective(timestep_sampling, logit_normal))
    if init_from is not None:
        record.update(init_from=str(init_from), init_steps=_load_weights_(pipe, family_cls, Path(init_from), t5_length))
        vae_from = init_from if vae_from is None else vae_from
    images, captions, _ = ToyWorld().sample(num_images, seed=seed)  # uint8: 3 KB an image

    # Stage 1: the autoencoder, and SD's scaling factor 1 / std(latents) so the denoiser sees unit-variance data.
    if vae_from is not None:
        pipe.vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae").eval().requires_grad_(False)
        record["vae_from"] = str(vae_from)
        if pipe.vae.config.latent_channels != arch["vae"]["latent_channels"]:
            raise ValueError(f"{vae_from}/vae has {pipe.vae.config.latent_channels} latent channels; the toy "
                             f"{family} denoiser reads {arch['vae']['latent_channels']}: use a toy VAE")
    else:
        record["vae_mse"] = train_vae(pipe.vae, images, vae_steps, vae_batch_size, vae_lr, kl_weight, seed, progress,
                                      full_steps=vae_steps // 5)
        record.update(vae_steps=vae_steps, vae_batch_size=vae_batch_size, vae_lr=vae_lr, kl_weight=kl_weight)
    family_cls.toy_prepare_vae(pipe.vae)
    latent_mean, latent_std = encode_posterior(pipe.vae, images)
    if vae_from is None:
        scaling_factor = float(1.0 / latent_mean.std())
        pipe.vae.register_to_config(scaling_factor=round(scaling_factor, 5))
    record["vae_seconds"] = round(time.process_time() - start, 1)

    # Stage 2: denoiser and text encoder(s), on the family's loss, with caption dropout.
    def save(step: int, loss: float | None = None, final: bool = False) -> None:
        save_toy_pipeline(pipe, out_dir, family)
        done = {**record, "steps_done": step, "cpu_seconds": round(time.process_time() - start, 1),
                "wall_seconds": round(time.time() - wall_start, 1)}
        if loss is not None:
            done["final_loss" if final else "loss_ema"] = loss
        (out_dir / "toy_teacher.json").write_text(json.dumps(done, indent=2) + "\n")
        if keep_snapshots and not final:
            shutil.copytree(out_dir, out_dir / "snapshots" / f"step-{step}",
                            ignore=shutil.ignore_patterns("snapshots"), dirs_exist_ok=True)
        if not progress:  # a log line per snapshot for background runs
            print(json.dumps({"step": step, "loss_ema": loss, "wall_seconds": done["wall_seconds"]}), flush=True)

    loss = train_denoiser(pipe, family, (latent_mean, latent_std), captions, steps, batch_size, lr, caption_dropout,
                          ema_decay, seed + 1, progress, snapshot=save, snapshot_every=snapshot_every,
                          t5_length=t5_length, loss_fn=loss_fn, lr_schedule=lr_schedule, lr_final=lr_final)
    save(steps, loss, final=True)
    return out_dir


def _arch_overrides(family_cls, arch: dict[str, dict] | None, init_from) -> dict[str, dict]:
    """The toy-architecture overrides of this run: `arch`, or those recorded by the init_from teacher (a continued run
    keeps its architecture); giving other ones than the teacher was trained with is refused."""
    recorded = {}
    info = Path(init_from) / "toy_teacher.json" if init_from is not None else None
    if info is not None and info.is_file():
        recorded = json.loads(info.read_text()).get("arch", {})
    if arch is None:
        arch = recorded
    elif init_from is not None and arch != recorded:
        raise ConfigError(f"arch {arch} differs from the {recorded or 'default'} architecture init_from {init_from} was "
                          "trained with: drop arch (a continued run keeps its teacher's)")
    unknown = sorted(set(arch) - set(family_cls.toy_arch))
    if unknown:
        raise ConfigError(f"arch names parts {unknown} the {family_cls.name} toy teacher does not have: use "
                          f"{sorted(family_cls.toy_arch)}")
    return {part: dict(config) for part, config in arch.items() if config}


def _check_arch_keys(pipe, overrides: dict[str, dict]) -> None:
    """An override key its part's class does not take is refused (transformers configs would keep it unused)."""
    import inspect

    for part, config in overrides.items():
        module = getattr(pipe, part)
        if hasattr(module, "config_class") and module.config_class is not None:  # transformers
            known = set(module.config_class().to_dict())
        else:  # diffusers: the constructor's arguments are the config
            known = set(inspect.signature(type(module).__init__).parameters) - {"self"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"arch {part}: {type(module).__name__} has no config key(s) {unknown}")


def _load_weights_(pipe, family_cls, folder: Path, t5_length: int | None) -> int | None:
    """Copy a toy teacher folder's denoiser and text-encoder weights into pipe (same family and architecture, else a
    one-line error); returns the steps it was trained for (its toy_teacher.json), None when it has no record."""
    info = folder / "toy_teacher.json"
    record = json.loads(info.read_text()) if info.is_file() else {}
    if record.get("family", family_cls.name) != family_cls.name:
        raise ConfigError(f"init_from {folder} is a {record['family']} toy teacher, not {family_cls.name}: start from "
                          f"a {family_cls.name} one")
    if record.get("max_sequence_length") != t5_length:
        raise ConfigError(f"init_from {folder} was trained at max_sequence_length {record.get('max_sequence_length')}, "
                          f"this run at {t5_length}: give --max-sequence-length {record.get('max_sequence_length')}")
    for name in (family_cls.denoiser_prefix, *(encoder for encoder, _, _, _ in family_cls.text_parts)):
        module = getattr(pipe, name)
        source = type(module).from_pretrained(folder, subfolder=name)
        try:
            module.load_state_dict(source.state_dict())
        except RuntimeError as err:
            raise ConfigError(f"{folder}/{name} does not fit the toy {family_cls.name} architecture (toy_arch): "
                              f"start from a teacher of this architecture ({str(err).splitlines()[0]})") from err
    return record.get("steps_done")


def toy_scheduler_config(family: str) -> dict:
    """The shipped scheduler's config: the family's toy hook (SD's DDIM schedule, or flow Euler at the toy's shift)."""
    return get_family(family).toy_scheduler_config()


def save_toy_pipeline(pipe, out_dir: Path, family: str) -> None:
    """save_pretrained, plus tokenizer vocab.json/merges.txt so every transformers version reads them."""
    pipe.scheduler = type(pipe.scheduler).from_config(toy_scheduler_config(family))
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for _, sub, _, tokenizer_class in get_family(family).text_parts:
        if tokenizer_class == "CLIPTokenizer":  # a T5 tokenizer saved itself (tokenizer.json)
            save_word_tokenizer(out_dir / sub, list(TOY_WORDS), MAX_TOKENS)


def _toy_t5_length(family_cls, length: int | None, pipe) -> int | None:
    """The T5 length a toy teacher trains at: TOY_T5_LENGTH by default; refused if a toy caption would not fit."""
    if family_cls.toy_t5_part is None:
        if length is not None:
            raise ConfigError(f"max_sequence_length={length}: the {family_cls.name} toy teacher has no T5 encoder; "
                              "drop it")
        return None
    length = TOY_T5_LENGTH if length is None else length
    need = longest_t5_caption(getattr(pipe, family_cls.text_parts[family_cls.toy_t5_part][1]))
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
