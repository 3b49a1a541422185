"""surgery: rewrite PyTorch vision models as torch.fx graphs, measure, export.

    import surgery
    result = surgery.apply("resnet50", ["fuse"])
    result.save("runs/resnet50-fused", onnx=True)
    model = surgery.load("runs/resnet50-fused")
"""

__version__ = "0.1.0"

from .artifact import load, load_artifact  # noqa: E402
from .errors import SurgeryError  # noqa: E402
from .export import check_parity, export_onnx, verify_onnx  # noqa: E402
from .graph import trace  # noqa: E402
from .models import LoadedModel, load_model  # noqa: E402
from .passes import PassContext, register  # noqa: E402
from .passes import describe as describe_passes
from .passes.bilinear import BilinearConfig  # noqa: E402
from .passes.ebcle import EbcleConfig  # noqa: E402
from .passes.fuse import FuseConfig  # noqa: E402
from .passes.prune import PruneConfig  # noqa: E402
from .passes.rescale import RescaleConfig  # noqa: E402
from .pipeline import SurgeryResult, apply  # noqa: E402
from .schedule import ProgressiveResize  # noqa: E402

__all__ = [
    "__version__", "apply", "trace", "load", "load_artifact", "load_model",
    "export_onnx", "verify_onnx", "check_parity",
    "SurgeryResult", "SurgeryError", "LoadedModel",
    "PassContext", "register", "describe_passes", "FuseConfig", "BilinearConfig",
    "PruneConfig", "RescaleConfig", "EbcleConfig", "ProgressiveResize",
]
