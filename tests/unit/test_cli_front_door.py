"""Issue 37's conveniences at the command line: --dry-run validates, --version, help texts, the base named portably."""

from __future__ import annotations

import pytest

from stepdistill.cli import main


def _dry_run(*sets) -> list[str]:
    argv = ["train", "--config", "configs/toy/dmd_1step.yaml", "--dry-run"]
    for s in sets:
        argv += ["--set", s]
    return argv


@pytest.mark.parametrize("setting, key", [
    ("optim.lr=-0.001", "optim.lr"), ("lora.rank=0", "lora.rank"), ("model.resolution=100", "model.resolution"),
])
def test_dry_run_validates_first(setting, key, capsys):
    assert main(_dry_run(setting)) == 2
    err = capsys.readouterr()
    line = err.err.strip().splitlines()[-1]
    assert line.startswith("stepdistill: error: ") and key in line and "Traceback" not in err.err
    assert err.out == ""  # nothing printed as if it were a valid config


def test_dry_run_of_a_valid_preset_prints_it(capsys):
    assert main(_dry_run("lora.rank=8")) == 0
    assert "rank: 8" in capsys.readouterr().out


def test_dry_run_of_a_preset_without_model_path_warns_and_prints(capsys, caplog):
    assert main(["train", "--config", "configs/tiny/lcm_sd15.yaml", "--dry-run"]) == 0
    assert "method:" in capsys.readouterr().out and "model.path is empty" in caplog.text


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"stepdistill {version('stepdistill')}"


def test_help_texts_say_what_format_out_and_alpha_mean(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "DiffusionPipeline.from_pretrained loads it alone" in text and "never overwritten" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "lora.alpha=0, the default, means alpha = lora.rank" in " ".join(capsys.readouterr().out.split())


def test_recipes_name_the_shipped_toy_asset_by_name_and_it_resolves_from_anywhere(tmp_path, monkeypatch):
    from stepdistill.card import hub_base_model
    from stepdistill.core.recipe import Recipe
    from stepdistill.resources import assets_dir, shipped_path
    from stepdistill.train.rundir import base_reference

    shipped = assets_dir() / "toy" / "sd15"
    assert base_reference(str(shipped)) == "assets/toy/sd15"
    assert base_reference("stabilityai/sdxl-turbo") == "stabilityai/sdxl-turbo"  # not here: a hub id, as given
    local = tmp_path / "my_base"
    local.mkdir()
    monkeypatch.chdir(tmp_path)
    assert base_reference("my_base") == str(local.resolve())
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = Recipe(base_model="assets/toy/sd15", family="sd15", method="dmd")
    assert recipe.resolve_base() == shipped_path("assets/toy/sd15") and (shipped / "model_index.json").is_file()
    # The card's base_model is a Hub model id or nothing.
    assert hub_base_model("stabilityai/sdxl-turbo") == "stabilityai/sdxl-turbo"
    assert hub_base_model("assets/toy/sd15") is None and hub_base_model(str(local)) is None
    assert hub_base_model("a/b/c") is None
