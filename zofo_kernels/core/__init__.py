"""The kernel library: the noise contract, the kernel API over its backends (native C++ and
CUDA, Triton, reference), the optimizers and data parallelism. Needs torch and numpy only
(Triton where present); imports nothing from the layers above."""
