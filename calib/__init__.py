"""INT8 calibration of ClusterViG ONNX graphs (symmetric Q/DQ for strongly typed TensorRT)."""
from .calibrate import (METHODS, collect_ranges, conv_activations, load_or_collect, quantize_qdq, quantized_activations,
                        residual_adds)
from .data import CalibrationDataError, array_batches, calibration_files, file_batches, folder_batches, image_files

__all__ = ["METHODS", "collect_ranges", "conv_activations", "quantized_activations", "residual_adds", "load_or_collect",
           "quantize_qdq",
           "CalibrationDataError", "array_batches", "calibration_files", "file_batches", "folder_batches",
           "image_files"]
