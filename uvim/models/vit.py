"""ViT building blocks with big_vision's parameter names, so its checkpoints load directly.

`dtype` is the computation dtype of activations and matmuls (e.g. "bfloat16"); parameters stay
float32. `remat` recomputes each block's activations in the backward pass to save memory.
`scan_layers` runs the blocks as one `nn.scan` loop over a single compiled block body (faster
compiles, less memory at depth); their parameters are then stacked under `encoderblock` with a
leading depth axis, as in big_vision's `scan=True`, and `uvim.checkpoint.scan_to_unscanned` /
`unscanned_to_scan` convert between the two layouts. `attention` picks the attention kernel
(`ATTENTION`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# "einsum": explicit einsums and softmax (flax's arithmetic, the reference); "fused":
# `jax.nn.dot_product_attention`, which XLA lowers to cuDNN's fused (flash) attention on GPUs
# where supported and to the same einsums elsewhere. Attention dropout always uses "einsum".
ATTENTION = ("einsum", "fused")


def patch_grid(input_size, patch_size) -> tuple[int, ...]:
  """Patches per side of an image: input_size // patch_size, per axis."""
  return tuple(int(i // p) for i, p in zip(input_size, patch_size, strict=True))


def check_attention(attention: str) -> None:
  if attention not in ATTENTION:
    raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")


# Jitted so that it is one named call in jaxprs, HLO and profiles.
_dot_product_attention = jax.jit(jax.nn.dot_product_attention)


def fused_attention(query, key, value, mask=None):
  """Attention over (B, L, H, D) queries and (B, S, H, D) keys/values as one op; `mask`
  broadcasts to (B, H, L, S), non-zero = attend. Also a flax `attention_fn` (no dropout)."""
  mask = None if mask is None else jnp.asarray(mask).astype(bool)
  return _dot_product_attention(query, key, value, mask=mask)


def learned_posemb(module: nn.Module, name: str, num_tokens: int, width: int) -> jnp.ndarray:
  """A learned position embedding (1, num_tokens, width), initialised N(0, 1/width)."""
  return module.param(name, nn.initializers.normal(stddev=1 / np.sqrt(width)),
                      (1, num_tokens, width))


def sincos2d_posemb(grid: tuple[int, int], width: int, scale: tuple[float, float] = (1, 1),
                    temperature: float = 10_000.0) -> jnp.ndarray:
  """A fixed 2D sine-cosine position embedding (1, h * w, width): a quarter of the channels each
  for sin(x), cos(x), sin(y), cos(y) at geometrically spaced frequencies. Cell (i, j) sits at
  the centre of its `scale`-sized cell, in units of cells of size 1."""
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {width}")
  y, x = np.mgrid[:grid[0], :grid[1]].astype(np.float64)
  y, x = (y + 0.5) * scale[0] - 0.5, (x + 0.5) * scale[1] - 0.5
  omega = 1.0 / temperature ** (np.arange(width // 4) / max(width // 4 - 1, 1))
  y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
  return jnp.asarray(np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], 1)[None],
                     jnp.float32)


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
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x_BxLxD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    dtype = jnp.dtype(self.dtype)
    y = nn.LayerNorm(dtype=dtype)(x_BxLxD)
    check_attention(self.attention)
    fused = {"attention_fn": fused_attention} if self.attention == "fused" else {}
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        deterministic=deterministic, dtype=dtype, **fused)(y, y)
    x = x_BxLxD + nn.Dropout(rate=self.dropout)(y, deterministic)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype)(
        nn.LayerNorm(dtype=dtype)(x), deterministic)
    return x + nn.Dropout(rate=self.dropout)(y, deterministic)


class Encoder(nn.Module):
  """A stack of `depth` blocks (`encoderblock_<i>`, or one `encoderblock` with parameters
  stacked on a leading depth axis under `scan_layers`) and a final LayerNorm (`encoder_norm`).

  The input is cast to `dtype`, which is also the dtype of the output."""
  depth: int
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x_BxLxD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    # `deterministic` (argument 2, counting the module) is a Python bool: static under remat.
    # Inside a scan body, preventing CSE is unnecessary (see jax.checkpoint) and costs speed.
    block = (nn.remat(Encoder1DBlock, static_argnums=(2,), prevent_cse=not self.scan_layers)
             if self.remat else Encoder1DBlock)
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
              dtype=self.dtype, attention=self.attention)
    x = x_BxLxD.astype(self.dtype)
    if self.scan_layers:
      # One block body looped `depth` times: its parameters (and sown intermediates) get a
      # leading depth axis and each layer its own params / dropout rng. `deterministic` is
      # closed over, so it stays a static Python bool (also for remat's `static_argnums`).
      scan = nn.scan(lambda module, carry: (module(carry, deterministic), None),
                     variable_axes={"params": 0, "intermediates": 0},
                     split_rngs={"params": True, "dropout": True}, length=self.depth)
      x, _ = scan(block(**kw, name="encoderblock"), x)
    else:
      for i in range(self.depth):
        x = block(**kw, name=f"encoderblock_{i}")(x, deterministic)
    return nn.LayerNorm(dtype=jnp.dtype(self.dtype), name="encoder_norm")(x)
