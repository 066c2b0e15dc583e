"""Model checkpoints the project ships or builds: tiny fixtures of the real MoE families, and the
embedded default that ``roma-serve`` runs when no model is given."""

from roma_models.default import default_model_dir
from roma_models.tiny import FAMILIES, build_tiny_model

__all__ = ["FAMILIES", "build_tiny_model", "default_model_dir"]
