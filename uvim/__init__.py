"""UViM: a unified modeling approach for vision with learned guiding codes (JAX/Flax)."""
