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


def class_patches(ids_BxHxW: jnp.ndarray, patch_size: Sequence[int]) -> jnp.ndarray:
  """Integer map -> class ids per patch (B, tokens, p*p): the stage I input of a categorical
  label. The model embeds them as one-hot vectors over its classes (without building them),
  and ids outside [0, classes) as all-zero vectors."""
  return patchify(ids_BxHxW[..., None], patch_size)[:, :, 0]


def softmax_xent(logits_BxTxCxP: jnp.ndarray, ids_BxTxP: jnp.ndarray) -> jnp.ndarray:
  """Cross-entropy over the class axis (-2), per pixel (B, T, P): logsumexp minus the label's
  logit (0 where the id is outside [0, classes), like an all-zero one-hot target)."""
  num_classes = logits_BxTxCxP.shape[-2]
  valid = (ids_BxTxP >= 0) & (ids_BxTxP < num_classes)
  label_logit = jnp.take_along_axis(
      logits_BxTxCxP, jnp.where(valid, ids_BxTxP, 0)[:, :, None], axis=-2)[:, :, 0]
  lse = jax.nn.logsumexp(logits_BxTxCxP, axis=-2)
  return jnp.where(valid, lse - label_logit, 0.0)
