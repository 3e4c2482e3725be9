"""Finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE Made Simple"): a stage I
bottleneck without a dictionary.

Each of the d = len(levels) dimensions of a vector is bounded to L_i values and rounded with a
straight-through gradient; the codebook is the implicit product grid of prod(L_i) codes, with no
parameters, no state and no dead codes. Everything runs in float32 (bf16 rounding can leave
the grid). Codes and indices convert arithmetically, so the grid is never built for a batch.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-3  # keeps tanh's bound strictly inside the outermost level
# The paper's recommended levels (its Table 1) per codebook size: every level >= 5.
RECOMMENDED_LEVELS = {2**8: (8, 6, 5), 2**10: (8, 5, 5, 5), 2**12: (7, 5, 5, 5, 5),
                      2**14: (8, 8, 8, 6, 5), 2**16: (8, 8, 8, 5, 5, 5)}


def codebook_size(levels: Sequence[int]) -> int:
  """prod(levels): the number of codes."""
  return int(np.prod(levels))


def bound(z: jnp.ndarray, levels: Sequence[int]) -> jnp.ndarray:
  """tanh(z + shift) * half_l - offset per dimension: values in an interval that rounds to
  exactly L values, centred on the grid for even L (offset 0.5, shift = arctanh(0.5 / half_l),
  so that z = 0 maps to 0)."""
  levels_ = jnp.asarray(levels, jnp.float32)
  half_l = (levels_ - 1) * (1 - EPS) / 2
  offset = jnp.where(levels_ % 2 == 0, 0.5, 0.0)
  shift = jnp.arctanh(offset / half_l)
  return jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset


def quantize(z: jnp.ndarray, levels: Sequence[int]) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(..., d) -> (codes in [-1, 1] on the grid, with a straight-through gradient; indices in
  [0, prod(levels)))."""
  bounded = bound(z, levels)
  rounded = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)
  codes = rounded / jnp.asarray([level // 2 for level in levels], jnp.float32)
  return codes, codes_to_indices(codes, levels)


def codes_to_indices(codes: jnp.ndarray, levels: Sequence[int]) -> jnp.ndarray:
  """Grid codes (..., d) -> mixed-radix indices (...), digit i = code_i * (L_i // 2) + L_i // 2."""
  half = jnp.asarray([level // 2 for level in levels], jnp.float32)
  digits = jnp.round(codes * half + half).astype(jnp.int32)
  basis = jnp.asarray(np.cumprod([1, *levels[:-1]]), jnp.int32)
  return jnp.sum(digits * basis, axis=-1)


def indices_to_codes(indices: jnp.ndarray, levels: Sequence[int]) -> jnp.ndarray:
  """Indices (...) -> grid codes (..., d) in [-1, 1]."""
  basis = jnp.asarray(np.cumprod([1, *levels[:-1]]), jnp.int32)
  digits = (indices[..., None] // basis) % jnp.asarray(levels, jnp.int32)
  half = jnp.asarray([level // 2 for level in levels], jnp.float32)
  return (digits.astype(jnp.float32) - half) / half
