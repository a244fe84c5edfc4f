"""Triton kernels of sefe_fast (installed as the import package `sefe_fast_kernels`)."""
