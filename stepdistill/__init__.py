"""stepdistill: distil a diffusion teacher (SD1.5, SDXL, SD3, FLUX.1) into a one- or few-step LoRA student.

The few names a script needs, loaded on first use so that `import stepdistill` stays light:

    from stepdistill import load_config, Recipe, pipelines
    from stepdistill.train.loop import train       # (`stepdistill.train` is the package: no alias at the top)
    cfg = load_config("configs/toy/dmd_1step.yaml", ["loop.max_steps=10"])
    final = train(cfg, "runs/dmd")                 # the run folder's final/ export
    pipe = pipelines.load(None, final)             # a diffusers pipeline with the LoRA and its recipe
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stepdistill")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

# name -> module that defines it
_PUBLIC = {
    "load_config": "stepdistill.config",
    "Recipe": "stepdistill.core.recipe",
    "register_method": "stepdistill.registry",
    "generate_image": "stepdistill.generate",
    "export_run": "stepdistill.export",
}
__all__ = ["Recipe", "__version__", "export_run", "generate_image", "load_config", "pipelines", "register_method"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'stepdistill' has no attribute {name!r}")
