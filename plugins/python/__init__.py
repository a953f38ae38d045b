"""ClusterViG plugin ops outside TensorRT: numpy references and a ctypes loader for the CUDA kernels.

``clustervig.plugins.reference`` holds CPU implementations of every plugin op,
written independently of the PyTorch model; ``clustervig.plugins.kernels``
calls ``libcvig_kernels.so`` on PyTorch CUDA tensors.
"""
