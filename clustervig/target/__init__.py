"""On a target machine (a Jetson, a GPU server): ``cvig build-plugins`` builds the CUDA kernels and the
TensorRT plugins from the installed sources, ``cvig doctor`` says what works there."""
