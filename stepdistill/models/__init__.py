"""Model families: loading a teacher, prompt encoding, added conditioning, VAE scaling.

Each family is one module in models/families/ that registers itself (models.registry); ask the registry for them:
`family_names()`, `get_family("sdxl")`.
"""

from .base import FamilyModel
from .loading import detect_family, is_hub_id, load_family, read_model_index
from .registry import UnknownFamilyError, family_names, get_family, register_family

__all__ = [
    "FamilyModel", "UnknownFamilyError", "detect_family", "family_names", "get_family", "is_hub_id", "load_family",
    "read_model_index", "register_family",
]
