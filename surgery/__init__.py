"""surgery: rewrite PyTorch vision models as torch.fx graphs, measure, export.

    import surgery
    result = surgery.apply("resnet50", ["fuse"])
    result.save("runs/resnet50-fused", onnx=True)
    model = surgery.load("runs/resnet50-fused")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it. Imported on first use, so that `surgery --help` and
# the CLI's refusals of bad input answer without importing torch.
_EXPORTS = {
    "apply": "pipeline", "SurgeryResult": "pipeline",
    "trace": "graph",
    "load": "artifact", "load_artifact": "artifact", "verify_artifact": "artifact",
    "load_model": "models", "LoadedModel": "models",
    "export_onnx": "export", "verify_onnx": "export", "check_parity": "export",
    "SurgeryError": "errors",
    "PassContext": "passes", "register": "passes",
    "BilinearConfig": "passes.bilinear", "EbcleConfig": "passes.ebcle", "FuseConfig": "passes.fuse",
    "PruneConfig": "passes.prune", "RescaleConfig": "passes.rescale",
    "ProgressiveResize": "schedule",
}

if TYPE_CHECKING:
    from .artifact import load, load_artifact, verify_artifact
    from .errors import SurgeryError
    from .export import check_parity, export_onnx, verify_onnx
    from .graph import trace
    from .models import LoadedModel, load_model
    from .passes import PassContext, register
    from .passes import describe as describe_passes
    from .passes.bilinear import BilinearConfig
    from .passes.ebcle import EbcleConfig
    from .passes.fuse import FuseConfig
    from .passes.prune import PruneConfig
    from .passes.rescale import RescaleConfig
    from .pipeline import SurgeryResult, apply
    from .schedule import ProgressiveResize


def __getattr__(name: str) -> Any:
    if name == "describe_passes":
        from .passes import describe

        return describe
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, "describe_passes"])


__all__ = [
    "__version__", "apply", "trace", "load", "load_artifact", "verify_artifact", "load_model",
    "export_onnx", "verify_onnx", "check_parity",
    "SurgeryResult", "SurgeryError", "LoadedModel",
    "PassContext", "register", "describe_passes", "FuseConfig", "BilinearConfig",
    "PruneConfig", "RescaleConfig", "EbcleConfig", "ProgressiveResize",
]
