"""KeyRe-ID: keypoint-guided video person re-identification (model, losses, inference encoder)."""
from .config import ModelConfig
from .registry import MODEL_CONFIGS, build_model, get_config, list_models

__all__ = ["ModelConfig", "MODEL_CONFIGS", "build_model", "get_config", "list_models", "Encoder"]


def __getattr__(name: str):
    if name == "Encoder":
        from .encoder import Encoder

        return Encoder
    raise AttributeError(name)
