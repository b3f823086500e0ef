"""Kernels for the hot paths, each beside a pure-JAX reference, chosen through an `impl` switch."""
