"""Export of ClusterViG to ONNX (FP32/FP16/INT8) and TensorRT engines: see the cvig-export issue."""
