"""Triton kernels of vlmkern, installed as the subpackage vlmkern.triton_kernels."""
