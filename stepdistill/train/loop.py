"""The one training loop: every method runs through here (DESIGN.md sec. 3).

One iteration = one student update followed by `critic_updates_per_student_update` critic updates, each over
`grad_accum` micro-batches. The loop owns reduction, gradient synchronisation across processes, clipping,
non-finite skipping, checkpoints and export; a method only returns per-sample losses.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config, ConfigError
from ..core.dist import Dist
from ..core.ema import StudentEMA
from ..core.lora import adapter_parameters
from ..core.lr import lr_factor
from ..data.prompts import collect_reports, summarize_reports
from ..errors import TrainingError
from ..methods.base import Batch, ExportStage, NoiseSource, ResetOptimizer
from . import checkpoint as ckpt
from .build import Built, build, precision_mode
from .faults import maybe_kill
from .rundir import RunLock, base_reference, check_reuse, record_run, timestamp, trim_log
from .shard import is_sharded
from .tracking import Tracking, learning_rates

log = logging.getLogger(__name__)

__all__ = ["Dist", "Trainer", "TrainingError", "train"]
CHECKPOINT_MARGIN_BYTES = 64 * 2**20  # RNG and data states, pickle overhead, the recipe: small, but not nothing


# ---- processes ----------------------------------------------------------------------------------------------

def check_launcher(environ, cfg: Config) -> None:
    """Refuse launcher settings this loop would otherwise ignore silently (`accelerate launch` only starts processes).

    The loop does its own data-parallel gradient sync of the LoRA tensors and never wraps a model, so an
    accelerate config asking for FSDP, DeepSpeed or Megatron would run as plain data parallelism; its
    mixed-precision and dynamo settings would not apply either. docs/scaling.md says what to use instead (for FSDP:
    model.shard=fsdp2, which shards the frozen base itself).
    """
    def on(key):
        return environ.get(key, "").lower() in ("1", "true", "yes")

    if on("ACCELERATE_USE_FSDP"):
        raise ConfigError(
            "this accelerate config asks for FSDP, which stepdistill does not use through accelerate (it never hands "
            "accelerate the model): launch with configs/accelerate/multi_gpu.yaml and set model.shard=fsdp2 to shard "
            "the frozen base; see docs/scaling.md"
        )
    for key, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                      ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):
        if on(key):
            raise ConfigError(
                f"this accelerate config asks for {what}, which stepdistill does not use: the frozen base is replicated "
                "and only LoRA tensors train, their gradients averaged by the loop itself. Launch with "
                "configs/accelerate/multi_gpu.yaml (or multi_node.yaml) instead; see docs/scaling.md"
            )
    precision = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in ("no", "bf16") or (precision == "bf16" and cfg.loop.mixed_precision == "no"):
        raise ConfigError(
            f"accelerate mixed_precision={precision} is not applied by stepdistill: launch with --mixed_precision no "
            "and set loop.mixed_precision (bf16 autocast, or bf16_pure) and model.dtype (frozen base) in the config"
        )
    if environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() != "no":
        raise ConfigError(
            "accelerate's dynamo_backend is not applied by stepdistill: launch with --dynamo_backend no and set "
            "model.compile=true in the config"
        )


def sync_gradients(params, dist: Dist) -> None:
    """Average this phase's gradients over processes in one flat all-reduce (every parameter, none skipped)."""
    if dist.world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_mean_(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        # A parameter without a gradient took no part in this phase (same code path on every process): leave it
        # None so the optimizer skips it, exactly as in a single process (a zero grad would still move it).
        if p.grad is not None:
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


# ---- one update ----------------------------------------------------------------------------------------------

def make_optimizer(params, lr, cfg: Config):
    """AdamW, fused wherever torch has the kernel (CUDA, and the CPU since torch 2.4): one kernel for every tensor
    instead of ~10 ops and a value read per tensor, and a skip decided on the device (apply_update)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                             eps=cfg.optim.eps, fused=_fusable(params))


def _fusable(params) -> bool:
    return bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)


def apply_update(params, optimizer, loss_finite: torch.Tensor, cfg: Config, dist: Dist):
    """Sync, check, clip and step. Returns (stepped, grad_norm) as device tensors: a non-finite step changes nothing.

    The skip is decided on the device: a fused optimizer is told through its `found_inf` (what GradScaler uses),
    so no value is read back here; the loop reads the flag once per iteration, with the logs.
    """
    sync_gradients(params, dist)
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"), foreach=True)
                 if params else torch.zeros((), device=loss_finite.device))
    finite = loss_finite & torch.isfinite(grad_norm)
    if dist.world > 1:  # skip on every process when any skips: the minimum of the flags
        flag = finite.float().reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = flag[0] > 0
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        # torch's fused AdamW writes the parameters without bumping their version counters (torch 2.14; foreach and
        # per-tensor steps do bump them). The fused LoRA path keys its bf16 compute copies on those counters: without
        # this the copies would keep the weights of the first forward for the whole run (no op, no sync).
        torch.autograd.graph.increment_version(params)
    elif bool(finite):  # an optimizer without a device-side skip: one read
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm.detach()


class Trainer:
    """Holds the run's state; `run()` trains to loop.max_steps, resuming from the latest checkpoint."""

    def __init__(self, cfg: Config, output_dir, dist: Dist | None = None):
        self.cfg, self.out = cfg, Path(output_dir)
        check_launcher(os.environ, cfg)
        self.dist = dist or Dist.from_env()
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.last_checkpoint: Path | None = None
        self.tracking = Tracking()
        self.lock: RunLock | None = None  # process 0's claim on the run folder
        self.claimed = False

    # -- the run folder: claimed and checked before anything is written in it --
    def claim_run_dir(self):
        """Lock the folder (process 0), refuse a config that cannot continue the run it holds, then record this one."""
        if self.claimed:  # every process returns here alike (the check below is a collective)
            return
        dist, busy = self.dist, None
        if dist.rank == 0:
            try:
                self.lock = RunLock(self.out).acquire()
            except ConfigError as e:
                busy = e
        if dist.any(busy is not None):
            raise busy or ConfigError(f"{self.out} is in use by another run: pass another --output-dir")
        mismatch = None
        try:
            check_reuse(self.cfg, self.out)  # every process reads; nothing is written before all have
        except ConfigError as e:
            mismatch = e
        if dist.any(mismatch is not None):
            self.release_run_dir()
            raise mismatch or ConfigError(f"{self.out} holds a run with another config (see process 0's message)")
        if dist.rank == 0:
            record_run(self.cfg, self.out)
        self.claimed = True

    def release_run_dir(self):
        if self.lock is not None:
            self.lock.release()

    # -- set-up --
    def setup(self, built: Built | None = None):
        """Build (or take `built`, models already in memory: the training benchmark) and resume."""
        cfg, dist = self.cfg, self.dist
        self.claim_run_dir()
        # The same seed on every process: adapters must start identical everywhere; per-sample randomness is
        # drawn for the global batch and sliced per process (NoiseSource), so nothing needs a per-rank seed.
        _seed_everything(cfg.seed)
        with collect_reports() as self.data_reports:
            self.built: Built = built or build(cfg, dist.device, dist.rank, dist.world, progress=cfg.loop.progress)
        if dist.rank == 0:
            (self.out / "data_report.json").write_text(json.dumps(self.data_reports, indent=1) + "\n")
        self._check_disk_space()
        self.ratio = self.built.distiller.critic_updates
        lr_critic = cfg.optim.critic_lr or cfg.optim.lr
        self.optimizers = {
            phase: make_optimizer(ps, cfg.optim.lr if phase == "student" else lr_critic, cfg)
            for phase, ps in self.built.params.items() if ps
        }
        self.base_lrs = {phase: opt.param_groups[0]["lr"] for phase, opt in self.optimizers.items()}
        # A function of the step alone (and of loop.max_steps), so a resumed run continues the same schedule.
        self.lr_factor = lr_factor(cfg.optim.lr_schedule, cfg.loop.max_steps, cfg.optim.warmup_steps,
                                   cfg.optim.lr_final)
        # The run facts a method reads (its RunContext): where the run lives, how long it is, the process group.
        ctx = self.built.ctx
        ctx.run_dir, ctx.max_steps, ctx.dist = self.out, cfg.loop.max_steps, dist
        self.autocast = _autocast(cfg, dist.device)
        # Same seed on every process: draws are made for the global batch and sliced (NoiseSource). On the training
        # device, so noise is drawn where it is used (no host draw and copy per call).
        self.noise_generator = torch.Generator(device=dist.device).manual_seed(cfg.seed)
        self.ema = (StudentEMA(adapter_parameters(self.built.nets.denoiser, "student"), cfg.loop.ema_decay)
                    if cfg.loop.ema_decay else None)
        self._resume()
        if dist.rank == 0:
            # Records past the resumed step were written after its checkpoint: the rerun logs those steps again.
            trim_log(self.out, self.step)

    def checkpoint_bytes(self) -> int:
        """What one checkpoint needs on disk: every LoRA tensor, plus AdamW's two moments per trainable tensor."""
        b = self.built
        lora = {id(p): p for n, p in b.nets.denoiser.named_parameters() if "lora_" in n}
        trainable = {id(p): p for ps in b.params.values() for p in ps}
        # Trainable tensors that are not LoRA (a GAN head) are saved as weights too.
        saved = {**lora, **trainable}
        return (sum(_nbytes(p) for p in saved.values()) + 2 * sum(_nbytes(p) for p in trainable.values())
                + CHECKPOINT_MARGIN_BYTES)

    def _check_disk_space(self):
        # Refuse now rather than hours later, when the first checkpoint would fail to write.
        need = self.checkpoint_bytes()
        # Only rank 0 creates the run folder: another process may not see it yet, so ask its nearest existing parent.
        where = next(p for p in (self.out, *self.out.absolute().parents) if p.exists())
        free = shutil.disk_usage(where).free
        if free < need:
            raise TrainingError(
                f"not enough free disk space for checkpoints in {self.out}: {free / 2**20:.0f} MiB free, one "
                f"checkpoint needs about {need / 2**20:.0f} MiB. Free some space or pass --output-dir on a larger "
                "disk (a smaller lora.rank also shrinks checkpoints)."
            )

    def _checkpoint_contents(self) -> tuple[list, list]:
        """What a checkpoint holds, named once for save and resume (as EDM2's CheckpointIO): (key, save, load) for
        the state every process shares (written by rank 0), then for each process's own."""
        b = self.built

        def set_(name):
            return lambda value: setattr(self, name, value)

        shared = [
            ("step", lambda: self.step, set_("step")),
            ("lora", self._lora_state, self._load_lora),
            ("optimizers", lambda: {phase: opt.state_dict() for phase, opt in self.optimizers.items()},
             self._load_optimizers),
            ("distiller", b.distiller.state_dict, b.distiller.load_state_dict),
            ("ema", lambda: self.ema.state_dict() if self.ema is not None else None, self._resume_ema),
            ("nonfinite_total", lambda: self.nonfinite_total, set_("nonfinite_total")),
            ("nonfinite_in_a_row", lambda: self.nonfinite_in_a_row, set_("nonfinite_in_a_row")),
        ]
        per_rank = [
            ("data", b.data.state_dict, b.data.load_state_dict),
            ("rng", ckpt.rng_state, ckpt.set_rng_state),
            ("noise", self.noise_generator.get_state, self._resume_noise),
        ]
        return shared, per_rank

    def _lora_state(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.built.nets.denoiser.named_parameters() if "lora_" in n}

    def _load_lora(self, saved: dict) -> None:
        lora = {n: p for n, p in self.built.nets.denoiser.named_parameters() if "lora_" in n}
        missing = set(lora) - set(saved)
        if missing:
            raise TrainingError(f"checkpoint {self._resuming} does not match this model ({len(missing)} adapter "
                                "tensors missing)")
        with torch.no_grad():
            for n, p in lora.items():
                p.copy_(saved[n])

    def _load_optimizers(self, saved: dict) -> None:
        for phase, opt in self.optimizers.items():
            opt.load_state_dict(saved[phase])

    def _resume(self):
        found = ckpt.load_latest(self.out / "checkpoints", self.dist.rank, self.dist.world)
        if found is None:
            return
        shared, per_rank, path = found
        self._resuming = path
        contents, own = self._checkpoint_contents()
        for key, _, load in contents:
            load(shared.get(key))  # .get: a checkpoint from before loop.ema_decay has no "ema"
        for key, _, load in own:
            load(per_rank[key])
        self.last_checkpoint = path
        if self.dist.rank == 0:
            log.info("resumed from %s (step %d)", path, self.step)

    def _resume_noise(self, state: torch.Tensor) -> None:
        path = self._resuming
        try:
            self.noise_generator.set_state(state)
        except RuntimeError:
            # A checkpoint written when the noise was drawn on the host (before issue 33): its generator state does
            # not fit a device generator. Training goes on with fresh draws, said aloud.
            log.warning("checkpoint %s holds a host noise-generator state; the device generator restarts from seed %d "
                        "+ step %d, so later draws differ from an uninterrupted run of the older version",
                        path, self.cfg.seed, self.step)
            self.noise_generator.manual_seed(self.cfg.seed + self.step)

    def _resume_ema(self, state: dict | None) -> None:
        if self.ema is None:
            return
        if state is None:  # loop.ema_decay turned on for a run that trained without it
            log.warning("checkpoint %s holds no student EMA: the average starts from its weights", self._resuming)
            self.ema = StudentEMA(self.ema.live, self.ema.decay)
            return
        self.ema.load_state_dict(state)

    # -- one iteration --
    def _phase(self, phase: str, loss_fn, batches):
        """Accumulate `loss_fn` over micro-batches, then one optimizer step for `phase`.

        Nothing is read back to the host here (on a GPU each read is a sync): logs stay tensors and the non-finite
        skip is decided on the device; `iteration` reads them all at once. `logs["<phase>_stepped"]` is the flag.
        """
        cfg, logs, outs = self.cfg, {}, []
        finite = torch.ones((), dtype=torch.bool, device=self.dist.device)
        for batch in batches:
            with self.autocast:
                out = loss_fn(batch)
            if out is None:
                return None, {}
            loss = out.loss.float().mean() / len(batches)
            finite = finite & torch.isfinite(loss)
            # A non-finite loss still back-propagates (its NaN gradients are never applied: the step is skipped).
            loss.backward()
            outs.append(out)
            for k, v in out.logs.items():
                v = v.detach() if torch.is_tensor(v) else v
                logs[k] = logs.get(k, 0.0) + v / len(batches)
        opt = self.optimizers.get(phase)
        if opt is None:
            return outs, logs
        # Set before every step from the base rate, never carried in the optimizer: a resumed optimizer's saved
        # param_group lr is overwritten here, so the rate follows the step and the method's restored state.
        lr = self.base_lrs[phase] * self.lr_factor(self.step) * self.built.distiller.lr_scale(phase)
        for g in opt.param_groups:
            g["lr"] = lr
        stepped, gnorm = apply_update(self.built.params[phase], opt, finite, cfg, self.dist)
        logs[f"{phase}_grad_norm"] = gnorm
        logs[f"{phase}_stepped"] = stepped
        return outs, logs

    def _batches(self):
        b = self.built
        noise = NoiseSource(self.noise_generator, self.dist.rank, self.dist.world, self.dist.device)
        out = []
        for _ in range(self.cfg.loop.grad_accum):
            prompts, cond, uncond, latents, sizes = b.data.next(self.dist.device)
            shape = (len(prompts), *b.ctx.latent_shape)
            real_cond = b.family.with_image_sizes(cond, sizes) if sizes is not None else None
            out.append(Batch(cond=cond, uncond=uncond, prompts=prompts, latent_shape=shape, latents=latents, noise=noise,
                             real_cond=real_cond))
        return out

    def iteration(self, read_logs: bool = True) -> dict:
        """One student update and its critic updates. Reads one tensor back to the host: whether each update was
        skipped (non-finite), and with `read_logs` every log value with it (otherwise the logs hold only those)."""
        stepped, logs = self.updates()
        flags, logs = _read_once([flag for _, flag in stepped], logs if read_logs else {})
        logs = self.dist.mean_logs(logs)
        # <phase>_skipped: the share of that phase's updates skipped this iteration (absent when none was).
        for phase in dict.fromkeys(p for p, _ in stepped):
            oks = [ok for (p, _), ok in zip(stepped, flags) if p == phase]
            if not all(oks):
                logs[f"{phase}_skipped"] = oks.count(False) / len(oks)
        skipped = not all(flags)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        self.nonfinite_total += int(skipped)
        logs["nonfinite_steps"] = self.nonfinite_total
        return logs

    def updates(self) -> tuple[list, dict]:
        """The updates of one iteration, nothing read back: ([(phase, stepped flag)], logs), all device tensors (the
        memory estimate, bench/mem_estimate.py, runs this on fake tensors, whose values cannot be read)."""
        b, step = self.built, self.step
        batches = self._batches()
        outs, logs = self._phase("student", lambda batch: b.distiller.student_loss(b.nets, batch, step), batches)
        maybe_kill("mid-step", step + 1)
        outs = outs or [None] * len(batches)  # None: the method froze the student this step (e.g. DisBack stage 1)
        stepped = [("student", logs.pop("student_stepped"))] if "student_stepped" in logs else []
        # Critic updates: the first gets what each micro-batch's student update left for it (its detached samples),
        # later ones draw fresh batches.
        for i in range(self.ratio):
            first = [o and o.critic_inputs for o in outs]
            pairs = list(zip(batches, first)) if i == 0 else [(bt, None) for bt in self._batches()]
            it = iter(pairs)
            _, clogs = self._phase("critic", lambda batch, it=it: b.distiller.critic_loss(b.nets, *next(it)), [p[0] for p in pairs])
            if "critic_stepped" in clogs:
                stepped.append(("critic", clogs.pop("critic_stepped")))
            for k, v in clogs.items():
                logs[k] = logs.get(k, 0.0) + v / self.ratio
        if self.ema is not None:  # before after_step: a stage export there writes the average
            self.ema.update()
        for event in b.distiller.after_step(b.nets, step):
            self._carry_out(event)
        return stepped, logs

    # -- the run --
    def run(self) -> Path:
        try:
            return self._run()
        except torch.cuda.OutOfMemoryError as e:
            raise TrainingError(self._oom_message(e)) from e
        except KeyboardInterrupt as e:
            then = ("Rerun the same command to resume from it" if self.last_checkpoint else
                    "Rerun the same command to start again")
            raise RunInterrupted(f"interrupted at step {self.step}; last checkpoint: "
                                 f"{self.last_checkpoint or 'none yet'}. {then}") from e

    def _oom_message(self, err) -> str:
        cfg = self.cfg
        first = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
        return (
            f"out of GPU memory at step {self.step + 1} ({first[:200]}). To use less memory: "
            f"data.batch_size={max(1, cfg.data.batch_size // 2)} (now {cfg.data.batch_size}) with "
            f"loop.grad_accum={cfg.loop.grad_accum * 2} to keep the effective batch, "
            f"model.gradient_checkpointing=true (now {str(cfg.model.gradient_checkpointing).lower()}), "
            f"lora.rank={max(1, cfg.lora.rank // 2)} (now {cfg.lora.rank}), or a smaller model.resolution "
            f"(now {cfg.model.resolution or 'the model default'}). Last good checkpoint: "
            f"{self.last_checkpoint or 'none'}; rerunning the same command resumes from it."
        )

    def _run(self) -> Path:
        self.claim_run_dir()
        self.tracking = Tracking.start(self.cfg, self.out, self.dist.rank)
        self.setup()
        cfg, dist = self.cfg, self.dist
        log_file = self.out / "log.jsonl"
        # The first update of a process carries one-off work (dmd's teacher ODE pairs, compilation): it gets its own
        # bar, so the training bar's ETA starts after it instead of extrapolating it over every step.
        bar = self._bar("first update (one-off set-up)")
        first_step = self.step
        t0, steps0 = time.perf_counter(), self.step
        while self.step < cfg.loop.max_steps:
            # Logs are read back (a sync on a GPU) only when something shows them; the same choice on every process.
            upcoming = self.step + 1
            logs = self.iteration(read_logs=cfg.loop.progress or upcoming % cfg.loop.log_every == 0
                                  or upcoming == cfg.loop.max_steps)
            self.step += 1
            maybe_kill("step", self.step)
            if self.nonfinite_in_a_row >= cfg.loop.max_nonfinite_in_a_row:
                raise TrainingError(
                    f"{self.nonfinite_in_a_row} non-finite steps in a row (loss or gradients NaN/inf) up to step "
                    f"{self.step}; last good checkpoint: {self.last_checkpoint or 'none (no checkpoint yet)'}. "
                    "Lower optim.lr, set optim.grad_clip, or check the data, then rerun the same command to resume "
                    "from that checkpoint."
                )
            rate = (self.step - steps0) / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            # An update without a student loss (tscd_unified's critic-only warm-up) shows its critic loss, not NaN.
            shown = next(((k, logs[k]) for k in ("loss", "fake_score_loss", "critic_loss") if k in logs), None)
            bar.set_postfix(**({shown[0]: f"{shown[1]:.4g}"} if shown else {}), it_s=f"{rate:.2f}")
            if self.step == first_step + 1:
                bar.close()
                bar = self._bar(f"train {cfg.method.name}")
                t0, steps0 = time.perf_counter(), self.step
            if dist.rank == 0 and (self.step % cfg.loop.log_every == 0 or self.step == cfg.loop.max_steps):
                record = {"step": self.step, "time": timestamp(), "it_per_s": rate, **learning_rates(self.optimizers),
                          **_jsonable(logs)}
                with open(log_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
                self.tracking.log(record)
            if cfg.loop.sample_every and self.step % cfg.loop.sample_every == 0 and (dist.rank == 0 or self.sharded):
                path = self.write_samples()  # a sharded base's forward is a collective: every process runs it
                if dist.rank == 0:
                    self.tracking.log_image(self.step, path)
            if self.step % cfg.loop.checkpoint_every == 0 or self.step == cfg.loop.max_steps:
                self.save_checkpoint()
        bar.close()
        final = self.export_stage("final", None)
        self.tracking.close()
        self.built.data.sync_report()  # a stream counts the bad records it read (every process)
        dist.barrier()
        if dist.rank == 0:
            (self.out / "data_report.json").write_text(json.dumps(self.data_reports, indent=1) + "\n")
            self._report_data()
        return final

    def _bar(self, desc: str):
        return tqdm(total=self.cfg.loop.max_steps, initial=self.step, desc=desc, dynamic_ncols=True,
                    disable=not (self.cfg.loop.progress and self.dist.rank == 0))

    def _report_data(self):
        """Repeat at the end what the data readers skipped or cut: the warnings at the start have scrolled away."""
        problems = ("skipped_count", "empty_lines", "undecodable_lines", "truncated", "truncated_by_tokenizer")
        if any(r.get(k) for r in self.data_reports for k in problems):
            log.warning("data: %s (details in %s)", summarize_reports(self.data_reports), self.out / "data_report.json")

    def save_checkpoint(self):
        contents, own = self._checkpoint_contents()
        shared = {key: save() for key, save, _ in contents}
        per_rank = {key: save() for key, save, _ in own}
        try:
            self.last_checkpoint = ckpt.save_checkpoint(
                self.out / "checkpoints", self.step, shared, per_rank, self.dist.rank, self.dist.world,
                self.dist.barrier, self.cfg.loop.keep_last,
            )
        except (OSError, RuntimeError) as e:
            # torch.save reports a full disk as a RuntimeError ("PytorchStreamWriter failed writing file"); other
            # RuntimeErrors are not about the disk and pass through.
            if isinstance(e, RuntimeError) and not _is_write_failure(e):
                raise
            raise TrainingError(
                f"could not write the checkpoint of step {self.step} ({type(e).__name__}: {e}); last good checkpoint: "
                f"{self.last_checkpoint or 'none'}. Free disk space (or fix the output folder), then rerun the same "
                "command to resume from it."
            ) from e

    def _carry_out(self, event) -> None:
        """What a method's after_step asked for."""
        if isinstance(event, ExportStage):
            # after_step ends update self.step + 1 (run() counts it just after), so the export belongs to that step.
            self.export_stage(event.name, event.recipe_overrides, step=self.step + 1)
        elif isinstance(event, ResetOptimizer):
            if event.phase not in self.built.params:
                raise TypeError(f"{type(self.built.distiller).__name__}.after_step asked to reset the optimizer of phase "
                                f"{event.phase!r}; the phases are {sorted(self.built.params)}")
            if event.phase in self.optimizers:  # a phase without parameters has no optimizer state to forget
                self.optimizers[event.phase].state.clear()
        else:
            raise TypeError(f"{type(self.built.distiller).__name__}.after_step returned {event!r}, not an event the "
                            "loop knows (stepdistill.methods.base.Event)")

    def export_stage(self, name: str, recipe_overrides: dict | None, step: int | None = None) -> Path:
        """Write DIR/<name>/ (LoRA files + recipe) atomically from the student adapter after `step` updates (its
        moving average with loop.ema_decay)."""
        from ..card import write_model_card
        from ..core.io import atomic_dir
        from ..core.lora import adapter_state_dict
        from ..core.recipe import Recipe
        from ..export import KOHYA_WEIGHT_NAME, save_diffusers_lora, save_kohya_lora

        out = self.out / name
        if self.dist.rank != 0:
            return out
        cfg, b = self.cfg, self.built
        step = self.step if step is None else step
        live = self.ema.shadow if self.ema is not None else adapter_state_dict(b.nets.denoiser, "student")
        state = {k: v.detach().float().cpu() for k, v in live.items()}
        rank, alpha = cfg.lora.rank, cfg.lora.effective_alpha
        with atomic_dir(out) as tmp:
            # The diffusers file is always written: it is what `stepdistill export` converts from.
            save_diffusers_lora(state, tmp, rank, alpha, b.targets, prefix=b.family.denoiser_prefix)
            if "kohya" in cfg.export.formats and b.family.kohya_tensors(state, rank, alpha) is not None:
                # Families whose pipeline loads no kohya layout (sd3) keep the diffusers file only.
                save_kohya_lora(state, tmp / KOHYA_WEIGHT_NAME, rank, alpha, layout=b.family.kohya_tensors)
            fields = b.distiller.recipe(b.family)
            fields.update(recipe_overrides or {})
            Recipe(
                base_model=base_reference(str(cfg.model.path)), family=b.family.name, method=cfg.method.name,
                lora_rank=rank, lora_alpha=alpha, training_steps=step,
                size_conditioning=b.family.size_conditioning(),
                max_sequence_length=getattr(b.family, "t5_max_length", None), **b.family.recipe_size(), **fields,
            ).save(tmp)
            write_model_card(tmp, run_dir=self.out, lora_ref=out)
            maybe_kill("export", step)
        if "merged" in cfg.export.formats:
            from ..export import export_lora

            export_lora(out, "merged", out / "merged")
        return out

    @property
    def sharded(self) -> bool:
        return is_sharded(self.built.nets.denoiser)

    @torch.no_grad()
    def write_samples(self, n: int = 4):
        """samples/step-NNNNNN.png: the student on the run's first prompts and fixed noise, watched over training
        (written by rank 0; None elsewhere, where only a sharded base makes the other processes take part)."""
        from torchvision.utils import save_image

        b = self.built
        prompts, cond = b.data.first_encoded(n)
        cond = cond.to(self.dist.device)
        g = torch.Generator().manual_seed(self.cfg.seed)
        x_T = torch.randn((len(prompts), *b.ctx.latent_shape), generator=g).to(self.dist.device)
        latents = b.distiller.sample(b.nets, cond, x_T, generator=g)
        if self.dist.rank != 0:
            return None
        images = b.family.decode(latents).float().clamp(-1, 1) * 0.5 + 0.5
        (self.out / "samples").mkdir(exist_ok=True)
        path = self.out / "samples" / f"step-{self.step:06d}.png"
        save_image(images.cpu(), path, nrow=len(prompts))
        return path

    def close(self):
        self.release_run_dir()
        self.tracking.close()
        built = getattr(self, "built", None)  # set-up may have failed before the data existed
        if built is not None:
            built.data.close()  # a stream's prefetch thread
        if self.dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class RunInterrupted(TrainingError):
    """Ctrl-C (KeyboardInterrupt) during a run; the message says rerunning resumes."""


def _is_write_failure(e: RuntimeError) -> bool:
    text = str(e)
    return "PytorchStreamWriter" in text or "file write failed" in text or "inline_container" in text


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _read_once(flags: list, logs: dict) -> tuple[list[bool], dict]:
    """The update flags and the tensor logs, read back to the host in ONE transfer (one sync on a GPU)."""
    keys = [k for k, v in logs.items() if torch.is_tensor(v)]
    tensors = [torch.as_tensor(f).reshape(()).double() for f in flags] + [logs[k].reshape(()).double() for k in keys]
    if not tensors:
        return [], logs
    values = torch.stack([t.to(tensors[0].device) for t in tensors]).tolist()
    read = {**logs, **dict(zip(keys, values[len(flags):]))}
    return [v > 0 for v in values[: len(flags)]], read


def _jsonable(logs: dict) -> dict:
    return {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in logs.items()
            if not (isinstance(v, float) and math.isnan(v))}


def _seed_everything(seed: int):
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(cfg: Config, device):
    """bf16 autocast where loop.mixed_precision resolves to bf16 (build.precision_mode); none for no, and none for
    bf16_pure (auto on a GPU), where the base and the activations are bf16 themselves and autocast would only add casts
    around the norms."""
    import contextlib

    if precision_mode(cfg, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: Config, output_dir) -> Path:
    """Train (or resume) the run in `output_dir`; returns the final export folder."""
    trainer = Trainer(cfg, output_dir)
    try:
        return trainer.run()
    finally:
        trainer.close()
