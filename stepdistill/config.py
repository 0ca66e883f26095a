"""Typed configuration: dataclass defaults < YAML file < `--set dotted.key=value`, with errors that say what to do."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field

import yaml

from .core.lr import check_lr_schedule
from .errors import ConfigError
from .methods.config import MethodConfig

COMPILE_MODES = ("auto", "off", "regional", "full")


@dataclass
class ModelConfig:
    path: str = ""  # local diffusers folder or hub id
    family: str = "auto"  # auto | a registered family (stepdistill.models.family_names())
    # Pixels: one side (a square), or [height, width] where the family takes other sizes (wan: [480, 832], its
    # pipeline's default); 0 = the model's own size. A square pair [h, h] is read as the side h.
    resolution: int | list[int] = 0
    # frozen base weights: auto (bf16 on GPU, fp32 on CPU; bf16 under loop.mixed_precision=bf16_pure) | fp32 | bf16 | fp16
    dtype: str = "auto"
    attention: str = "auto"  # auto | sdpa | xformers | triton | math
    gradient_checkpointing: bool = False
    # auto | off | regional | full (true = regional, false = off). regional: torch.compile each repeated block the family
    # names (FamilyModel.compile_units: a UNet's resnets and transformer blocks, a DiT's blocks), so one block's graph
    # serves all its repeats and compiling takes about a block's time; full: the whole denoiser as one graph (minutes per
    # adapter and shape). auto: regional on CUDA, off elsewhere (and off under model.shard=fsdp2). docs/training-speed.md
    compile: bool | str = "auto"
    channels_last: bool = False  # NHWC UNet weights: the fast cuDNN convolution layout on tensor cores
    # fused | peft: how LoRA layers run. fused: base op and low-rank term in one autograd node per layer, compute
    # copies of A and B made once per optimizer step, per-sample adapters by row slices (core/lora.py); peft: PEFT's
    # own forward (the reference the fused path is tested against). Same parameters, keys and exports either way.
    lora_kernel: str = "fused"
    # none | fsdp2: shard the frozen base over the processes with FSDP2 (fully_shard per block); LoRA stays whole
    # on every process. For a base that does not fit one GPU next to its activations (docs/memory.md sec. 7).
    shard: str = "none"
    # Text encoders once every prompt is encoded (the embedding cache): true = moved to the CPU (frees their memory on
    # the GPU: SDXL's two CLIPs 1.5 GiB in bf16; a prompt encoded later runs there, slowly), false = kept on the device,
    # null = the family's choice (the flow and video families' T5 / Qwen / UMT5 encoders go, SD1.5's and SDXL's stay).
    offload_text_encoders: bool | None = None
    # T5 prompt length of the flow families (SD3/FLUX); null = the family's pipeline default (SD3 256, FLUX 512).
    # Prompts are padded to it, so a short one saves joint-attention work on padding (docs/architecture.md).
    max_sequence_length: int | None = None
    # Video families (wan): frames of a sample (the pipeline's num_frames); null = the family's default (Wan: 81).
    frames: int | None = None

    def validate(self):
        _family("model.family", self.family)
        if self.frames is not None:
            _at_least("model.frames", self.frames, 1)
        if self.max_sequence_length is not None:
            _at_least("model.max_sequence_length", self.max_sequence_length, 1)
            _t5_family("model.max_sequence_length", self.family)
        self.resolution = _size("model.resolution", self.resolution)
        _resolution_for_family("model.resolution", self.resolution, self.family)
        _choice("model.dtype", self.dtype, ("auto", "fp32", "bf16", "fp16"))
        _choice("model.attention", self.attention, ("auto", "sdpa", "xformers", "triton", "math"))
        _choice("model.shard", self.shard, ("none", "fsdp2"))
        _choice("model.lora_kernel", self.lora_kernel, ("fused", "peft"))
        if isinstance(self.compile, bool):  # the older true / false switch: true is the recommended compile
            self.compile = "regional" if self.compile else "off"
        _choice("model.compile", self.compile, COMPILE_MODES)
        if self.shard != "none" and self.compile in ("regional", "full"):
            raise ConfigError(f"model.shard=fsdp2 with model.compile={self.compile} is not supported (untested together): "
                              "set model.compile=off (or auto, which is off under fsdp2) or model.shard=none")
        for side in self.resolution if isinstance(self.resolution, list) else [self.resolution]:
            _at_least("model.resolution", side, 0)
            if side % 8:
                raise ConfigError(f"model.resolution must be a multiple of 8, the VAE's downsampling (got "
                                  f"{self.resolution}); 0 uses the model's own size")


@dataclass
class DataConfig:
    prompts: str = ""  # .txt (one per line), .jsonl/.json/.parquet, or a datasets save_to_disk folder (docs/data.md)
    batch_size: int = 4  # per process and micro-step
    max_prompt_words: int = 0  # 0 = no limit (the tokenizer truncates to its own length anyway)
    # Image-caption pairs: a folder (.txt captions or metadata.jsonl), a datasets folder with an image column,
    # WebDataset shards (shards/{000000..000127}.tar or a folder of .tar), or toy:N. When set, the captions are the
    # prompts of every loss term and data.prompts is not read (a warning says so).
    images: str = ""
    text_field: str = ""  # caption / prompt field of json, parquet, datasets and shard records; "" = text or prompt
    cache: str = "auto"  # memory: encode every prompt (and image) up front | stream: per batch | auto: by set size
    max_bad_fraction: float = 0.05  # stop when more than this share of the records read are unusable
    prefetch: int = 2  # batches prepared ahead by a background thread when streaming

    def validate(self):
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.max_prompt_words", self.max_prompt_words, 0)
        _at_least("data.prefetch", self.prefetch, 0)
        _choice("data.cache", self.cache, ("auto", "memory", "stream"))
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be within [0, 1] (got {self.max_bad_fraction})")
        n = self.images[len("toy:"):] if self.images.startswith("toy:") else "1"
        if not (n.isdigit() and int(n) >= 1):
            raise ConfigError(f"data.images={self.images!r}: write toy:N with N >= 1 images, e.g. toy:20000")


@dataclass
class LoraSettings:
    rank: int = 64
    alpha: float = 0.0  # 0 = alpha equals rank (scale 1)
    targets: str = "full"  # preset name: attn | full (stepdistill.core.lora.LORA_TARGETS)
    critic_rank: int = 0  # rank of the fake-score / auxiliary adapters; 0 = same as rank

    def validate(self):
        _at_least("lora.rank", self.rank, 1)
        _at_least("lora.alpha", self.alpha, 0)
        _at_least("lora.critic_rank", self.critic_rank, 0)
        from .core.lora import LORA_TARGETS

        _choice("lora.targets", self.targets, tuple(LORA_TARGETS))

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha or self.rank)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    critic_lr: float = 0.0  # 0 = same as lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 10.0  # max global grad norm; 0 = off
    warmup_steps: int = 0
    # constant | cosine: after the warm-up, cosine anneals every phase's rate to lr_final x its rate at loop.max_steps
    lr_schedule: str = "constant"
    lr_final: float = 0.0

    def validate(self):
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0 (got {self.lr})")
        _at_least("optim.critic_lr", self.critic_lr, 0)
        _at_least("optim.weight_decay", self.weight_decay, 0)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1) (got {self.betas})")
        _at_least("optim.grad_clip", self.grad_clip, 0)
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0 (got {self.eps})")
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        check_lr_schedule(self.lr_schedule, self.lr_final, "optim.")


TRACKERS = ("tensorboard", "wandb")


@dataclass
class LoopConfig:
    max_steps: int = 1000  # student updates
    grad_accum: int = 1
    log_every: int = 10
    sample_every: int = 0  # write a sample grid every N steps; 0 = off
    checkpoint_every: int = 500
    keep_last: int = 2
    # auto | no | bf16 | bf16_pure. auto: bf16_pure on a GPU (bf16 autocast there over an fp32/fp16 base or with
    # model.lora_kernel=peft), none on the CPU (train/build.py precision_mode). bf16: autocast, matmuls and
    # convolutions in bf16, norms and the casts around them in fp32. bf16_pure: no autocast; the base (model.dtype
    # bf16, or auto) and every activation, norms included, in bf16 (torch's norm kernels accumulate in fp32 inside),
    # the LoRA term from bf16 copies of its fp32 masters (model.lora_kernel=peft: PEFT's own fp32 term); losses
    # reduced, the DM normaliser and AdamW in fp32 (docs/training-speed.md).
    mixed_precision: str = "auto"
    max_nonfinite_in_a_row: int = 20
    progress: bool = True
    report_to: list[str] = field(default_factory=lambda: ["none"])  # none | tensorboard | wandb (a list: both)
    # Export the exponential moving average of the student adapter (decay per student update, ramped from the
    # start: core.ema.ramped_decay) instead of its last iterate; 0 = the last iterate. Checkpoints carry the average.
    ema_decay: float = 0.0

    def validate(self):
        _at_least("loop.max_steps", self.max_steps, 1)
        _at_least("loop.grad_accum", self.grad_accum, 1)
        _at_least("loop.log_every", self.log_every, 1)
        _at_least("loop.sample_every", self.sample_every, 0)
        _at_least("loop.checkpoint_every", self.checkpoint_every, 1)
        _at_least("loop.keep_last", self.keep_last, 1)
        _at_least("loop.max_nonfinite_in_a_row", self.max_nonfinite_in_a_row, 1)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"loop.ema_decay must be in [0, 1) (got {self.ema_decay}); 0 exports the last iterate")
        _choice("loop.mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "bf16_pure"))
        for name in self._report_names():
            _choice("loop.report_to", name, ("none", *TRACKERS))

    def _report_names(self) -> list[str]:
        return [n.strip() for item in self.report_to for n in str(item).split(",") if n.strip()]

    @property
    def trackers(self) -> list[str]:
        """The experiment trackers to report to, in order ("none" dropped; "tensorboard,wandb" read as two)."""
        return [n for n in dict.fromkeys(self._report_names()) if n != "none"]


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["diffusers", "kohya"])

    def validate(self):
        for f in self.formats:
            _choice("export.formats", f, ("diffusers", "kohya", "merged"))


@dataclass
class Config:
    method: MethodConfig = field(default_factory=MethodConfig)
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self):
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32) (got {self.seed})")
        if self.loop.mixed_precision == "bf16_pure" and self.model.dtype not in ("auto", "bf16"):
            raise ConfigError(
                f"loop.mixed_precision=bf16_pure runs the base in bf16 without autocast, but model.dtype={self.model.dtype}:"
                " set model.dtype=bf16 (or auto), or loop.mixed_precision=bf16 (autocast over this base)"
            )
        if not self.model.path:
            raise ConfigError("model.path is empty: pass --set model.path=DIR (a local diffusers folder or a hub id)")
        if not self.data.prompts and not self.data.images:
            raise ConfigError("data.prompts is empty: pass --set data.prompts=FILE (a text file, one prompt per line), "
                              "or data.images=DIR for image-caption pairs")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)} (got {value!r})")


def _family(key, value):
    """'auto' or a registered family (asked lazily: the registry imports torch, config.py alone does not)."""
    if value == "auto":
        return
    from .models.registry import UnknownFamilyError, get_family

    try:
        get_family(value)
    except UnknownFamilyError as e:
        raise ConfigError(f"{key}: {e}, or 'auto' to detect it from model.path") from None


def _t5_family(key, family):
    """Refuse a T5 setting for a family without T5 (an explicit one; 'auto' is checked after loading)."""
    if family == "auto":
        return
    from .models.registry import get_family

    if not hasattr(get_family(family), "t5_max_length"):
        raise ConfigError(f"{key}: the {family} family encodes no T5 prompt; remove the key (it is for sd3/flux)")


def _resolution_for_family(key, resolution, family):
    """A resolution the family's pipeline takes (FLUX: multiples of 16); 'auto' is checked once the model is loaded."""
    if family == "auto" or not resolution:
        return
    from .models.base import check_resolution
    from .models.registry import get_family

    try:
        check_resolution(get_family(family), resolution)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _size(key, value):
    """model.resolution in its one form: an int side, or [height, width] when the sides differ."""
    if not isinstance(value, list):
        return value
    from .models.base import normal_size

    try:
        size = normal_size(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    return list(size) if isinstance(size, tuple) else size


def _at_least(key, value, low):
    if value < low:
        raise ConfigError(f"{key} must be >= {low} (got {value})")


# ---- building dataclasses from plain dicts, with type checks and close-match hints ----------------------------

def _all_keys(cls, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, prefix + f.name + ".")
    return keys


def _unknown_key(key: str, cls, prefix: str) -> ConfigError:
    full = prefix + key
    candidates = _all_keys(cls, prefix)
    close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(key, [c.rsplit(".", 1)[-1] for c in candidates], n=1, cutoff=0.6)
        close = [c for c in candidates if c.endswith("." + close[0]) or c == close[0]][:1] if close else []
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {sorted(f.name for f in dataclasses.fields(cls))}"
    return ConfigError(f"unknown config key {full!r}{hint}")


def _coerce(value, tp, key):
    """Check (and gently convert: int -> float, scalar -> list) a YAML value against a field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (typing.Any,)
        if isinstance(value, str) and item_tp is not str:
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v if not isinstance(v, str) or item_tp is str else _yaml_scalar(v, key), item_tp, key)
                for v in value]
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false (got {value!r})")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        # NaN passes every `x < low` check, and inf is never a sensible rate, scale or weight.
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number (got {value!r})")
        return number
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer (got {value!r})")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool) and key in _YAML_BOOL_WORDS:  # YAML 1.1 reads an unquoted `no` as false
            return _YAML_BOOL_WORDS[key][value]
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a string (got {value!r}: YAML reads unquoted yes/no/on/off as booleans; "
                              f"quote the word, e.g. {key}='no')")
        raise ConfigError(f"{key} must be a string (got {value!r})")
    raise ConfigError(f"{key}: unsupported field type {tp}")


# String settings whose documented values YAML 1.1 reads as booleans when unquoted (`--set loop.mixed_precision=no`).
_YAML_BOOL_WORDS = {"loop.mixed_precision": {False: "no"}}


def from_dict(cls, data: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from a nested dict; unknown keys are errors naming the closest valid key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys to values (got {data!r})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(str(key), cls, prefix)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, prefix + key + ".")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


# ---- loading ------------------------------------------------------------------------------------------------

def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are read as YAML scalars."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE (e.g. --set loop.max_steps=100)")
        key, raw = item.split("=", 1)
        value = _yaml_scalar(raw, f"--set {key}") if raw != "" else ""
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is a value, not a section")
        node[parts[-1]] = value
    return tree


def _yaml_scalar(raw: str, key: str):
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot read {raw!r} as a YAML value ({type(e).__name__}); quote strings, "
                          "e.g. --set key='text'") from None
    except RecursionError:
        raise ConfigError(f"{key}: the value is nested too deeply") from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path) -> dict:
    from .resources import preset_path

    path = preset_path(path)
    if not path.is_file():
        raise ConfigError(f"no config file at {path}: pass --config FILE (presets are in configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections (got {type(data).__name__})")
    return data


def build_config(data: dict, validate: bool = True) -> Config:
    """Turn a merged dict into a typed Config; the method section is typed by the registered method."""
    from .registry import get_method

    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections such as method:, model:, data: (got "
                          f"{type(data).__name__})")
    data = dict(data)
    method = data.pop("method", None)
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or not method.get("name"):
        raise ConfigError("method.name is missing: set method: {name: lcm|tscd|dmd|disback, ...} in the config")
    try:
        spec = get_method(str(method["name"]))
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    cfg = from_dict(Config, data)
    cfg.method = from_dict(spec.config_cls, method, "method.")
    if hasattr(cfg.method, "validate"):
        cfg.method.validate()
    if validate:
        cfg.validate()
    return cfg


def load_config(path=None, overrides: list[str] | None = None, validate: bool = True) -> Config:
    """defaults < YAML at `path` < `--set` overrides."""
    data = read_yaml(path) if path else {}
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    data = _merge(data, parse_overrides(overrides or []))
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        from .resources import shipped_path

        model["path"] = shipped_path(model["path"])  # the toy presets' assets/toy/... from any directory
    return build_config(data, validate=validate)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
