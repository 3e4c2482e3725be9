"""ViT building blocks with big_vision's parameter names, so its checkpoints load directly."""

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

  @nn.compact
  def __call__(self, x_BxLxD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))
    d = x_BxLxD.shape[-1]
    x = nn.gelu(nn.Dense(self.mlp_dim or 4 * d, **inits)(x_BxLxD))
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(d, **inits)(x)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block: self-attention then MLP, each residual."""
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BxLxD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    y = nn.LayerNorm()(x_BxLxD)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        deterministic=deterministic)(y, y)
    x = x_BxLxD + nn.Dropout(rate=self.dropout)(y, deterministic)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout)(nn.LayerNorm()(x), deterministic)
    return x + nn.Dropout(rate=self.dropout)(y, deterministic)


class Encoder(nn.Module):
  """A stack of `depth` blocks (`encoderblock_<i>`) and a final LayerNorm (`encoder_norm`)."""
  depth: int
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BxLxD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    x = x_BxLxD
    for i in range(self.depth):
      x = Encoder1DBlock(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                         name=f"encoderblock_{i}")(x, deterministic)
    return nn.LayerNorm(name="encoder_norm")(x)
