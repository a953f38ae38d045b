"""Runtimes (ONNX Runtime, TensorRT) for exported ClusterViG models."""
