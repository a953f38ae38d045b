"""Export of ClusterViG to ONNX (FP32/FP16/INT8, plugin graph) and TensorRT engines: ``cvig export``
(:mod:`.cli`), with validation (:mod:`.validate`, :mod:`.gates`) and the TensorRT checks (:mod:`.trt_compat`)."""
