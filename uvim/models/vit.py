"""ViT building blocks with big_vision's parameter names, so its checkpoints load directly.

`dtype` is the computation dtype of activations and matmuls (e.g. "bfloat16"); parameters stay
float32. `remat` recomputes each block's activations in the backward pass to save memory.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def learned_posemb(module: nn.Module, name: str, num_tokens: int, width: int) -> jnp.ndarray:
  """A learned position embedding (1, num_tokens, width), initialised N(0, 1/width)."""
  return module.param(name, nn.initializers.normal(stddev=1 / np.sqrt(width)),
                      (1, num_tokens, width))


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> GELU -> Dense."""
  mlp_dim: int | None = None  # Defaults to 4x the input width.
  dropout: float = 0.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxLxD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6), dtype=jnp.dtype(self.dtype))
    d = x_BxLxD.shape[-1]
    x = nn.gelu(nn.Dense(self.mlp_dim or 4 * d, **inits)(x_BxLxD))
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(d, **inits)(x)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block: self-attention then MLP, each residual."""
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxLxD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    dtype = jnp.dtype(self.dtype)
    y = nn.LayerNorm(dtype=dtype)(x_BxLxD)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        deterministic=deterministic, dtype=dtype)(y, y)
    x = x_BxLxD + nn.Dropout(rate=self.dropout)(y, deterministic)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype)(
        nn.LayerNorm(dtype=dtype)(x), deterministic)
    return x + nn.Dropout(rate=self.dropout)(y, deterministic)


class Encoder(nn.Module):
  """A stack of `depth` blocks (`encoderblock_<i>`) and a final LayerNorm (`encoder_norm`).

  The input is cast to `dtype`, which is also the dtype of the output."""
  depth: int
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype: str = "float32"
  remat: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    # `deterministic` (argument 2, counting the module) is a Python bool: static under remat.
    block = nn.remat(Encoder1DBlock, static_argnums=(2,)) if self.remat else Encoder1DBlock
    x = x_BxLxD.astype(self.dtype)
    for i in range(self.depth):
      x = block(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                dtype=self.dtype, name=f"encoderblock_{i}")(x, deterministic)
    return nn.LayerNorm(dtype=jnp.dtype(self.dtype), name="encoder_norm")(x)
