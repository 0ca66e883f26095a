"""The wheel: one top-level import name (`stepdistill`), presets and toy assets inside, and (slow) a clean
environment that runs `stepdistill demo --quick` from an empty folder."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, cwd=out)
    (found,) = out.glob("stepdistill-*.whl")
    return found


def test_wheel_installs_only_stepdistill_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"stepdistill"}
    for needed in ("stepdistill/eval/fid.py", "stepdistill/pipelines/__init__.py", "stepdistill/demo.py", "stepdistill/bench/gpu.py",
                   "stepdistill/configs/toy/dmd_1step.yaml", "stepdistill/assets/toy/judge.safetensors",
                   "stepdistill/assets/toy/sd15/unet/diffusion_pytorch_model.safetensors",
                   "stepdistill/assets/toy/sd3/transformer/diffusion_pytorch_model.safetensors",
                   "stepdistill/assets/toy/sd3/tokenizer_3/tokenizer.json",
                   "stepdistill/assets/toy/sd3/scheduler/scheduler_config.json",
                   "stepdistill/assets/toy/flux/transformer/diffusion_pytorch_model.safetensors",
                   "stepdistill/assets/toy/flux/tokenizer_2/tokenizer.json",
                   "stepdistill/configs/toy/dmd_1step_sd3.yaml"):
        assert needed in names, needed
    presets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert {f"stepdistill/{p}" for p in presets} <= set(names)


@pytest.mark.slow
def test_wheel_runs_the_demo_from_an_empty_folder(wheel, tmp_path):
    """A fresh environment with only the wheel installed (its dependencies borrowed from this one, read-only)."""
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Dependencies only: a path added by a .pth line has its own .pth files ignored, so this environment's
    # editable install of the checkout is not visible there.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STEPDISTILL_ASSETS")}
    where = subprocess.run([str(python), "-c", "import stepdistill; print(stepdistill.__file__)"], cwd=empty, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert str(ROOT) not in where
    result = subprocess.run([str(env_dir / "bin" / "stepdistill"), "demo", "--quick", "--output-dir", "out"],
                            cwd=empty, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (empty / "out" / "report.md").is_file()


def test_presets_and_their_assets_resolve_from_any_folder(tmp_path, monkeypatch):
    from stepdistill.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/toy/dmd_1step.yaml")
    assert Path(cfg.model.path, "model_index.json").is_file()
    (tmp_path / "configs").mkdir()  # a user's own configs/ folder wins over the shipped one
    (tmp_path / "configs" / "mine.yaml").write_text("method: {name: lcm}\nmodel: {path: assets/toy/sd15}\ndata: {images: \"toy:8\"}\n")
    assert load_config("configs/mine.yaml").method.name == "lcm"
