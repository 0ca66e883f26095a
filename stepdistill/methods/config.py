"""The base of every method's typed options, beside the Distiller base: a method's module subclasses it and
registers both (stepdistill.registry); config.py builds the `method:` section from the registered subclass.
Torch-free, so reading a config imports no model code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MethodConfig:
    """Base of every method's typed options; `name` selects the method in the registry."""

    name: str = ""
