"""Optional compiled kernels (CPU fast paths with a pure-JAX reference)."""
