"""ClusterViG in PyTorch: the paper's model in a reference and a static (exportable) form.

Quick start::

    import clustervig
    model = clustervig.create_model("cvig_ti", num_classes=1000).eval()
    logits = model(images)            # images [B, 3, 224, 224], ImageNet-normalised

See docs/design.md (shared with the ONNX graph and TensorRT plugins) for the exact
semantics of DEGC that every form implements.
"""
from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .model import ClusterViG, ClusterViGConfig
from .registry import PAPER_TABLE3, create_model, get_config, list_models

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "ClusterViG",
    "ClusterViGConfig",
    "CheckpointError",
    "create_model",
    "get_config",
    "list_models",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "PAPER_TABLE3",
]
