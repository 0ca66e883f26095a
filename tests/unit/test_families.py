"""The model-family registry: every family declares what the package asks of it, and a family added at runtime
is picked up everywhere (names, CLI choices, config validation, recipes) with no other edit."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from stepdistill.cli import build_parser
from stepdistill.config import ConfigError, ModelConfig, load_config
from stepdistill.core.recipe import Recipe
from stepdistill.models import FamilyModel, family_names, get_family, register_family, registry
from stepdistill.models.base import size_hw
from stepdistill.models.families.sd15 import SD15Model
from stepdistill.models.tiny import tiny_configs
from stepdistill.registry import method_names


class ToyFamily(SD15Model):
    """An extra family defined here: SD1.5's glue on another pipeline class, registered by the fixture only."""

    name = "toyfam"
    pipeline_class_name = "StableDiffusionPAGPipeline"
    default_resolution = 256
    bench_batch = 2
    dmd2_critic_ratio = 3
    method_defaults = {"dmd": {"timesteps": [799], "guidance_scale": 2.0}}


@pytest.fixture
def toy_family():
    register_family(ToyFamily)
    yield ToyFamily
    registry.unregister_family(ToyFamily.name)


def check_family(cls) -> None:
    """Every attribute FamilyModel.REQUIRED names, present and consistent with the family's pipeline."""
    assert issubclass(cls, FamilyModel) and get_family(cls.name) is cls
    missing = [a for a in FamilyModel.REQUIRED if not hasattr(cls, a)]
    assert not missing, f"{cls.__name__} lacks {missing}"
    from diffusers import DiffusionPipeline

    assert issubclass(cls.pipeline_class, DiffusionPipeline) and cls.pipeline_class.__name__ == cls.pipeline_class_name
    accepted = set(inspect.signature(cls.pipeline_class.__init__).parameters)
    parts = {cls.denoiser_prefix, "vae", *(e for e, _, _, _ in cls.text_parts), *(t for _, t, _, _ in cls.text_parts)}
    assert parts | set(cls.pipeline_kwargs) <= accepted, f"{cls.pipeline_class_name} takes no {parts - accepted}"
    assert isinstance(cls.denoiser_class, type) and isinstance(cls.vae_class, type)
    for _, _, encoder, tokenizer in cls.text_parts:
        import transformers

        assert isinstance(getattr(transformers, encoder), type) and isinstance(getattr(transformers, tokenizer), type)
    # A side, or (height, width) for a family that takes non-square sizes (wan: WanPipeline's 480 x 832).
    assert isinstance(cls.default_resolution, int) or (cls.non_square and len(cls.default_resolution) == 2)
    assert all(side > 0 and side % cls.resolution_multiple == 0 for side in size_hw(cls.default_resolution))
    assert cls.bench_batch >= 1 and cls.dmd2_critic_ratio >= 1
    assert cls.default_scheduler_config.get("num_train_timesteps")
    parts = {cls.denoiser_prefix, "vae", *(e for e, _, _, _ in cls.text_parts)}
    assert set(cls.tiny_arch) == parts and set(cls.full_configs) == parts
    assert set(tiny_configs(cls.name)) == parts  # the tiny configs complete without error
    assert set(cls.method_defaults) <= set(method_names())
    assert cls.default_vae_dtype(torch.bfloat16) in (torch.bfloat16, torch.float32)


@pytest.mark.parametrize("name", family_names())
def test_every_registered_family_declares_what_is_asked_of_it(name):
    check_family(get_family(name))


def test_the_builtin_families_are_discovered():
    assert {"sd15", "sdxl", "sd3", "flux"} <= set(family_names())
    assert get_family("sdxl").defaults_for("dmd") == {"timesteps": [399], "guidance_scale": 8.0}
    assert get_family("sd15").defaults_for("tscd") == {}


def test_a_family_registered_at_runtime_is_used_everywhere(toy_family, tmp_path):
    check_family(toy_family)
    assert "toyfam" in family_names()
    assert registry.family_for_pipeline("StableDiffusionPAGPipeline") is toy_family
    # The CLI's --family choices, without editing cli.py.
    args = build_parser().parse_args(["toy", "train-teacher", "--out", str(tmp_path), "--family", "toyfam"])
    assert args.family == "toyfam"
    # Config validation, without editing config.py.
    ModelConfig(family="toyfam").validate()
    config = tmp_path / "c.yaml"
    config.write_text("method: lcm\nmodel: {path: m, family: toyfam}\ndata: {prompts: p}\n")
    assert load_config(config).model.family == "toyfam"
    # Recipes, which core checks through the registry.
    assert Recipe(base_model="b", family="toyfam", method="dmd").family == "toyfam"


def test_registry_refuses_ambiguous_families():
    class Twin(SD15Model):
        name = "sd15twin"

    with pytest.raises(ValueError, match="already uses"):
        register_family(Twin)  # same pipeline class as sd15: detection would be ambiguous
    assert "sd15twin" not in family_names()

    class Impostor(ToyFamily):
        name = "sdxl"

    with pytest.raises(ValueError, match="already registered"):
        register_family(Impostor)


def test_a_new_file_in_families_is_a_new_family(tmp_path, monkeypatch):
    """Adding a family is one file: a module beside sd15.py is imported and registers itself, nothing else edited."""
    from stepdistill.models import families

    (tmp_path / "filefam.py").write_text(
        "from stepdistill.models.families.sd15 import SD15Model\n"
        "from stepdistill.models.registry import register_family\n\n\n"
        "@register_family\n"
        "class FileFamily(SD15Model):\n"
        "    name = 'filefam'\n"
        "    pipeline_class_name = 'StableDiffusionPAGPipeline'\n"
    )
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        assert "filefam" in family_names()
    finally:
        registry.unregister_family("filefam")
        sys.modules.pop("stepdistill.models.families.filefam", None)


@pytest.mark.parametrize("name, close", [("sdxI", "sdxl"), ("sd1.5", "sd15"), ("SD15", "sd15")])
def test_unknown_family_is_one_line_naming_the_close_match(name, close, tmp_path, capsys):
    with pytest.raises(ValueError, match=f"did you mean '{close}'") as err:
        get_family(name)
    assert "\n" not in str(err.value) and ", ".join(family_names()) in str(err.value)

    with pytest.raises(ConfigError, match=f"model.family: family '{name}' is not supported .*'{close}'") as err:
        ModelConfig(family=name).validate()
    assert "\n" not in str(err.value)

    with pytest.raises(ValueError, match=f"did you mean '{close}'"):
        Recipe(base_model="b", family=name, method="dmd")

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "toy", "--out", str(tmp_path / "m.json"), "--family", name])
    assert "invalid choice" in capsys.readouterr().err
