"""Stage II (`proj.uvim.lm`): a ViT image encoder and a decoder that predicts the guiding code.

The decoder is a transformer over code tokens (vocabulary = dictionary size + 1: targets are
code + 1, and id 0 is BOS) with causal self-attention, cross-attention to the image tokens and an
MLP per block. Parameter names and computation follow big_vision's UViM (`vtt.py`), so released
`*_stageII_params.npz` files load.

Besides teacher forcing (`__call__`), the model decodes one token at a time against a cache
(`init_cache`, `decode_step`): the self-attention keys/values of the tokens so far, and the
cross-attention keys/values of the image, computed once per image rather than at every step.

`masked=True` makes the decoder bidirectional and trains it to fill in masked tokens (id 0 is
then MASK instead of BOS; MaskGIT's objective): it decodes in any order, several tokens a step
(`decoding`, schemes 'maskgit' and 'roar'), each step one pass over the code (`fill_in`) against
the image's cached cross-attention keys/values. Same parameters as the causal model.

`dtype` is the computation dtype of activations and matmuls (e.g. "bfloat16"; parameters stay
float32, attention softmax and the returned logits are float32), and `remat` recomputes each
transformer block's activations in the backward pass of training to save memory.
`scan_layers` runs the image encoder's and the decoder's blocks each as one `nn.scan` (parameters
stacked on a leading depth axis under `encoder/encoderblock` and `decoder/EncDecBlock`, converted
to and from big_vision's `EncDecBlock<i>` by `uvim.checkpoint`); the decoding cache is then one
dict of arrays with a leading layer axis instead of a list of per-block dicts.
"""

import math
from collections.abc import Mapping, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from uvim.models import vit

# Per decoder block: `self_k`/`self_v` (B, H, L, D) filled as tokens are decoded, and
# `cross_k`/`cross_v` (B, H, image tokens, D) of the image; under `scan_layers` one such dict
# whose arrays have a leading layer axis. Heads come before positions, the layout the attention
# matmuls read, so that no decoding step transposes the cache.
Cache = list[dict[str, jnp.ndarray]] | dict[str, jnp.ndarray]


# Id 0 of the vocabulary: BOS for the causal decoder, the mask token for the masked one.
MASK = 0


def shift_right(tokens_BxL: jnp.ndarray) -> jnp.ndarray:
  """Prepends BOS (0) and drops the last token: the decoder's teacher-forced input."""
  return jnp.pad(tokens_BxL, ((0, 0), (1, 0)))[:, :-1]


def mask_ratio(r: jnp.ndarray) -> jnp.ndarray:
  """MaskGIT's cosine schedule: the fraction of a code still masked at progress r in [0, 1]."""
  return jnp.cos(jnp.pi / 2 * r)


def training_mask(rng: jax.Array, batch: int, seq_len: int, min_ratio: float) -> jnp.ndarray:
  """(B, L) True where a token is hidden from the masked decoder in training: per example a
  ratio mask_ratio(r), r ~ U(0, 1), at least `min_ratio`, of the positions (at least one), chosen
  uniformly at random."""
  ratio_rng, order_rng = jax.random.split(rng)
  ratio = jnp.maximum(mask_ratio(jax.random.uniform(ratio_rng, (batch, 1))), min_ratio)
  count = jnp.clip(jnp.ceil(ratio * seq_len), 1, seq_len)
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(order_rng, (batch, seq_len)), axis=1), axis=1)
  return rank < count


class Attention(nn.Module):
  """Multi-head dot-product attention without biases, with flax's parameter layout and
  arithmetic (`query`/`key`/`value` (E, H, D), `out` (H, D, E)), split into the key/value
  projection and the attention itself so that decoding can cache keys and values. The softmax is
  computed in float32 whatever `dtype` (under "einsum"; see `vit.ATTENTION`)."""
  width: int
  num_heads: int
  dropout_rate: float = 0.0
  dtype: str = "float32"
  attention: str = "einsum"

  def setup(self):
    heads = (self.num_heads, self.width // self.num_heads)
    dense = dict(use_bias=False, dtype=jnp.dtype(self.dtype))
    self.query = nn.DenseGeneral(heads, **dense)
    self.key = nn.DenseGeneral(heads, **dense)
    self.value = nn.DenseGeneral(heads, **dense)
    self.out = nn.DenseGeneral(self.width, axis=(-2, -1), **dense)

  def keys_values(self, x_BxSxE: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(keys, values) of the attended sequence, each (B, H, S, D)."""
    return (jnp.swapaxes(self.key(x_BxSxE), 1, 2), jnp.swapaxes(self.value(x_BxSxE), 1, 2))

  def attend(self, x_BxLxE: jnp.ndarray, k_BxHxSxD: jnp.ndarray, v_BxHxSxD: jnp.ndarray,
             mask: jnp.ndarray | None = None, deterministic: bool = True) -> jnp.ndarray:
    """Queries from `x` attend to the keys/values; `mask` broadcasts to (B, H, L, S)."""
    vit.check_attention(self.attention)
    if self.attention == "fused" and (deterministic or self.dropout_rate == 0):
      mask = None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
      k, v = jnp.swapaxes(k_BxHxSxD, 1, 2), jnp.swapaxes(v_BxHxSxD, 1, 2)
      return self.out(vit.fused_attention(self.query(x_BxLxE), k, v, mask))
    q = self.query(x_BxLxE)
    q = q / jnp.sqrt(k_BxHxSxD.shape[-1]).astype(q.dtype)
    logits = jnp.einsum("blhd,bhsd->bhls", q, k_BxHxSxD).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v_BxHxSxD.dtype)
    if not deterministic and self.dropout_rate > 0:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.dropout_rate, weights.shape)
      weights = jnp.where(keep, weights / (1 - self.dropout_rate), 0)
    return self.out(jnp.einsum("bhls,bhsd->blhd", weights, v_BxHxSxD))

  def __call__(self, x_BxLxE, context_BxSxE, mask=None, deterministic: bool = True):
    return self.attend(x_BxLxE, *self.keys_values(context_BxSxE), mask, deterministic)


class EncDecBlock(nn.Module):
  """Causal self-attention, cross-attention to the image, MLP; pre-LayerNorm, no biases in
  attention."""
  width: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  dtype: str = "float32"
  attention: str = "einsum"

  def setup(self):
    attention = dict(width=self.width, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                     dtype=self.dtype, attention=self.attention)
    self.LayerNorm1, self.LayerNorm2, self.LayerNorm3 = (
        nn.LayerNorm(dtype=jnp.dtype(self.dtype)) for _ in range(3))
    self.SelfAttn = Attention(**attention)
    self.CrossAttn = Attention(**attention)
    self.MLP = vit.MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout_rate, dtype=self.dtype)
    self.dropout = nn.Dropout(rate=self.dropout_rate)

  def __call__(self, y_BxLxE, encoded_BxPxE, mask, deterministic: bool = True):
    return self.over_code(y_BxLxE, *self.CrossAttn.keys_values(encoded_BxPxE), mask,
                          deterministic)

  def over_code(self, y_BxLxE, cross_k, cross_v, mask, deterministic: bool = True):
    """The block over the whole code, given the image's cross-attention keys/values."""
    x = self.LayerNorm1(y_BxLxE)
    x = y_BxLxE + self.dropout(self.SelfAttn(x, x, mask, deterministic), deterministic)
    return self._cross_and_mlp(x, cross_k, cross_v, deterministic)

  def _cross_and_mlp(self, x, cross_k, cross_v, deterministic: bool = True):
    z = self.CrossAttn.attend(self.LayerNorm2(x), cross_k, cross_v, None, deterministic)
    z = x + self.dropout(z, deterministic)
    return z + self.MLP(self.LayerNorm3(z), deterministic)

  def init_cache(self, encoded_BxPxE: jnp.ndarray, seq_len: int) -> dict[str, jnp.ndarray]:
    """Empty self-attention buffers and the image's cross-attention keys/values."""
    cross_k, cross_v = self.CrossAttn.keys_values(encoded_BxPxE)
    batch, heads, _, head_dim = cross_k.shape
    empty = jnp.zeros((batch, heads, seq_len, head_dim), cross_k.dtype)
    return {"self_k": empty, "self_v": empty, "cross_k": cross_k, "cross_v": cross_v}

  def step(self, y_Bx1xE: jnp.ndarray, cache: dict, t: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    """The block at position `t` for one new token, reading and extending the cache."""
    x = self.LayerNorm1(y_Bx1xE)
    k, v = self.SelfAttn.keys_values(x)
    cache = {**cache,
             "self_k": jax.lax.dynamic_update_slice_in_dim(cache["self_k"], k, t, axis=2),
             "self_v": jax.lax.dynamic_update_slice_in_dim(cache["self_v"], v, t, axis=2)}
    seen = jnp.arange(cache["self_k"].shape[2]) <= t
    x = y_Bx1xE + self.SelfAttn.attend(x, cache["self_k"], cache["self_v"], seen)
    return self._cross_and_mlp(x, cache["cross_k"], cache["cross_v"]), cache


class Decoder(nn.Module):
  """Code tokens (+ image tokens) -> next-token logits over the vocabulary (float32)."""
  emb_dim: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  vocab_size: int
  dropout_rate: float = 0.0
  dtype: str = "float32"
  remat: bool = False  # Rematerialises the blocks in `__call__`; `step` is left as it is.
  scan_layers: bool = False  # One scanned `EncDecBlock` (stacked parameters) for all layers.
  attention: str = "einsum"  # vit.ATTENTION
  # (tasks, rows, columns) of the code grid(s) when the bidirectional decoder adds to each
  # position its grid neighbours' tokens (`neighbour_tokens`); None: no such path.
  neighbour_grid: tuple[int, int, int] | None = None

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    if self.neighbour_grid:
      # Zero-initialised: the model starts as the plain decoder and learns what to take.
      self.NeighbourTokens = nn.Conv(self.emb_dim, (3, 3), padding="SAME", use_bias=False,
                                     kernel_init=nn.initializers.zeros, dtype=dtype)
    self.EmbedTargets = nn.Embed(self.vocab_size, self.emb_dim, dtype=dtype,
                                 embedding_init=nn.initializers.normal(stddev=1.0))
    # `deterministic` (argument 4, counting the module) is a Python bool: static under remat.
    # Inside a scan body, preventing CSE is unnecessary (see jax.checkpoint) and costs speed.
    block = (nn.remat(EncDecBlock, static_argnums=(4,), prevent_cse=not self.scan_layers)
             if self.remat else EncDecBlock)
    kw = dict(width=self.emb_dim, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
              dropout_rate=self.dropout_rate, dtype=self.dtype, attention=self.attention)
    if self.scan_layers:
      self.blocks = block(**kw, name="EncDecBlock")
    else:
      self.blocks = [block(**kw, name=f"EncDecBlock{i}") for i in range(self.num_layers)]
    self.dropout = nn.Dropout(rate=self.dropout_rate)
    self.LayerNorm = nn.LayerNorm(dtype=dtype)
    self.LogitsDense = nn.Dense(self.vocab_size, kernel_init=nn.initializers.zeros, dtype=dtype)

  def _over_layers(self, fn, carry, *xs, in_axes):
    """`fn(block, carry, *xs) -> (carry, ys)` applied to each layer of the scanned block in turn
    (its own parameters and dropout rng), with `ys` stacked on a leading layer axis."""
    return nn.scan(fn, variable_axes={"params": 0, "intermediates": 0},
                   split_rngs={"params": True, "dropout": True}, in_axes=in_axes,
                   length=self.num_layers)(self.blocks, carry, *xs)

  def _embed(self, tokens_BxL: jnp.ndarray, pos_emb_1xLxE: jnp.ndarray,
             neighbours: bool = False) -> jnp.ndarray:
    """Token plus position embeddings, in the computation dtype; with `neighbours` (the
    bidirectional decoder of a model with `neighbour_grid`) plus a 3x3 convolution of the token
    embeddings over each code's grid: every position sees the tokens around it directly, as
    the causal decoder's shifted input shows it the previous one."""
    tokens = self.EmbedTargets(tokens_BxL.astype(jnp.int32))
    y = tokens + pos_emb_1xLxE
    if neighbours and self.neighbour_grid:
      grid = tokens.reshape(-1, *self.neighbour_grid[1:], tokens.shape[-1])
      y = y + self.NeighbourTokens(grid.astype(self.dtype)).reshape(tokens.shape)
    return y.astype(self.dtype)

  def _logits(self, y_BxLxE: jnp.ndarray) -> jnp.ndarray:
    """Final LayerNorm and logits, returned in float32 for the loss and sampling."""
    return self.LogitsDense(self.LayerNorm(y_BxLxE)).astype(jnp.float32)

  def __call__(self, encoded_BxPxE, inputs_BxL, pos_emb_1xLxE, deterministic: bool = True,
               causal: bool = True):
    """`inputs_BxL` are the decoder inputs: shifted right (BOS first) when `causal`, else the
    code with MASK where a token is hidden (bidirectional attention)."""
    y = self._embed(inputs_BxL, pos_emb_1xLxE[:, :inputs_BxL.shape[1]], neighbours=not causal)
    y = self.dropout(y, deterministic)
    mask = nn.make_causal_mask(inputs_BxL) if causal else None
    if self.scan_layers:
      # `deterministic` is closed over: it stays a static Python bool.
      y, _ = self._over_layers(lambda block, y, enc, mask: (block(y, enc, mask, deterministic),
                                                            None),
                               y, encoded_BxPxE, mask, in_axes=(nn.broadcast, nn.broadcast))
    else:
      for block in self.blocks:
        y = block(y, encoded_BxPxE, mask, deterministic)
    return self._logits(y)

  def init_cache(self, encoded_BxPxE: jnp.ndarray, seq_len: int) -> Cache:
    if self.scan_layers:
      return self._over_layers(lambda block, c, enc: (c, block.init_cache(enc, seq_len)),
                               None, encoded_BxPxE, in_axes=(nn.broadcast,))[1]
    return [block.init_cache(encoded_BxPxE, seq_len) for block in self.blocks]

  def fill_in(self, cache: Cache, tokens_BxL: jnp.ndarray,
              pos_emb_1xLxE: jnp.ndarray) -> jnp.ndarray:
    """Logits (B, L, V) at every position of a partly masked code, bidirectionally, with the
    image's cross-attention keys/values from `cache`."""
    y = self._embed(tokens_BxL, pos_emb_1xLxE, neighbours=True)
    if self.scan_layers:
      y, _ = self._over_layers(
          lambda block, y, c: (block.over_code(y, c["cross_k"], c["cross_v"], None), None),
          y, cache, in_axes=(0,))
      return self._logits(y)
    for block, block_cache in zip(self.blocks, cache, strict=True):
      y = block.over_code(y, block_cache["cross_k"], block_cache["cross_v"], None)
    return self._logits(y)

  def step(self, cache: Cache, tokens_B: jnp.ndarray, t: jnp.ndarray,
           pos_emb_1xLxE: jnp.ndarray) -> tuple[jnp.ndarray, Cache]:
    """Logits (B, V) for position t + 1 given the token at position t."""
    y = self._embed(tokens_B[:, None], jax.lax.dynamic_slice_in_dim(pos_emb_1xLxE, t, 1, axis=1))
    if self.scan_layers:
      y, cache = self._over_layers(lambda block, y, c, t: block.step(y, c, t), y, cache, t,
                                   in_axes=(0, nn.broadcast))
      return self._logits(y)[:, 0], cache
    new_cache = []
    for block, block_cache in zip(self.blocks, cache, strict=True):
      y, block_cache = block.step(y, block_cache, t)
      new_cache.append(block_cache)
    return self._logits(y)[:, 0], new_cache


class Model(nn.Module):
  """The stage II model: `__call__(image, tokens)` gives the logits of the code (B, L, V)."""
  patches: Mapping[str, Sequence[int]]
  num_heads: int = 16
  num_layers: int = 24
  mlp_dim: int = 4096
  emb_dim: int = 1024
  vocab_size: int = 4097
  seq_len: int = 256
  input_size: Sequence[int] = (512, 512)
  posemb_type: str = "learn"  # or "sincos2d": fixed, image and code in one frame (no params)
  dropout_rate: float = 0.0
  # Fraction of training examples that see a learned "no image" input instead of the image,
  # for classifier-free guidance; above 0 the model has a `null_image` embedding.
  cond_dropout: float = 0.0
  # A bidirectional decoder trained to fill in masked tokens (MaskGIT / ROAR decoding), each
  # training example hiding a cosine-scheduled fraction of its code, at least `min_mask_ratio`.
  masked: bool = False
  min_mask_ratio: float = 0.1
  # Masked decoder only: each position also sees its 8 neighbours' tokens on the code's square
  # grid (a 3x3 convolution of their embeddings), the direct view of context that the causal
  # decoder has in its shifted input; without it the toy masked models learned to ignore the
  # decided tokens (docs/decoding.md).
  neighbour_tokens: bool = False
  # Several tasks' codes in one sequence (`stages.StageII` over several oracles): `seq_len` is
  # num_tasks codes of seq_len / num_tasks tokens, each with the same positions plus a learned
  # `task_embedding` of its task.
  num_tasks: int = 1
  dtype: str = "float32"  # Computation dtype; parameters and the returned logits are float32.
  remat: bool = False  # Rematerialise every transformer block when training.
  scan_layers: bool = False  # Scan the image encoder's and the decoder's blocks.
  attention: str = "einsum"  # The attention kernel, `vit.ATTENTION`.

  def setup(self):
    patch = tuple(self.patches["size"])
    grid = vit.patch_grid(self.input_size, patch)
    if self.seq_len % self.num_tasks:
      raise ValueError(f"seq_len {self.seq_len} is not num_tasks ({self.num_tasks}) codes")
    code_len = self.seq_len // self.num_tasks
    if self.posemb_type == "learn":
      self.pos_embedding_encoder = vit.learned_posemb(
          self, "pos_embedding_encoder", math.prod(grid), self.emb_dim)
      self.pos_embedding_decoder = vit.learned_posemb(
          self, "pos_embedding_decoder", code_len, self.emb_dim)
    elif self.posemb_type == "sincos2d":
      side = math.isqrt(code_len)
      if side * side != code_len:
        raise ValueError(f"posemb_type 'sincos2d' needs a square code, got {code_len} tokens")
      # Image and code in one frame: code token (i, j) sits at the centre of the image region
      # it covers, in patch units, so a code token and the patches under it have matching
      # embeddings and cross-attention finds them from the start of training.
      self.pos_embedding_encoder = vit.sincos2d_posemb(grid, self.emb_dim)
      self.pos_embedding_decoder = vit.sincos2d_posemb(
          (side, side), self.emb_dim, scale=(grid[0] / side, grid[1] / side))
    else:
      raise ValueError(f"posemb_type must be 'learn' or 'sincos2d', got {self.posemb_type!r}")
    self.code_positions = self.pos_embedding_decoder
    if self.num_tasks > 1:
      tasks = self.param("task_embedding", nn.initializers.normal(stddev=0.02),
                         (self.num_tasks, 1, self.emb_dim))
      self.code_positions = (self.pos_embedding_decoder + tasks).reshape(1, self.seq_len, -1)
    self.embed_patches = nn.Conv(self.emb_dim, patch, strides=patch, padding="VALID",
                                 dtype=jnp.dtype(self.dtype), name="EmbedPatches")
    self.encoder = vit.Encoder(depth=self.num_layers, mlp_dim=self.mlp_dim,
                               num_heads=self.num_heads, dropout=self.dropout_rate,
                               dtype=self.dtype, remat=self.remat,
                               scan_layers=self.scan_layers, attention=self.attention)
    if self.cond_dropout:
      self.null_image = self.param("null_image", nn.initializers.normal(stddev=0.02),
                                   (1, 1, self.emb_dim))
    neighbour_grid = None
    if self.neighbour_tokens:
      side = math.isqrt(code_len)
      if not self.masked or side * side != code_len:
        raise ValueError("neighbour_tokens needs a masked model and a square code, got "
                         f"masked={self.masked} and {code_len} tokens a code")
      neighbour_grid = (self.num_tasks, side, side)
    self.decoder = Decoder(emb_dim=self.emb_dim, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                           num_layers=self.num_layers, vocab_size=self.vocab_size,
                           dropout_rate=self.dropout_rate, dtype=self.dtype, remat=self.remat,
                           scan_layers=self.scan_layers, attention=self.attention,
                           neighbour_grid=neighbour_grid)

  def encode(self, image_BxHxWx3: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Image -> image tokens (B, patches, E)."""
    x = einops.rearrange(self.embed_patches(image_BxHxWx3), "b h w e -> b (h w) e")
    return self.encoder(x + self.pos_embedding_encoder, deterministic=not train)

  def decode(self, encoded_BxPxE: jnp.ndarray, tokens_BxL: jnp.ndarray,
             train: bool = False) -> jnp.ndarray:
    """Logits (B, L, V). Causal: teacher-forced, position t sees BOS and tokens[:t] of the
    targets. Masked: every position sees the whole code, MASK where a token is hidden."""
    if self.masked:
      return self.decoder(encoded_BxPxE, tokens_BxL, self.code_positions,
                          deterministic=not train, causal=False)
    return self.decoder(encoded_BxPxE, shift_right(tokens_BxL), self.code_positions,
                        deterministic=not train)

  def encode_unconditional(self, encoded_BxPxE: jnp.ndarray) -> jnp.ndarray:
    """The "no image" input in place of encoded images (guidance's unconditional pass)."""
    if not self.cond_dropout:
      raise ValueError("guidance needs a model trained with cond_dropout > 0 (it has no "
                       "null_image embedding)")
    return jnp.broadcast_to(self.null_image, encoded_BxPxE.shape).astype(encoded_BxPxE.dtype)

  def __call__(self, image: jnp.ndarray, tokens: jnp.ndarray, train: bool = False):
    """Logits (B, L, V) of the code `tokens` (see `decode`) given the image."""
    encoded = self.encode(image, train=train)
    if train and self.cond_dropout:
      dropped = jax.random.bernoulli(self.make_rng("dropout"), self.cond_dropout,
                                     (encoded.shape[0], 1, 1))
      encoded = jnp.where(dropped, self.encode_unconditional(encoded), encoded)
    return self.decode(encoded, tokens, train=train)

  def init_cache(self, encoded_BxPxE: jnp.ndarray) -> Cache:
    """The decoding cache of a batch of encoded images (cross-attention keys/values; the masked
    decoder recomputes self-attention over the whole code every step, so it has no buffers)."""
    return self.decoder.init_cache(encoded_BxPxE, 0 if self.masked else self.seq_len)

  def fill_in(self, cache: Cache, tokens_BxL: jnp.ndarray) -> jnp.ndarray:
    """Masked decoder: logits (B, L, V) of a code with MASK at its undecided positions."""
    return self.decoder.fill_in(cache, tokens_BxL, self.code_positions)

  def decode_step(self, cache: Cache, tokens_B: jnp.ndarray,
                  t: jnp.ndarray) -> tuple[jnp.ndarray, Cache]:
    """Feeds the token at position t (BOS at t = 0); returns the logits of the next token
    (B, vocab) and the extended cache."""
    return self.decoder.step(cache, tokens_B, t, self.code_positions)
