"""Make timm importable with a CPU torch next to a CUDA-only torchvision build.

The registry offers no CPU build of torchvision; the CUDA build installs next to a CPU
torch but its C++ operators fail to register, and ``import torchvision`` (hence
``import timm``) raises ``operator torchvision::nms does not exist``. Declaring the two
operator schemas that torchvision's Python side looks up at import time is enough for
everything this project uses (transforms, datasets, timm's models). Only torchvision's
compiled ops (nms, roi_align, ...) stay unavailable. Nothing is done when torchvision's
own operators are present, so a matching CUDA torch + torchvision is left untouched.
"""

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: "torch.library.Library | None" = None


def _torchvision_ops_loaded() -> bool:
    try:
        torch.ops.torchvision.nms.default  # noqa: B018 - attribute lookup is the probe
    except (AttributeError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> None:
    """Declare torchvision's missing operator schemas, once, when they are missing."""
    global _library
    if _library is not None or _torchvision_ops_loaded():
        return
    try:
        import torchvision  # noqa: F401 - a working build registers its own ops

        return
    except RuntimeError:
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for name, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            _library.define(schema)
