"""Shared helpers for the tiny end-to-end tests: run the CLI in a subprocess, compare LoRA files, rebuild a run."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..unit.tolerances import rounding_atol

ROOT = Path(__file__).resolve().parents[2]


def cli_env(**extra) -> dict:
    # One thread everywhere: runs that must be bit-identical must also reduce in the same order.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("STEPDISTILL_KILL_AT", None)
    env.update({k: v for k, v in extra.items()})
    return env


def run_cli(args, check=True, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from stepdistill.cli import main; sys.exit(main())", *map(str, args)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"stepdistill {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_args(config, out, model, prompts, *sets):
    args = ["train", "--config", ROOT / config, "--output-dir", out, "--set", f"model.path={model}",
            "--set", f"data.prompts={prompts}", "--set", "loop.progress=false"]
    for s in sets:
        args += ["--set", s]
    return args


def lora_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "pytorch_lora_weights.safetensors"))


def assert_same_lora(a, b):
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs"


def assert_base_unchanged(unet, model_dir):
    """Every frozen base weight of a trained (PEFT-wrapped) UNet equals the one on disk, bit for bit."""
    from diffusers import UNet2DConditionModel

    fresh = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").state_dict()
    base = {n.replace(".base_layer", ""): p for n, p in unet.state_dict().items() if "lora_" not in n}
    assert base.keys() == fresh.keys()
    for k in fresh:
        assert torch.equal(base[k], fresh[k]), f"base weight {k} changed"


def student_latents(built, prompt: str, seed: int = 7):
    """The trainer's own sampler on one prompt from a fixed x_T: (latents, cond, x_T)."""
    cond = built.family.encode_prompts([prompt])
    x_T = torch.randn((1, *built.ctx.latent_shape), generator=torch.Generator().manual_seed(3))
    return built.distiller.sample(built.nets, cond, x_T, generator=torch.Generator().manual_seed(seed)), cond, x_T


def fresh_pipeline(pipe_cls, base_dir, lora_dir, weight_name=None):
    """A fresh diffusers pipeline from base_dir with the exported LoRA and its recipe's scheduler: (pipe, recipe)."""
    from stepdistill.core.recipe import Recipe

    pipe = pipe_cls.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    recipe = Recipe.load(lora_dir)
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    return pipe, recipe


def run_pipeline(pipe, recipe, prompt: str, x_T, steps: int | None = None, seed: int = 7):
    """`pipe` from the student's x_T (B, C, h, w) with the recipe's call arguments; latents back in (B, C, h, w)."""
    from stepdistill.models.registry import get_family

    family = get_family(recipe.family)
    h, w = x_T.shape[-2:]
    factor = getattr(pipe, "vae_scale_factor", None) or pipe.vae_scale_factor_spatial
    kwargs = {"height": h * factor, "width": w * factor}
    # A recipe that records its size for its sigmas (FLUX) must agree with the student's latents; a recipe's own size
    # conditioning (Qwen-Image, Wan) wins over the size of x_T.
    assert {k: recipe.size_kwargs().get(k, v) for k, v in kwargs.items()} == kwargs, (recipe.size_kwargs(), kwargs)
    kwargs.update(recipe.call_kwargs(pipe.scheduler))
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    out = pipe(prompt=[prompt], latents=family.to_pipeline_latents(x_T.clone()),
               generator=torch.Generator().manual_seed(seed), output_type="latent", return_dict=False, **kwargs)[0]
    return family.from_pipeline_latents(out, h, w)


def pipeline_latents(pipe_cls, base_dir, lora_dir, prompt: str, x_T, steps: int | None = None, seed: int = 7):
    """A fresh diffusers pipeline from base_dir with the exported LoRA and its recipe's scheduler, from x_T."""
    pipe, recipe = fresh_pipeline(pipe_cls, base_dir, lora_dir)
    return run_pipeline(pipe, recipe, prompt, x_T, steps, seed)


def applied_lora_layers(denoiser) -> int:
    """How many layers of a pipeline's denoiser carry a loaded LoRA."""
    return sum(1 for m in denoiser.modules() if hasattr(m, "lora_A") and len(m.lora_A))


def lora_file_modules(path) -> set[str]:
    """The modules a LoRA file holds tensors for (diffusers keys: `<module>.lora_A.weight`...)."""
    return {k.rsplit(".lora_", 1)[0] for k in load_file(str(path))}


def gan_batch(built, latents=True):
    """The next batch of a built run, with random real latents (what data.images supplies) unless latents=False."""
    from stepdistill.methods.base import Batch

    prompts, cond, uncond, _, _ = built.data.next()
    shape = (len(prompts), *built.ctx.latent_shape)
    return Batch(cond=cond, uncond=uncond, prompts=prompts, latent_shape=shape,
                 latents=torch.randn(shape) if latents else None)


def grads_reached(built, adapters=("student", "fake_score")) -> dict[str, bool]:
    """Which of the adapters and the distiller's head hold a non-zero gradient."""
    from stepdistill.core.lora import adapter_parameters

    unet, head = built.nets.denoiser, built.distiller.head
    groups = {name: adapter_parameters(unet, name).values() for name in adapters}
    groups["head"] = head.parameters()
    return {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps) for name, ps in groups.items()}


def zero_grads(built):
    for p in list(built.nets.denoiser.parameters()) + list(built.distiller.head.parameters()):
        p.grad = None


def randomise_lora_b(unet, std: float = 0.05):
    """Non-zero lora_B everywhere, so that every adapter affects the output and receives gradients."""
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)


def assert_gan_gradients_reach_only_their_phase(built):
    """A dmd run with method.gan=true: the generator's GAN term moves only the student, the discriminator's only the
    fake score and the head (which the critic optimiser holds)."""
    distiller = built.distiller
    assert set(map(id, built.params["critic"])) >= set(map(id, distiller.head.parameters()))
    zero_grads(built)
    out = distiller.student_loss(built.nets, gan_batch(built), step=0)
    out.loss.mean().backward()
    assert "gan_g_loss" in out.logs and math.isfinite(out.logs["gan_g_loss"])
    assert grads_reached(built) == {"student": True, "fake_score": False, "head": False}
    zero_grads(built)
    out = distiller.critic_loss(built.nets, gan_batch(built), out.samples)
    out.loss.mean().backward()
    assert "gan_d_loss" in out.logs and math.isfinite(out.logs["gan_d_loss"])
    assert grads_reached(built) == {"student": False, "fake_score": True, "head": True}
    zero_grads(built)


REFERENCE_LORAS = ROOT / "tests" / "tiny" / "reference_loras.json"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes in name order (the file's byte layout may differ)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def lora_file_digests(folder) -> dict[str, str]:
    """The tensors digest of every .safetensors file in an export folder, by file name."""
    return {p.name: tensors_digest(load_file(str(p))) for p in sorted(Path(folder).glob("*.safetensors"))}


def assert_matches_reference(run: str, folder):
    """The exported files of a tiny run are byte-identical to those the same run wrote before the package's
    files were moved (issue 32): a refactor that changes what training writes must say so and refresh the digests
    (STEPDISTILL_REFRESH_REFERENCES=1). Refreshed twice since: issue 33's fused AdamW and fused LoRA path round in
    another order (same maths, other last bits), and so does its fused q/k/v projection (one GEMM for three; compared
    with the digests before it, every tensor of the dmd export agreed to 0.2% of its largest element except the
    ResNets' time_emb_proj B factors: the tiny UNet's norm2 has one channel per group, which removes the per-channel
    time embedding, so their true gradient is zero and what they hold is rounding noise that Adam scales to +-lr)."""
    import json
    import os

    references = json.loads(REFERENCE_LORAS.read_text())
    if os.environ.get("STEPDISTILL_REFRESH_REFERENCES") == "1":  # after a change meant to alter what training writes
        references[run] = lora_file_digests(folder)
        REFERENCE_LORAS.write_text(json.dumps(references, indent=1, sort_keys=True) + "\n")
    expected = references[run]
    assert lora_file_digests(folder) == expected, f"{run}: the exported LoRA files differ from {REFERENCE_LORAS.name}"


def schedule_index(schedule, t: torch.Tensor, among: int | None = None) -> int:
    """The training-table index of a timestep the pipeline's scheduler stepped at: a DDPM scheduler's integer t as it
    is; a flow scheduler's float32 t = T sigma found, bit for bit, among the pipeline timesteps of the student's
    schedule (FlowSchedule.pipeline_timestep) -- a pipeline step off that table is one the student was never trained at."""
    t = torch.as_tensor(t).reshape(())
    if not hasattr(schedule, "pipeline_timestep"):  # a DDPM table: the scheduler's integer t is the index
        return int(t)
    # Flow: SD3 / FLUX step at float32 T sigma; Wan's UniPC at an int64 trunc(T sigma), not the table index.
    table = schedule.pipeline_timestep(torch.arange(schedule.num_train_timesteps))
    hits = (table.to(t.dtype) == t).nonzero().flatten() if not t.is_floating_point() else (
        table == t.float()).nonzero().flatten()
    if len(hits) > 1 and among is not None:  # Wan's truncated timesteps repeat near t = T: the one trained at, if on it
        assert among in hits.tolist(), f"the pipeline stepped at t = {float(t)!r}, which index {among} does not map to"
        return among
    assert len(hits) == 1, f"the pipeline stepped at t = {float(t)!r}, not on the student's schedule"
    return int(hits[0])


def network_cond(kwargs: dict):
    """The Cond of one recorded pipeline call to the denoiser: the text sequence and the family's added inputs
    (SDXL's added_cond_kwargs, SD3 / FLUX pooled projections, Qwen-Image's text mask)."""
    from stepdistill.core.denoiser import Cond

    text = kwargs["encoder_hidden_states"]
    added = kwargs.get("added_cond_kwargs")
    if added is None:
        added = {k: kwargs[k] for k in ("pooled_projections", "encoder_hidden_states_mask") if kwargs.get(k) is not None}
    if "encoder_hidden_states_mask" in kwargs and kwargs["encoder_hidden_states_mask"] is None:
        # QwenImagePipeline drops a mask that keeps every token; the family's call always passes one.
        added["encoder_hidden_states_mask"] = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
    return Cond(text, added or None)


def assert_bf16_student_equals_the_pipeline(built, base_dir, lora_dir, prompt: str) -> list[int]:
    """Base and adapters in bf16: at each step of the recipe, the stock pipeline's denoiser output equals the
    training-time student's (a Denoiser as train/build.py makes it, in bf16, with the family's network call and
    network timestep) on the latents, conditioning and schedule step the pipeline has there, and those steps are the
    ones the training-time sampler runs the student at. Returns them.

    Both sides run the LoRA through PEFT (the fused training path rounds the low-rank product in its own order:
    tests/unit/test_fused_lora.py) and the pipeline's attention kernels, so only the timestep and the conditioning
    the network is told can differ, and those move a bf16 output by many rounding units."""
    from stepdistill.core.denoiser import Denoiser
    from stepdistill.core.lora import use_fused_lora

    bf16, family = torch.bfloat16, built.family
    pipe, recipe = fresh_pipeline(family.pipeline_class, base_dir, lora_dir)
    pipe.to(bf16)
    calls, steps = [], []

    def record(module, args, kwargs, out):
        sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        calls.append((sample.detach(), kwargs, out[0].detach()))

    net = getattr(pipe, family.denoiser_prefix)
    net.register_forward_hook(record, with_kwargs=True)
    scheduler_step = pipe.scheduler.step

    def step(model_output, timestep, *args, **kwargs):
        steps.append(timestep)
        return scheduler_step(model_output, timestep, *args, **kwargs)

    pipe.scheduler.step = step
    # The timesteps the training-time sampler runs the student at (its Denoiser's every network call).
    trained_at, view = [], built.nets.student
    inputs = view.network_inputs

    def spy(x_t, t, cond):
        trained_at.append(int(torch.as_tensor(t).reshape(-1)[0]))
        return inputs(x_t, t, cond)

    view.network_inputs = spy
    try:
        _, _, x_T = student_latents(built, prompt)
    finally:
        del view.network_inputs
    run_pipeline(pipe, recipe, prompt, x_T.to(bf16))
    assert len(calls) == len(steps) == recipe.num_inference_steps, (len(calls), len(steps), recipe.num_inference_steps)

    unet = copy.deepcopy(built.nets.denoiser).to(bf16)
    use_fused_lora(unet, False)
    if family.attention_backends:
        unet.set_attn_processor(dict(net.attn_processors))
    student = Denoiser(unet, built.nets.schedule, "student", dtype=bf16, call=family.denoiser_call,
                       network_timestep=family.network_timestep)
    h, w = x_T.shape[-2:]
    visited = []
    for i, ((sample, kwargs, theirs), t_pipe) in enumerate(zip(calls, steps)):
        t = schedule_index(built.nets.schedule, t_pipe, among=trained_at[i] if i < len(trained_at) else None)
        visited.append(t)
        with torch.no_grad():
            ours = student.raw(family.from_pipeline_latents(sample, h, w), t, network_cond(kwargs))
        theirs = family.from_pipeline_latents(theirs, h, w).float()
        tol = rounding_atol(bf16, theirs.abs().max().item())
        err = (ours.float() - theirs).abs().max().item()
        assert err <= tol, f"t={t}: the student's bf16 output is {err:.3g} from the pipeline's (> {tol:.3g})"
    assert visited == trained_at, (visited, trained_at)
    return visited
