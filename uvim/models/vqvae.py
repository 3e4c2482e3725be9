"""Stage I (`proj.uvim.vit`): the restricted oracle, a ViT VQ-VAE over task labels.

The encoder sees the labels (each modality as patches, B x tokens x C x patch^2) plus the image
context and compresses them into `code_len` discrete codes from a dictionary of `dict_size`
words; the decoder (the "base model") predicts the labels back from the code plus the image.
Parameter names and computation follow big_vision's UViM so that its checkpoints load. The
quantizer is one small interface, vectors in and (bottleneck, quantised vectors, integer code)
out, `codewords()` and `embed(code)` between indices and vectors: `VectorQuantizer`, the
paper's dictionary (not a parameter: discounted sums and counts in the `state` collection,
updated from the global batch), or `ScalarQuantizer`.

`dtype` is the computation dtype of the transformers, embeddings and heads (e.g. "bfloat16");
parameters, the bottleneck, the dictionary and its updates, and the returned logits stay
float32. `remat` recomputes each transformer block's activations in the backward pass.
`scan_layers` runs each transformer (`encoder`, `decoder`) as one scanned block whose parameters
are stacked under `encoderblock` (see `vit.Encoder`; `uvim.checkpoint` converts the layouts).

`quantizer='fsq'` replaces the dictionary by finite scalar quantization (`uvim.models.fsq`):
the encoder head projects to len(fsq_levels) dimensions, each rounded to its level grid; the
code's words are the grid's prod(fsq_levels) points (`dict_size` must equal it), and there is
no `state` collection.
"""

from collections.abc import Mapping, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uvim.models import fsq, vit

SPLIT_PERTURBATION = 0.001  # A split word is the most used one times uniform(1 +- this).
# Class ids over fewer classes are embedded through their one-hot vectors: a gather reads
# patch^2 x width floats per token whatever the class count, while the one-hot matmul's cost
# grows with it, and below ~32 classes the matmul is the faster (XLA:CPU: 0.83x with 16 + 9
# classes, 1.11x with 64, 1.2x with 134 + 100; `python -m bench --only label_embedding`).
GATHER_MIN_CLASSES = 32


def grid_side(code_len: int) -> int:
  """The side of the square grid a code of `code_len` words covers (raster order)."""
  return round(code_len**0.5)


def quantize(x_BxKxD: jnp.ndarray, codewords_NxD: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Nearest codeword (squared Euclidean) of each vector, with a straight-through gradient."""
  dist = (jnp.sum(x_BxKxD**2, -1, keepdims=True) - 2 * x_BxKxD @ codewords_NxD.T
          + jnp.sum(codewords_NxD**2, -1))
  code_BxK = jnp.argmin(dist, axis=-1)
  x_q = codewords_NxD[code_BxK]
  return x_BxKxD + jax.lax.stop_gradient(x_q - x_BxKxD), code_BxK


def split_most_used_word(state: dict) -> dict:
  """Replaces the least used word by a perturbed copy of the most used; both halve."""
  rng, rng_noise = jax.random.split(state["rng"])
  dictionary, counts = state["dictionary"], state["counts"]
  most, least = jnp.argmax(counts), jnp.argmin(counts)
  noise = jax.random.uniform(rng_noise, dictionary.shape[1:], jnp.float32,
                             1 - SPLIT_PERTURBATION, 1 + SPLIT_PERTURBATION)
  dictionary = dictionary.at[least].set(dictionary[most] * noise)
  counts = counts.at[least].set(counts[most] / 2).at[most].set(counts[most] / 2)
  dictionary = dictionary.at[least].set(dictionary[least] / 2)
  dictionary = dictionary.at[most].set(dictionary[most] / 2)
  return {"rng": rng, "dictionary": dictionary, "counts": counts}


def codebook_stats(code_BxK: jnp.ndarray, dict_size: int) -> dict[str, jnp.ndarray]:
  """Usage of the dictionary in a (global) batch of codes."""
  counts = jnp.zeros(dict_size, jnp.float32).at[code_BxK.ravel()].add(1)
  p = counts / jnp.sum(counts)
  return {
      "codebook_max_ratio": jnp.max(p),
      "codebook_zeros_ratio": jnp.mean(counts == 0),
      "codebook_usage": jnp.mean(counts > 0),
      "codebook_perplexity": jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0))),
  }


def code_dropout_mask(rng: jax.Array, batch: int, code_len: int, mode: str) -> jnp.ndarray:
  """Per example, keep a uniformly random fraction of the code: random positions ("random")
  or a prefix ("prefix"). Returns a (batch, code_len) boolean mask."""
  rng_fraction, rng_positions = jax.random.split(rng)
  importance = jnp.linspace(1.0, 0.0, code_len + 2)[1:-1]
  threshold = jax.random.uniform(rng_fraction, (batch,))
  mask = importance[None, :] > threshold[:, None]
  if mode == "random":
    mask = jax.random.permutation(rng_positions, mask, axis=-1, independent=True)
  return mask


def embed_ids(kernel_CxPxW: jnp.ndarray, ids_BxTxP: jnp.ndarray) -> jnp.ndarray:
  """sum_p kernel[ids[..., p], p]: one-hot(ids) (B, T, C, P) times the kernel, computed by
  indexing (its gradient is a scatter-add), without the C-fold larger matmul; ids outside
  [0, C) add nothing, like an all-zero one-hot vector."""
  num_classes, patch, width = kernel_CxPxW.shape
  rows = ids_BxTxP * patch + jnp.arange(patch)
  rows = jnp.where((ids_BxTxP >= 0) & (ids_BxTxP < num_classes), rows, num_classes * patch)
  embedded = jnp.take(kernel_CxPxW.reshape(num_classes * patch, width), rows, axis=0,
                      mode="fill", fill_value=0)
  return jnp.sum(embedded, axis=-2)


class VectorQuantizer(nn.Module):
  """big_vision's VQ bottleneck: vectors are standardised per token and snapped to the nearest
  word of a dictionary kept in the `state` collection (`dictionary`: discounted sums of the
  vectors assigned to each word, `counts`: discounted counts), updated from the global batch in
  training (under `jax.jit` a sum over the batch axis is a sum over every device); a word whose
  count falls below `min_count` is replaced by a split of the most used one."""

  dict_size: int
  dim: int
  momentum: float
  min_count: float

  def setup(self):
    init = nn.initializers.normal(stddev=1 / np.sqrt(self.dict_size))
    self.dictionary = self.variable("state", "dictionary",
                                    lambda: init(self.make_rng("state"), (self.dict_size,
                                                                          self.dim)))
    self.counts = self.variable("state", "counts", jnp.ones, (self.dict_size,))

  def codewords(self) -> jnp.ndarray:
    """Discounted mean of each word's vectors, L2-normalised."""
    e = self.dictionary.value / self.counts.value[:, None]
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

  def embed(self, code: jnp.ndarray) -> jnp.ndarray:
    """The vectors of integer codes."""
    return self.codewords()[code]

  def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, ...]:
    """(bottleneck (the standardised vectors), quantised vectors, code); with `train` the
    dictionary is updated from this batch."""
    bottleneck = jax.nn.standardize(x, axis=-1)
    quantized, code = quantize(bottleneck, self.codewords())
    if train:
      self._update(bottleneck, code)
    return bottleneck, quantized, code

  def _update(self, bottleneck: jnp.ndarray, code: jnp.ndarray) -> None:
    """EMA of counts and sums over the global batch, then split words whose count is low."""
    flat_code = code.ravel()
    counts = jnp.zeros(self.dict_size, jnp.float32).at[flat_code].add(1)
    sums = jnp.zeros_like(self.dictionary.value).at[flat_code].add(
        jax.lax.stop_gradient(bottleneck.reshape(-1, bottleneck.shape[-1])))
    state = {"rng": self.make_rng("vqvae"),
             "counts": self.counts.value * self.momentum + counts,
             "dictionary": self.dictionary.value * self.momentum + sums}
    state = jax.lax.while_loop(lambda s: jnp.any(s["counts"] < self.min_count),
                               split_most_used_word, state)
    self.counts.value, self.dictionary.value = state["counts"], state["dictionary"]


class ScalarQuantizer(nn.Module):
  """Finite scalar quantization (`uvim.models.fsq`): each of len(levels) dimensions rounded to
  its level grid; the words are the grid's prod(levels) points. No parameters, no state."""

  levels: Sequence[int]

  def codewords(self) -> jnp.ndarray:
    """The grid's points, in index order."""
    return fsq.indices_to_codes(jnp.arange(fsq.codebook_size(self.levels)), self.levels)

  def embed(self, code: jnp.ndarray) -> jnp.ndarray:
    return fsq.indices_to_codes(code, self.levels)

  def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, ...]:
    """(bottleneck, quantised vectors, code)."""
    quantized, code = fsq.quantize(x, self.levels)
    return x, quantized, code


class LabelEmbedding(nn.Module):
  """Per-patch labels -> token embeddings: a dense layer over (C, patch^2), named and
  initialised like big_vision's (flax's DenseGeneral). Float inputs (B, T, C, P) are
  contracted with the kernel; integer class ids (B, T, P) are embedded as their one-hot
  vectors would be, by `embed_ids` from GATHER_MIN_CLASSES classes on."""

  features: int
  shape: tuple[int, ...]  # (C, patch^2)
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    n = len(self.shape)
    init = nn.initializers.lecun_normal(in_axis=tuple(range(n)), out_axis=n)
    kernel = self.param("kernel", init, (*self.shape, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    dtype = jnp.dtype(self.dtype)
    if jnp.issubdtype(x.dtype, jnp.integer):
      if self.shape[0] >= GATHER_MIN_CLASSES:
        return embed_ids(kernel, x).astype(dtype) + bias.astype(dtype)
      x = jax.nn.one_hot(x, self.shape[0], axis=-2)
    contract = tuple(range(x.ndim - n, x.ndim))
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                            ((contract, tuple(range(n))), ((), ())))
    return y + bias.astype(dtype)


class Model(nn.Module):
  """The stage I VQ-VAE. `inputs`/`outputs` map modality names to (C, patch^2)."""

  inputs: Mapping[str, Sequence[int]]
  outputs: Mapping[str, Sequence[int]]
  input_size: Sequence[int] = (512, 512)
  patch_size: Sequence[int] = (16, 16)
  code_len: int = 256
  width: int = 768
  oracle_depth: int = 6
  base_model_depth: int = 12
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  head_zeroinit: bool = True
  dict_size: int = 4096
  codeword_dim: int | None = None
  quantizer: str = "vq"  # or "fsq": finite scalar quantization with `fsq_levels`
  fsq_levels: Sequence[int] = ()
  dict_momentum: float = 0.995
  min_count: float = 0.1  # ~0.995^460: a word unused for ~460 steps is replaced.
  with_encoder_ctx: bool = True
  with_decoder_ctx: bool = True
  code_dropout: str = "none"  # "none", "random" (random positions) or "prefix"
  bottleneck_resize: bool = True
  # How the panoptic task numbers the instances it feeds and predicts (`tasks.panoptic`), and
  # its things: kept with the model, since a code only reads under the rule it was trained with.
  instance_ids: str = "raster"
  thing_classes: int = 0
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False
  attention: str = "einsum"  # vit.ATTENTION

  def setup(self):
    self.grid = vit.patch_grid(self.input_size, self.patch_size)
    num_tokens = int(np.prod(self.grid))
    self.code_side = grid_side(self.code_len)
    if self.bottleneck_resize and self.code_side**2 != self.code_len:
      raise ValueError(f"bottleneck_resize needs a square code_len, got {self.code_len}")
    if self.code_dropout not in ("none", "random", "prefix"):
      raise ValueError(f"code_dropout must be 'none', 'random' or 'prefix', got "
                       f"{self.code_dropout!r}")
    dtype = jnp.dtype(self.dtype)
    self.embeddings = {k: LabelEmbedding(self.width, tuple(shape), self.dtype,
                                         name=f"embedding_{k}")
                       for k, shape in self.inputs.items()}
    head_init = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
    self.heads = {k: nn.DenseGeneral(features=tuple(shape), dtype=dtype, name=f"head_{k}",
                                     **head_init) for k, shape in self.outputs.items()}
    conv = dict(features=self.width, kernel_size=tuple(self.patch_size),
                strides=tuple(self.patch_size), padding="VALID", dtype=dtype)
    if self.with_encoder_ctx:
      self.ctx_enc_embedding = nn.Conv(**conv)
    if self.with_decoder_ctx:
      self.ctx_dec_embedding = nn.Conv(**conv)
    self.pos_embedding_encoder = vit.learned_posemb(
        self, "pos_embedding_encoder", num_tokens, self.width)
    self.pos_embedding_decoder = vit.learned_posemb(
        self, "pos_embedding_decoder", num_tokens, self.width)
    transformer = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                       dtype=self.dtype, remat=self.remat, scan_layers=self.scan_layers,
                       attention=self.attention)
    self.encoder = vit.Encoder(depth=self.oracle_depth, **transformer)
    self.decoder = vit.Encoder(depth=self.base_model_depth, **transformer)
    if not self.bottleneck_resize:
      self.bottleneck_downsample = self.param(
          "bottleneck_downsample", nn.initializers.xavier_uniform(), (num_tokens, self.code_len))
      self.bottleneck_upsample = self.param(
          "bottleneck_upsample", nn.initializers.xavier_uniform(), (self.code_len, num_tokens))
    if self.quantizer == "fsq":
      if fsq.codebook_size(self.fsq_levels) != self.dict_size or not self.fsq_levels:
        raise ValueError(f"quantizer 'fsq': dict_size ({self.dict_size}) must be the product of "
                         f"fsq_levels {tuple(self.fsq_levels)} "
                         f"({fsq.codebook_size(self.fsq_levels)})")
      dim, self.codebook = len(self.fsq_levels), ScalarQuantizer(tuple(self.fsq_levels))
    elif self.quantizer == "vq":
      dim = self.codeword_dim or self.width
      self.codebook = VectorQuantizer(self.dict_size, dim, self.dict_momentum, self.min_count)
    else:
      raise ValueError(f"quantizer must be 'vq' or 'fsq', got {self.quantizer!r}")
    nn.share_scope(self, self.codebook)  # its state at the top level, as in big_vision
    self.encoder_head = nn.Dense(dim, dtype=jnp.float32)  # The bottleneck feeds the quantizer.
    self.decoder_stem = nn.Dense(self.width, dtype=dtype)

  def codewords(self) -> jnp.ndarray:
    """The code's words (dict_size, dim), as the decoder sees them."""
    return self.codebook.codewords()

  def _resize_tokens(self, x_BxLxD: jnp.ndarray, src: Sequence[int],
                     dst: Sequence[int]) -> jnp.ndarray:
    x = einops.rearrange(x_BxLxD, "b (h w) c -> b h w c", h=src[0], w=src[1])
    x = jax.image.resize(x, (x.shape[0], *dst, x.shape[-1]), method="linear")
    return einops.rearrange(x, "b h w c -> b (h w) c")

  def _ctx_tokens(self, stem: nn.Module, ctx: jnp.ndarray) -> jnp.ndarray:
    return einops.rearrange(stem(ctx), "b h w c -> b (h w) c")

  def encode(self, x: Mapping[str, jnp.ndarray], *, ctx: jnp.ndarray | None = None,
             train: bool = False) -> tuple[jnp.ndarray, dict]:
    """Labels (+ context) -> quantised code vectors (B, code_len, dim) and `aux`.

    `aux` has `bottleneck` (standardised pre-quantisation vectors), `bottleneck_q`, `code`
    (B, code_len) ints and codebook statistics. With `train` the dictionary state is updated
    from this batch.
    """
    h = sum(self.embeddings[k](x[k]) for k in self.inputs)
    if self.with_encoder_ctx:
      h = h + self._ctx_tokens(self.ctx_enc_embedding, ctx)
    h = self.encoder(h + self.pos_embedding_encoder, deterministic=not train).astype(jnp.float32)
    if self.bottleneck_resize:
      h = self._resize_tokens(h, self.grid, (self.code_side, self.code_side))
    else:
      h = jnp.einsum("btc,tn->bnc", h, self.bottleneck_downsample)
    bottleneck, quantized, code = self.codebook(self.encoder_head(h), train=train)
    aux = {"bottleneck": bottleneck, "bottleneck_q": quantized, "code": code,
           **codebook_stats(code, self.dict_size)}
    return quantized, aux

  def decode(self, x: jnp.ndarray, *, ctx: jnp.ndarray | None = None,
             discrete_input: bool = False, train: bool = False) -> tuple[dict, dict]:
    """Code vectors (or integer codes with `discrete_input`) + context -> logits per output."""
    if discrete_input:
      x = self.codebook.embed(x)
    if train and self.code_dropout != "none":
      mask = code_dropout_mask(self.make_rng("dropout"), x.shape[0], self.code_len,
                               self.code_dropout)
      x = x * mask[:, :, None]
    h = self.decoder_stem(x)
    if self.bottleneck_resize:
      h = self._resize_tokens(h, (self.code_side, self.code_side), self.grid)
    else:
      h = jnp.einsum("bnc,nt->btc", h, self.bottleneck_upsample.astype(h.dtype))
    if self.with_decoder_ctx:
      h = h + self._ctx_tokens(self.ctx_dec_embedding, ctx)
    h = self.decoder(h + self.pos_embedding_decoder, deterministic=not train)
    logits = {k: head(h).astype(jnp.float32) for k, head in self.heads.items()}
    return logits, {"logits": logits}

  def __call__(self, x: Mapping[str, jnp.ndarray], *, ctx: jnp.ndarray | None = None,
               train: bool = False) -> tuple[dict, dict]:
    """Encode then decode: (logits per output, aux of both)."""
    quantized, aux_enc = self.encode(x, ctx=ctx, train=train)
    logits, aux_dec = self.decode(quantized, ctx=ctx, train=train)
    return logits, {**aux_enc, **aux_dec}
