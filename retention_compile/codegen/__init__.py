"""Code generation: shape-specialised Triton and CUDA sources, rendered, compiled, cached and launched."""
