"""Triton implementations, one module per op: kernels, host forward/backward and the autograd.Function.

Imported only when the Triton backend is chosen (``elastic_ops.functional``), since they need triton.
"""
