"""Triton kernels, one family per file. Importing this package does not import triton."""
