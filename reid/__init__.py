"""KeyRe-ID: keypoint-guided video person re-identification (model, losses, inference encoder).

Public names load lazily so that `reid.keypoints` (used by tracking and training) does not
pull in torch.
"""
from importlib import import_module

_EXPORTS = {
    "ModelConfig": "reid.config",
    "MODEL_CONFIGS": "reid.registry",
    "build_model": "reid.registry",
    "get_config": "reid.registry",
    "list_models": "reid.registry",
    "Encoder": "reid.encoder",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reid' has no attribute {name!r}")
