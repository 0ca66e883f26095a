"""Distribution Backtracking distillation (DisBack; Zhang et al., arXiv 2408.15991) as a schedule over `dmd`.

Stage 1, degradation recording: the initial student G0 is frozen (the student adapter as distribution matching would
start it: at zero, i.e. the teacher read as a one-step generator, or after DMD's regression warm-up when that is on).
An auxiliary score, the fake_score adapter on the frozen teacher base, starts as the teacher and learns G0's samples
with the denoising loss (t ~ U[0, T), prompt dropout so that its unconditional branch moves too). Every `interval`
iterations its LoRA is saved as a node, RUN/nodes/node-XX.safetensors. Node 0 is the teacher itself (no adapter);
node N, the last, fits G0's distribution.

Stage 2, backtracking: `dmd` (its losses, unchanged) with the fake score started from node N and the "real" score
of the DM gradient, the target, walking the nodes back: N-1, ..., 1, then the teacher (node 0) until the end. The
target is a third adapter, "target" (the critic's rank), that each node is loaded into strictly: every key must
match and the target's output must move away from the teacher's, or the load raises. The released DisBack code
switches with a strict=False load whose keys never match, so its target stays the teacher and the run is DMD2
(docs/disback.md).

The phases follow the step alone (plus, for the adaptive switch, distiller.state_dict()), so a rerun resumes
anywhere, across the stage boundary included. num_nodes = 0 makes the path the teacher alone: the same code then
runs plain `dmd`, the paper's baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from ..core.denoiser import Cond, Denoiser, DenoiserOut, GuidedDenoiser, cfg_combine, uncond_for
from ..core.io import atomic_write_text
from ..core.lora import adapter_config, adapter_state_dict, load_adapter_state_dict
from ..errors import ConfigError
from ..registry import register_method
from .base import Batch, Event, LossOut, Nets, RunContext
from .dm import fake_score_loss
from .dmd import DMDConfig, DMDDistiller

log = logging.getLogger(__name__)

NODES_DIR = "nodes"
MANIFEST = "nodes.json"
SWITCH_RULES = ("fixed", "adaptive")
NODE_GUIDANCE = ("node", "teacher_uncond", "ramp")


class NodeError(RuntimeError):
    """A node that cannot serve as a target: missing, altered since it was recorded, or changing nothing."""


@dataclass
class DisBackConfig(DMDConfig):
    name: str = "disback"
    num_nodes: int = 8  # nodes recorded in stage 1 besides node 0 (the teacher); 0 = plain dmd (the baseline)
    interval: int = 100  # stage-1 iterations per node; each makes critic_updates_per_student_update aux updates
    prompt_dropout: float = 0.1  # stage 1: fraction of prompts the auxiliary score sees as the empty prompt
    steps_per_node: int = 100  # stage 2: student updates against each intermediate node (adaptive: at most)
    switch: str = "fixed"  # fixed | adaptive (move on early once the DM loss stops falling)
    switch_patience: int = 20  # adaptive: student updates without a new low of the smoothed DM loss
    switch_tolerance: float = 0.02  # adaptive: a new low must lie this much (relative) below the previous one
    switch_smoothing: float = 0.9  # adaptive: EMA decay applied to the DM loss before looking for lows
    node_guidance: str = "node"  # CFG of intermediate nodes: node | teacher_uncond | ramp (docs/disback.md)
    lr_scale_after_teacher: float = 1.0  # student lr factor from the first update against the teacher (node 0) on

    def validate(self):
        super().validate()
        for key, low in (("num_nodes", 0), ("interval", 1), ("steps_per_node", 1), ("switch_patience", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"method.{key} must be >= {low} (got {getattr(self, key)})")
        if not (self.lr_scale_after_teacher > 0 and math.isfinite(self.lr_scale_after_teacher)):
            raise ConfigError(f"method.lr_scale_after_teacher must be a finite number > 0, 1 = unchanged "
                              f"(got {self.lr_scale_after_teacher})")
        for key in ("prompt_dropout", "switch_tolerance", "switch_smoothing"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be in [0, 1) (got {getattr(self, key)})")
        if self.switch not in SWITCH_RULES:
            raise ConfigError(f"method.switch must be one of {list(SWITCH_RULES)} (got {self.switch!r})")
        if self.node_guidance not in NODE_GUIDANCE:
            raise ConfigError(f"method.node_guidance must be one of {list(NODE_GUIDANCE)} (got {self.node_guidance!r})")
        if self.switch == "adaptive" and self.generator_loss != "dmd":
            raise ConfigError("method.switch=adaptive watches the DMD loss (the normalised fake/target discrepancy): "
                              "use it with method.generator_loss=dmd, or set method.switch=fixed")


# ---- the path: which phase a step is in, which node is recorded or targeted -------------------------------------

@dataclass(frozen=True)
class BacktrackPath:
    """DisBack's schedule in iterations (loop steps, 0-based). Stage 0: DMD's regression warm-up, when on, so that
    stage 1 records towards the student distribution matching actually starts from; stage 1: recording; stage 2:
    backtracking. Without nodes there is no stage 0 or 1: stage 2 is plain dmd, warm-up included."""

    regression_steps: int
    num_nodes: int
    interval: int
    steps_per_node: int

    @property
    def record_start(self) -> int:
        return self.regression_steps if self.num_nodes else 0

    @property
    def record_end(self) -> int:
        """First iteration of stage 2."""
        return self.record_start + self.num_nodes * self.interval

    @property
    def teacher_step(self) -> int:
        """First iteration against the teacher under the fixed rule."""
        return self.record_end + max(self.num_nodes - 1, 0) * self.steps_per_node

    def stage(self, step: int) -> int:
        if step >= self.record_end:
            return 2
        return 1 if step >= self.record_start else 0

    def node_done(self, step: int) -> int | None:
        """The node whose recording iteration `step` completes, if any (nodes 1..N)."""
        done = step + 1 - self.record_start
        return done // self.interval if self.stage(step) == 1 and done % self.interval == 0 else None

    def fixed_target(self, step: int) -> int:
        """Node targeted at stage-2 iteration `step` by the fixed rule: N-1 first, one node back every steps_per_node."""
        walked = (step - self.record_end) // self.steps_per_node
        return max(self.num_nodes - 1 - walked, 0)


def node_guidance_scale(policy: str, guidance_scale: float, node: int, num_nodes: int) -> float:
    """CFG scale used on node `node`: `ramp` grows linearly from 1 at node N (G0's own, unguided, score) to the
    teacher's scale at node 0; the other policies use the teacher's scale throughout."""
    if policy != "ramp" or num_nodes == 0:
        return guidance_scale
    return 1.0 + (guidance_scale - 1.0) * (num_nodes - node) / num_nodes


@dataclass
class PlateauRule:
    """Adaptive switch: the target moves on once the smoothed DM loss has made no new low for `patience` updates."""

    smoothing: float
    tolerance: float
    patience: int
    ema: float | None = None
    best: float = math.inf
    since_best: int = 0

    def update(self, value: float) -> bool:
        """Feed one update's DM loss; True when it has stopped falling."""
        self.ema = value if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * value
        if self.ema < self.best * (1 - self.tolerance):
            self.best, self.since_best = self.ema, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def reset(self):
        self.ema, self.best, self.since_best = None, math.inf, 0


# ---- the pieces ------------------------------------------------------------------------------------------------

def drop_prompts(cond: Cond, uncond: Cond, drop: torch.Tensor) -> Cond:
    """Rows where `drop` is true get the unconditional embedding (classifier-free guidance training, Ho & Salimans)."""
    def pick(c, u):
        return torch.where(drop.to(c.device).reshape(-1, *([1] * (c.ndim - 1))), u.to(c.dtype), c)

    added = None
    if cond.added_cond_kwargs is not None:
        added = {k: pick(v, uncond.added_cond_kwargs[k]) for k, v in cond.added_cond_kwargs.items()}
    return Cond(pick(cond.encoder_hidden_states, uncond.encoder_hidden_states), added)


def guided_by_teacher_uncond(node, teacher, uncond: Cond, guidance_scale: float, x_t, t, cond: Cond) -> DenoiserOut:
    """CFG with the node's conditional branch and the teacher's unconditional one (policy `teacher_uncond`)."""
    c = node(x_t, t, cond)
    if guidance_scale == 1.0:
        return c
    u = teacher(x_t, t, uncond_for(uncond, cond, x_t.shape[0]))
    return DenoiserOut(cfg_combine(c.x0, u.x0, guidance_scale), cfg_combine(c.eps, u.eps, guidance_scale))


def probe_input(nets: Nets, ctx: RunContext):
    """A fixed (x_t, t, cond) to check that a loaded node changes the network: the model's own latent shape, the
    unconditional prompt, t = T/2; its own generator, so it never touches the training's random streams."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn((1, *ctx.latent_shape), generator=g).to(nets.device)
    t = torch.full((1,), nets.schedule.num_train_timesteps // 2, device=nets.device)
    return x_t, t, ctx.uncond.index([0])


def write_node(unet, adapter: str, path: Path) -> str:
    """Save adapter `adapter` to `path` (diffusers LoRA keys and alpha metadata, fp32), atomically; its node_hash.

    Every process writes its own copy (same tensors) and reads only that one: no process waits on another's file.
    """
    from ..export import save_diffusers_lora

    rank, alpha, _ = adapter_config(unet, adapter)
    state = {k: v.float().cpu() for k, v in adapter_state_dict(unet, adapter).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_diffusers_lora(state, None, rank, alpha, file=path)
    return node_hash(path)


def node_hash(path) -> str:
    """sha256 of a node's tensors, rank and alpha (not of the file: safetensors may order its metadata either way)."""
    from ..export import load_diffusers_lora

    state, rank, alpha = load_diffusers_lora(path)
    h = hashlib.sha256(f"{rank} {float(alpha)}".encode())
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def load_node(unet, schedule, adapter: str, path, probe) -> None:
    """Load a node file into `adapter`, strictly, and prove that it took: on `probe` the adapter's output must differ
    from the teacher's (the bare base). A key mismatch, another rank or a node that changes nothing raises."""
    from ..export import load_diffusers_lora

    state, rank, alpha = load_diffusers_lora(path)
    want_rank, want_alpha, _ = adapter_config(unet, adapter)
    if (rank, float(alpha)) != (want_rank, float(want_alpha)):
        raise NodeError(f"node {path} has LoRA rank {rank} and alpha {alpha:g}, adapter {adapter!r} has rank {want_rank} "
                        f"and alpha {want_alpha:g}: record the nodes again with this run's lora.critic_rank")
    load_adapter_state_dict(unet, adapter, state)  # raises on any missing or unexpected key
    x_t, t, cond = probe
    node_out = Denoiser(unet, schedule, adapter).raw(x_t, t, cond)
    teacher_out = Denoiser(unet, schedule, None).raw(x_t, t, cond)
    if torch.equal(node_out, teacher_out):
        raise NodeError(
            f"node {path} loaded into adapter {adapter!r} leaves the network's output exactly the teacher's, so it "
            "cannot serve as an intermediate target: record longer (method.interval) or with a larger optim.critic_lr"
        )


def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


# ---- the method ------------------------------------------------------------------------------------------------

class DisBackDistiller(DMDDistiller):
    extra_adapters: ClassVar[tuple[str, ...]] = ("fake_score", "target")
    # The target holds nodes of the fake_score adapter, so it is built with the critic's rank (train/build.py).
    adapter_ranks: ClassVar[dict[str, str]] = {"target": "critic"}
    trainable: ClassVar[dict[str, tuple[str, ...]]] = {"student": ("student",), "critic": ("fake_score",)}
    # The degradation path and its nodes are built for DDPM UNet teachers only.
    parameterisations: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    def __init__(self, cfg: DisBackConfig, schedule):
        super().__init__(cfg, schedule)
        self.path = BacktrackPath(cfg.regression_steps, cfg.num_nodes, cfg.interval, cfg.steps_per_node)
        self.rule = PlateauRule(cfg.switch_smoothing, cfg.switch_tolerance, cfg.switch_patience)
        self.target_node = 0  # 0 = the teacher; a node is loaded into the target when stage 2 starts
        self.nodes: dict[int, dict] = {}  # node -> {"file", "step" (recorded after this update), "tensors_sha256"}
        self.targets: list[dict] = []  # [{"node", "since_step"}]: since_step = first update (log step) against it
        self._step = 0
        self._dm_losses: list[torch.Tensor] = []  # this update's DM loss per micro-batch (adaptive rule)
        self._budget_checked = False
        self.nets: Nets | None = None

    def setup(self, nets: Nets, ctx: RunContext):
        super().setup(nets, ctx)
        self.nets = nets
        if self.cfg.num_nodes == 0:
            self.targets = [{"node": 0, "since_step": 1}]
            if self.cfg.lr_scale_after_teacher != 1.0:
                log.warning("method.lr_scale_after_teacher=%g has no effect with method.num_nodes=0: plain dmd has "
                            "no switch to the teacher and keeps optim.lr throughout", self.cfg.lr_scale_after_teacher)

    # ---- files ----
    def nodes_dir(self) -> Path:
        run_dir = self.ctx.run_dir
        if run_dir is None:
            raise RuntimeError("DisBack keeps its nodes in the run directory: train through stepdistill.train.loop "
                               "(Trainer), or set the RunContext's run_dir to a folder first")
        return Path(run_dir) / NODES_DIR

    def node_file(self, node: int) -> Path:
        return self.nodes_dir() / f"node-{node:02d}.safetensors"

    def _write_manifest(self):
        if self.cfg.num_nodes == 0:
            return
        self.nodes_dir().mkdir(parents=True, exist_ok=True)
        _write_json(self.nodes_dir() / MANIFEST, {
            "node_0": "the teacher (no adapter)",
            "nodes": [{"node": j, **self.nodes[j]} for j in sorted(self.nodes)],
            "fake_score_init": self.cfg.num_nodes if self.targets else None,
            "targets": self.targets,
        })

    def _load(self, adapter: str, node: int):
        path = self.node_file(node)
        if not path.is_file():
            raise NodeError(f"node {node} is missing: {path} was recorded earlier in this run. Restore it, or delete "
                            f"{path.parent.parent / 'checkpoints'} to record the nodes again")
        load_node(self.nets.denoiser, self.schedule, adapter, path, probe_input(self.nets, self.ctx))

    # ---- state ----
    def state_dict(self):
        return {**super().state_dict(), "disback": {
            "target_node": self.target_node, "nodes": dict(self.nodes), "targets": list(self.targets),
            "rule": dataclasses.asdict(self.rule),
        }}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        s = state["disback"]
        self.target_node, self.targets = int(s["target_node"]), list(s["targets"])
        self.nodes = {int(j): v for j, v in s["nodes"].items()}
        self.rule = PlateauRule(**s["rule"])
        for j, node in sorted(self.nodes.items()):
            path = self.node_file(j)
            if not path.is_file() or node_hash(path) != node["tensors_sha256"]:
                raise NodeError(f"node file {path} is missing or differs from the node recorded at step {node['step']}: "
                                f"restore it, or delete {path.parent.parent / 'checkpoints'} to record the nodes again")
        if self.target_node > 0:  # the checkpoint restored the target's tensors; reload to re-check them
            self._load("target", self.target_node)
        self._write_manifest()  # a crash after the checkpoint may have left a later manifest

    # ---- stage bookkeeping ----
    def _check_budget(self, nets: Nets):
        """Warn (once) when loop.max_steps stops the run before the path ends; running in legs is fine."""
        max_steps, path = self.ctx.max_steps, self.path
        if self._budget_checked or max_steps is None:
            return
        self._budget_checked = True
        if max_steps <= path.record_end and self.cfg.num_nodes:
            log.warning("loop.max_steps=%d ends before backtracking starts at step %d: the student is not trained "
                        "by this run alone", max_steps, path.record_end + 1)
        elif self.cfg.switch == "fixed" and max_steps <= path.teacher_step:
            log.warning("loop.max_steps=%d ends before the target reaches the teacher (step %d): the student is "
                        "distilled towards an intermediate node; raise loop.max_steps or lower method.steps_per_node",
                        max_steps, path.teacher_step + 1)

    def _set_target(self, node: int, step: int):
        """Make `node` the target from iteration `step` on (0: the teacher itself, nothing to load)."""
        if node > 0:
            self._load("target", node)
        self.target_node = node
        self.targets.append({"node": node, "since_step": step + 1})
        self.rule.reset()
        self._write_manifest()

    def _begin_backtrack(self, step: int):
        # The last node already fits G0, so the fake score is accurate from the first student update (DisBack's
        # fix of the score mismatch); it equals the auxiliary score now, but the load proves the file.
        self._load("fake_score", self.cfg.num_nodes)
        self._set_target(self.cfg.num_nodes - 1, step)

    def lr_scale(self, phase: str) -> float:
        """The student's rate drops by lr_scale_after_teacher from the update whose target is the teacher (the
        switch, fixed or adaptive); it follows target_node, which checkpoints keep, so a resumed run keeps it."""
        after_switch = self.cfg.num_nodes > 0 and self.path.stage(self._step) == 2 and self.target_node == 0
        return self.cfg.lr_scale_after_teacher if phase == "student" and after_switch else 1.0

    # ---- the losses ----
    def _teacher(self, nets: Nets):
        """The "real" score of the DM gradient: the teacher with its CFG, or the current node under the CFG policy."""
        if self.target_node == 0:
            return super()._teacher(nets)
        cfg, uncond = self.cfg, nets.teacher.uncond
        w = node_guidance_scale(cfg.node_guidance, self.guidance_scale, self.target_node, cfg.num_nodes)
        if cfg.node_guidance == "teacher_uncond":
            return partial(guided_by_teacher_uncond, nets.target, nets.teacher.denoiser, uncond, w)
        return GuidedDenoiser(nets.target, uncond, w, nets.teacher.rule)

    def student_loss(self, nets: Nets, batch: Batch, step: int) -> LossOut | None:
        self._step = step
        self._check_budget(nets)
        stage = self.path.stage(step)
        if stage == 1:
            return None  # G0 stays frozen while it is being recorded
        if stage == 0:
            out = super().student_loss(nets, batch, step)
            out.logs["disback_stage"] = 0.0
            return out
        out = super().student_loss(nets, batch, step - self.path.record_end + self.path.record_start)
        if self.cfg.switch == "adaptive" and "dmd_loss" in out.logs:
            self._dm_losses.append(out.logs["dmd_loss"])
        out.logs.update({"disback_stage": 2.0, "target_node": float(self.target_node),
                         "target_since": float(self.targets[-1]["since_step"])})
        return out

    def critic_loss(self, nets: Nets, batch: Batch, samples: torch.Tensor | None) -> LossOut | None:
        stage = self.path.stage(self._step)
        if stage == 1:
            return self._record_loss(nets, batch)
        if stage == 0:
            return None  # the auxiliary score must enter stage 1 as the teacher
        return super().critic_loss(nets, batch, samples)

    def _record_loss(self, nets: Nets, batch: Batch) -> LossOut:
        """Stage 1: the auxiliary score's denoising loss on G0's samples, some prompts dropped (DisBack Alg. 1, stage 1)."""
        device = nets.device
        x0 = self._generate(nets, batch, grad=False)
        drop = batch.rand(device) < self.cfg.prompt_dropout
        cond = drop_prompts(batch.cond, batch.uncond, drop)
        t = batch.randint(0, self.T, device=device)
        eps = batch.randn(*x0.shape[1:], device=device)
        loss = fake_score_loss(nets.fake_score, x0, cond, self.schedule, t, eps)
        recording = (self._step - self.path.record_start) // self.cfg.interval + 1
        return LossOut(loss, {"aux_loss": loss.detach().mean(), "disback_stage": 1.0,
                              "recording_node": float(recording)})

    def after_step(self, nets: Nets, step: int) -> list[Event]:
        stage = self.path.stage(step)
        if stage == 1:
            node = self.path.node_done(step)
            if node is not None:
                sha = write_node(nets.denoiser, "fake_score", self.node_file(node))
                self.nodes[node] = {"file": self.node_file(node).name, "step": step + 1, "tensors_sha256": sha}
                self._write_manifest()
            if step + 1 == self.path.record_end:
                self._begin_backtrack(step + 1)
        elif stage == 2:
            self._advance(nets, step)
        return []

    def _advance(self, nets: Nets, step: int):
        """Pick the target of iteration step + 1: the fixed walk, or one node back once the DM loss plateaus."""
        losses, self._dm_losses = self._dm_losses, []
        if self.target_node == 0:
            return
        if self.cfg.switch == "fixed":
            node = self.path.fixed_target(step + 1)
        else:
            stalled = bool(losses) and self.rule.update(self.ctx.dist.mean(float(torch.stack(losses).mean())))
            done = step + 2 - self.targets[-1]["since_step"]
            node = self.target_node - 1 if stalled or done >= self.cfg.steps_per_node else self.target_node
        if node != self.target_node:
            self._set_target(node, step + 1)


register_method("disback", DisBackConfig, DisBackDistiller)
