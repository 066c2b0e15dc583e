"""Model checkpoints the project ships or builds: tiny fixtures of the real MoE families, and the
embedded default that ``roma-serve`` and ``roma-train`` run when no model is given (built on
first use)."""

from roma_models.default import bench_model_dir, default_model_dir, models_root
from roma_models.tiny import FAMILIES, build_tiny_model

__all__ = ["FAMILIES", "bench_model_dir", "build_tiny_model", "default_model_dir", "models_root"]
