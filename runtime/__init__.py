"""Runtimes for exported ClusterViG models: one Session over ONNX Runtime and TensorRT, image classification,
and the feature maps of a backbone export (``extract_features``).

    from clustervig.runtime import open_session, classify_files
    with open_session("out/model_fp32.onnx") as s:
        print(classify_files(s, ["photo.jpg"])[0]["top"][0])
"""
from .classify import class_names, classify_files
from .features import extract_features
from .session import OrtSession, RuntimeErrorWithFix, Session, TrtSession, open_session

__all__ = ["Session", "OrtSession", "TrtSession", "open_session", "classify_files", "class_names", "extract_features",
           "RuntimeErrorWithFix"]
