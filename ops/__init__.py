"""Pure numerics of ManifoldGD: no Ray, no file I/O, no global state.

Functions take numpy arrays on CPU and the same code runs on CuPy arrays on a GPU
(see ``ops.backend``). Guidance maths is also written to accept torch tensors.
"""
