"""Model families (sd15, sdxl): loading a teacher, prompt encoding, added conditioning, VAE scaling."""

from .base import FamilyModel
from .loading import FAMILIES, detect_family, is_hub_id, load_family, read_model_index
from .sd15 import SD15Model
from .sdxl import SDXLModel

__all__ = [
    "FAMILIES", "FamilyModel", "SD15Model", "SDXLModel", "detect_family", "is_hub_id", "load_family",
    "read_model_index",
]
