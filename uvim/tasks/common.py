"""Helpers shared by the tasks: label maps <-> per-patch tensors."""

from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp

from uvim.models import vit


def patchify(x_BxHxWxC: jnp.ndarray, patch_size: Sequence[int]) -> jnp.ndarray:
  """(B, H, W, C) -> (B, tokens, C, p*p): the layout of stage I inputs and outputs."""
  p, q = patch_size
  return einops.rearrange(x_BxHxWxC, "b (h p) (w q) c -> b (h w) c (p q)", p=p, q=q)


def unpatchify(x_BxTxCxP: jnp.ndarray, patch_size: Sequence[int],
               grid: Sequence[int]) -> jnp.ndarray:
  """(B, tokens, C, p*p) -> (B, H, W, C)."""
  p, q = patch_size
  return einops.rearrange(x_BxTxCxP, "b (h w) c (p q) -> b (h p) (w q) c",
                          h=grid[0], w=grid[1], p=p, q=q)


def grid_of(model_config) -> tuple[int, int]:
  """Tokens per side of a stage I model: input_size // patch_size."""
  return vit.patch_grid(model_config.input_size, model_config.patch_size)


def one_hot_patches(ids_BxHxW: jnp.ndarray, num_classes: int,
                    patch_size: Sequence[int]) -> jnp.ndarray:
  """Integer map -> one-hot patches (B, tokens, num_classes, p*p); ids outside
  [0, num_classes) give all-zero vectors."""
  patches = patchify(ids_BxHxW[..., None], patch_size)[:, :, 0]  # (B, T, P)
  # Written in its final layout: one-hot rows gathered and then transposed cost a full copy.
  return jax.nn.one_hot(patches, num_classes, dtype=jnp.float32, axis=-2)


def softmax_xent(logits_BxTxCxP: jnp.ndarray, one_hot_BxTxCxP: jnp.ndarray) -> jnp.ndarray:
  """Cross-entropy over the class axis (-2), per pixel: (B, T, P)."""
  log_p = jax.nn.log_softmax(logits_BxTxCxP, axis=-2)
  return -jnp.sum(one_hot_BxTxCxP * log_p, axis=-2)
