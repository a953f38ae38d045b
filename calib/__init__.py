"""INT8 calibration of ClusterViG ONNX graphs."""
