"""CPU emulation of the CUDA runtime: runs the csrc/ kernels and bindings without a GPU (tests only)."""
