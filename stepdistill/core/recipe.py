"""The inference recipe saved next to a trained LoRA (stepdistill.json): how to sample with it in plain diffusers.

A few-step LoRA is only correct with the scheduler, timesteps, guidance and eta it was distilled for
(consistency.md TL;DR 4: e.g. trailing DDIM, and TCD's eta overridden to 0 by the pipelines).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, ModelError
from .io import atomic_write_text

RECIPE_FILE = "stepdistill.json"
FORMAT_VERSION = 1

# core knows no model families (DESIGN.md sec. 2): stepdistill.models.registry installs its check here on import,
# so a recipe naming an unregistered family fails wherever models are in use; before that any name is taken.
_family_check: Callable[[str], object] | None = None


def set_family_check(check: Callable[[str], object] | None) -> None:
    """Install the function that raises ValueError for a family name no registered family has."""
    global _family_check
    _family_check = check


@dataclass
class Recipe:
    """Everything a pipeline needs besides the weights: base model, scheduler, steps, guidance, LoRA scale."""

    base_model: str
    family: str
    method: str
    scheduler_class: str = "DDIMScheduler"
    scheduler_config: dict = field(default_factory=dict)  # overrides of the base model's scheduler config
    timesteps: list[int] | None = None  # explicit timesteps; when set, they fix num_inference_steps
    # Flow pipelines (StableDiffusion3Pipeline, FluxPipeline): the `sigmas=` they get, before their scheduler's shift;
    # when set, they fix num_inference_steps. Written only when set, so DDPM recipes keep their old keys.
    sigmas: list[float] | None = None
    num_inference_steps: int = 4
    guidance_scale: float = 1.0  # diffusers' convention: <= 1 runs without CFG
    eta: float = 0.0
    lora_rank: int = 64
    lora_alpha: float = 64.0
    training_steps: int = 0
    lora_scale: float = 1.0
    # The family's size conditioning the student was trained with, as pipeline call arguments (SDXL: original_size,
    # crops_coords_top_left, target_size); None for families without any.
    size_conditioning: dict | None = None
    # Flow families: the T5 prompt length the student was trained at (the pipeline call's max_sequence_length);
    # None (and recipes older than the key) = the pipeline's default.
    max_sequence_length: int | None = None
    # Families whose sigmas depend on the image size (FLUX's resolution-dependent shift): the height and width the
    # student was trained at, passed in every pipeline call (FluxPipeline's 1024 default would shift its sigmas
    # elsewhere). Written only when set.
    height: int | None = None
    width: int | None = None
    notes: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not isinstance(self.family, str) or not self.family:
            raise ValueError(f"recipe family {self.family!r} must be a family name such as 'sd15'")
        if _family_check is not None:
            _family_check(self.family)
        if self.timesteps is not None:
            self.timesteps = [int(t) for t in self.timesteps]
            if not self.timesteps:
                raise ValueError("recipe timesteps is an empty list: give the timesteps or null")
            self.num_inference_steps = len(self.timesteps)
        if self.sigmas is not None:
            if self.timesteps is not None:
                raise ValueError("a recipe gives timesteps or sigmas, not both")
            self.sigmas = [float(x) for x in self.sigmas]
            if not self.sigmas or not all(0 < x <= 1 for x in self.sigmas):
                raise ValueError(f"recipe sigmas must be a non-empty list in (0, 1], got {self.sigmas}")
            self.num_inference_steps = len(self.sigmas)
        if self.num_inference_steps < 1:
            raise ValueError(f"recipe num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if (self.height is None) != (self.width is None):
            raise ValueError(f"recipe height {self.height} and width {self.width}: give both (the trained size) or neither")
        scheduler_class(self.scheduler_class)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("sigmas", "height", "width"):
            if data[key] is None:
                del data[key]
        return data

    def save(self, directory) -> Path:
        """Write DIR/stepdistill.json atomically (a crash leaves the old file or the new one, never half)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / RECIPE_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory) -> Recipe:
        """Read DIR/stepdistill.json (or the file itself); refuses newer formats and unknown keys."""
        path = Path(directory)
        if path.is_dir():
            path = path / RECIPE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no {RECIPE_FILE} at {path}: pass the folder a stepdistill run exported (e.g. RUN/final), "
                f"or write one with stepdistill.core.recipe.Recipe(...).save(folder)"
            )
        data = json.loads(path.read_text())
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{path} has recipe format {version}, newer than this stepdistill reads ({FORMAT_VERSION}): "
                "upgrade stepdistill"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{path}: unknown recipe key {key!r}{hint}; known keys: {sorted(known)}")
        return cls(**data)

    def with_steps(self, steps: int | None, respace: bool = False) -> Recipe:
        """This recipe sampled at `steps` steps (None or its own count: the recipe itself).

        A recipe that fixes its timesteps refuses another count, unless `respace`: then an LCMScheduler recipe with
        one trained timestep t0 starts there and spaces the rest evenly below (t0 = 399, two steps: 399, 199), as
        LCM's own grid would start at 999, a timestep such a student never saw; another LCMScheduler recipe takes
        LCM's 50-step skipping grid, and any other recipe its scheduler's own spacing (the demo's 2- and 4-step rows).
        """
        if steps is None or steps == self.num_inference_steps:
            return self
        if not respace:
            if self.timesteps is not None:
                raise ModelError(f"this LoRA's recipe fixes its timesteps {self.timesteps}: drop --steps (or export a "
                                 "recipe with num_inference_steps instead of timesteps)")
            if steps < 1:
                raise ConfigError(f"--steps must be >= 1 (got {steps})")
            config = dict(self.scheduler_config)
            if "disable_corrector" in config:  # a first-order UniPC recipe (Wan) keeps UniC off at every step
                config["disable_corrector"] = list(range(steps))
            return dataclasses.replace(self, num_inference_steps=steps, scheduler_config=config)
        from .solvers import lcm_original_steps, multistep_timesteps  # torch: reading a recipe needs none

        config, timesteps = dict(self.scheduler_config), None
        if self.scheduler_class == "LCMScheduler" and self.timesteps and len(self.timesteps) == 1:
            timesteps = multistep_timesteps(self.timesteps[0], steps)
            config["original_inference_steps"] = lcm_original_steps(timesteps)
        elif self.scheduler_class == "LCMScheduler":
            config["original_inference_steps"] = 50
        return dataclasses.replace(self, timesteps=timesteps, num_inference_steps=steps, scheduler_config=config)

    def resolve_base(self) -> str:
        """base_model as a path or hub id to load: a shipped toy asset's name (`assets/toy/sd15`) becomes the installed
        copy, so a recipe written in the repository works from any folder."""
        from ..resources import shipped_path

        return shipped_path(self.base_model)

    def make_scheduler(self, base_scheduler_config):
        """The recipe's scheduler: its class, built from the base model's config plus the recipe's overrides.

        Keys the class does not take (PNDM's skip_prk_steps in SD's config, say) are dropped here, as
        from_config would drop them, but without a warning on every load.
        """
        cls = scheduler_class(self.scheduler_class)
        accepted = inspect.signature(cls.__init__).parameters
        config = {k: v for k, v in dict(base_scheduler_config).items() if k in accepted or k.startswith("_")}
        return cls.from_config(config, **self.scheduler_config)

    def call_kwargs(self, scheduler=None) -> dict:
        """Keyword arguments of a diffusers text-to-image call: steps or timesteps, guidance, eta."""
        if self.sigmas is not None:
            # Flow pipelines take sigmas (they shift them as in training) and no eta.
            if self.eta:
                raise ValueError(f"the recipe has eta={self.eta} but flow pipelines sample without eta: set it to 0")
            kwargs = {"guidance_scale": self.guidance_scale, "sigmas": list(self.sigmas),
                      "num_inference_steps": self.num_inference_steps}
            if self.max_sequence_length is not None:
                kwargs["max_sequence_length"] = self.max_sequence_length
            kwargs.update(self.conditioning_kwargs())
            kwargs.update(self.size_kwargs())
            return kwargs
        kwargs = {"guidance_scale": self.guidance_scale, "eta": self.eta}
        if self.scheduler_class.startswith("FlowMatch") or self.scheduler_config.get("use_flow_sigmas"):
            # A flow pipeline driven by its step count (WanPipeline takes no sigmas) takes no eta either.
            if self.eta:
                raise ValueError(f"the recipe has eta={self.eta} but flow pipelines sample without eta: set it to 0")
            del kwargs["eta"]
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        if self.timesteps is not None:
            if scheduler is not None and "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"the recipe gives explicit timesteps but {type(scheduler).__name__} cannot take them: "
                    "use num_inference_steps with timestep_spacing in scheduler_config, or a scheduler with "
                    "custom timesteps (e.g. TCDScheduler, LCMScheduler, EulerDiscreteScheduler)"
                )
            kwargs["timesteps"] = list(self.timesteps)
        else:
            kwargs["num_inference_steps"] = self.num_inference_steps
        kwargs.update(self.conditioning_kwargs())
        kwargs.update(self.size_kwargs())
        return kwargs

    def size_kwargs(self) -> dict:
        """height / width of the pipeline call, for a student whose sigmas depend on them ({} otherwise)."""
        return {} if self.height is None else {"height": int(self.height), "width": int(self.width)}

    def conditioning_kwargs(self) -> dict:
        """size_conditioning as call arguments: pairs (SDXL's sizes) as tuples, single values (height, width, a video's
        num_frames) as they are."""
        return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in (self.size_conditioning or {}).items()}


def scheduler_class(name: str):
    """The diffusers scheduler class called `name`, or an error naming the closest ones."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not (inspect.isclass(cls) and issubclass(cls, diffusers.SchedulerMixin)):
        names = [n for n in dir(diffusers) if n.endswith("Scheduler")]
        close = difflib.get_close_matches(name, names, n=3)
        raise ValueError(
            f"unknown scheduler class {name!r} in the recipe: use a diffusers scheduler class name"
            + (f", e.g. {close}" if close else "") + " (or upgrade diffusers if it is newer than this version)"
        )
    return cls
