"""Stage II (`proj.uvim.lm`): a ViT image encoder and a decoder that predicts the guiding code.

The decoder is a transformer over code tokens (vocabulary = dictionary size + 1: targets are
code + 1, and id 0 is BOS) with causal self-attention, cross-attention to the image tokens and an
MLP per block. Parameter names and computation follow big_vision's UViM (`vtt.py`), so released
`*_stageII_params.npz` files load.
"""

from collections.abc import Mapping, Sequence

import einops
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from uvim.models import vit


def shift_right(tokens_BxL: jnp.ndarray) -> jnp.ndarray:
  """Prepends BOS (0) and drops the last token: the decoder's teacher-forced input."""
  return jnp.pad(tokens_BxL, ((0, 0), (1, 0)))[:, :-1]


class EncDecBlock(nn.Module):
  """Causal self-attention, cross-attention to the image, MLP; pre-LayerNorm, no biases in
  attention."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, y_BxLxE, encoded_BxPxE, mask, deterministic: bool = True):
    attention = dict(num_heads=self.num_heads, use_bias=False, broadcast_dropout=False,
                     dropout_rate=self.dropout_rate, deterministic=deterministic)
    x = nn.LayerNorm(name="LayerNorm1")(y_BxLxE)
    x = nn.MultiHeadDotProductAttention(**attention, name="SelfAttn")(x, x, mask=mask)
    x = y_BxLxE + nn.Dropout(rate=self.dropout_rate)(x, deterministic)
    z = nn.LayerNorm(name="LayerNorm2")(x)
    z = nn.MultiHeadDotProductAttention(**attention, name="CrossAttn")(z, encoded_BxPxE)
    z = x + nn.Dropout(rate=self.dropout_rate)(z, deterministic)
    mlp = vit.MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout_rate, name="MLP")
    return z + mlp(nn.LayerNorm(name="LayerNorm3")(z), deterministic)


class Decoder(nn.Module):
  """Code tokens (+ image tokens) -> next-token logits over the vocabulary."""
  emb_dim: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  vocab_size: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, encoded_BxPxE, inputs_BxL, pos_emb_1xLxE, deterministic: bool = True):
    """`inputs_BxL` are the decoder inputs, already shifted right (BOS first)."""
    y = nn.Embed(self.vocab_size, self.emb_dim, name="EmbedTargets",
                 embedding_init=nn.initializers.normal(stddev=1.0))(inputs_BxL.astype(jnp.int32))
    y = y + pos_emb_1xLxE[:, :inputs_BxL.shape[1]]
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic)
    mask = nn.make_causal_mask(inputs_BxL)
    for i in range(self.num_layers):
      y = EncDecBlock(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                      dropout_rate=self.dropout_rate, name=f"EncDecBlock{i}")(
                          y, encoded_BxPxE, mask, deterministic)
    y = nn.LayerNorm(name="LayerNorm")(y)
    return nn.Dense(self.vocab_size, kernel_init=nn.initializers.zeros, name="LogitsDense")(y)


class Model(nn.Module):
  """The stage II model: `__call__(image, targets)` gives teacher-forced logits (B, L, V)."""
  patches: Mapping[str, Sequence[int]]
  num_heads: int = 16
  num_layers: int = 24
  mlp_dim: int = 4096
  emb_dim: int = 1024
  vocab_size: int = 4097
  seq_len: int = 256
  input_size: Sequence[int] = (512, 512)
  posemb_type: str = "learn"
  dropout_rate: float = 0.0

  def setup(self):
    if self.posemb_type != "learn":
      raise ValueError(f"posemb_type must be 'learn', got {self.posemb_type!r}")
    patch = tuple(self.patches["size"])
    grid = np.array(self.input_size) // np.array(patch)
    self.pos_embedding_encoder = vit.learned_posemb(
        self, "pos_embedding_encoder", int(np.prod(grid)), self.emb_dim)
    self.pos_embedding_decoder = vit.learned_posemb(
        self, "pos_embedding_decoder", self.seq_len, self.emb_dim)
    self.embed_patches = nn.Conv(self.emb_dim, patch, strides=patch, padding="VALID",
                                 name="EmbedPatches")
    self.encoder = vit.Encoder(depth=self.num_layers, mlp_dim=self.mlp_dim,
                               num_heads=self.num_heads, dropout=self.dropout_rate)
    self.decoder = Decoder(emb_dim=self.emb_dim, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                           num_layers=self.num_layers, vocab_size=self.vocab_size,
                           dropout_rate=self.dropout_rate)

  def encode(self, image_BxHxWx3: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Image -> image tokens (B, patches, E)."""
    x = einops.rearrange(self.embed_patches(image_BxHxWx3), "b h w e -> b (h w) e")
    return self.encoder(x + self.pos_embedding_encoder, deterministic=not train)

  def decode(self, encoded_BxPxE: jnp.ndarray, targets_BxL: jnp.ndarray,
             train: bool = False) -> jnp.ndarray:
    """Teacher-forced logits: position t sees BOS and targets[:t]."""
    return self.decoder(encoded_BxPxE, shift_right(targets_BxL), self.pos_embedding_decoder,
                        deterministic=not train)

  def __call__(self, image: jnp.ndarray, targets: jnp.ndarray, train: bool = False):
    return self.decode(self.encode(image, train=train), targets, train=train)
