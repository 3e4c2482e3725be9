"""Stage II model: parity with big_vision's UViM LM (logits and greedy sequences)."""

import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvim import checkpoint
from uvim.models import lm

FIXTURE = Path(__file__).resolve().parent / "fixtures/bigvision_uvim_parity.npz"


@pytest.fixture(scope="module")
def parity():
  cfg = json.loads(str(np.load(FIXTURE)["config_json"]))["stage2"]
  model = lm.Model(patches={"size": (cfg["patch_size"],) * 2}, num_heads=cfg["num_heads"],
                   num_layers=cfg["num_layers"], mlp_dim=cfg["mlp_dim"], emb_dim=cfg["emb_dim"],
                   vocab_size=cfg["vocab_size"], seq_len=cfg["seq_len"],
                   input_size=(cfg["input_size"],) * 2)
  return model, checkpoint.load_npz(FIXTURE)["stage2"]


def greedy_reference(model, params, image, seq_len, forbid_bos):
  """Step-by-step argmax with full recomputation (no cache): the simplest correct decoder."""
  tokens = jnp.zeros((image.shape[0], seq_len), jnp.int32)
  for t in range(seq_len):
    logits = model.apply({"params": params}, image, tokens)[:, t]
    if forbid_bos:
      logits = logits.at[:, 0].set(-jnp.inf)
    tokens = tokens.at[:, t].set(jnp.argmax(logits, -1))
  return np.asarray(tokens)


def test_parameter_names_and_shapes_match_the_original(parity):
  model, s2 = parity
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), s2["in"]["image"],
                                             s2["in"]["targets"]))
  ours = {k: v.shape for k, v in checkpoint.flatten(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)).items()}
  theirs = {k: v.shape for k, v in checkpoint.flatten({"params": s2["params"]}).items()}
  assert ours == theirs


def test_logits_and_greedy_sequences_match_the_original(parity):
  model, s2 = parity
  logits = model.apply({"params": s2["params"]}, s2["in"]["image"], s2["in"]["targets"])
  np.testing.assert_allclose(logits, s2["out"]["logits"], rtol=1e-5, atol=1e-5)
  seq_len = s2["in"]["targets"].shape[1]
  np.testing.assert_array_equal(
      greedy_reference(model, s2["params"], s2["in"]["image"], seq_len, forbid_bos=False),
      s2["out"]["greedy_tokens"])
  np.testing.assert_array_equal(
      greedy_reference(model, s2["params"], s2["in"]["image"], seq_len, forbid_bos=True),
      s2["out"]["greedy_tokens_bos_masked"])


def test_decoder_is_causal():
  model = lm.Model(patches={"size": (8, 8)}, num_heads=2, num_layers=1, mlp_dim=16, emb_dim=8,
                   vocab_size=7, seq_len=5, input_size=(16, 16))
  image = jnp.ones((1, 16, 16, 3))
  targets = jnp.array([[1, 2, 3, 4, 5]])
  params = model.init(jax.random.key(0), image, targets)["params"]
  params["decoder"]["LogitsDense"]["kernel"] = jax.random.normal(jax.random.key(1), (8, 7))

  def logits_at(t, targets):
    return np.asarray(model.apply({"params": params}, image, targets)[0, t])

  for t in range(5):  # position t depends on targets[:t] only (inputs are shifted right)
    changed = targets.at[0, t:].set(6)
    np.testing.assert_allclose(logits_at(t, changed), logits_at(t, targets), rtol=1e-6)
    if t + 1 < 5:
      assert np.abs(logits_at(t + 1, changed) - logits_at(t + 1, targets)).max() > 1e-3


def sincos_at(y, x, width, temperature=10_000.0):
  """The 2D sine-cosine embedding of one (possibly fractional) position, channel by channel."""
  quarter = width // 4
  out = np.zeros(width)
  for k in range(quarter):
    omega = 1.0 / temperature ** (k / (quarter - 1))
    out[k], out[quarter + k] = np.sin(x * omega), np.cos(x * omega)
    out[2 * quarter + k], out[3 * quarter + k] = np.sin(y * omega), np.cos(y * omega)
  return out


def sincos_model(seq_len):
  model = lm.Model(patches={"size": (8, 8)}, num_heads=2, num_layers=1, mlp_dim=16, emb_dim=8,
                   vocab_size=7, seq_len=seq_len, input_size=(32, 32), posemb_type="sincos2d")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         jnp.zeros((1, seq_len), jnp.int32))
  return model, variables


def test_sincos2d_encoder_embeds_each_patch_at_its_grid_position():
  model, variables = sincos_model(seq_len=16)
  assert "pos_embedding_encoder" not in variables["params"]  # fixed, not learned
  encoder = model.bind(variables).pos_embedding_encoder
  for i, j in itertools.product(range(4), range(4)):
    np.testing.assert_allclose(encoder[0, 4 * i + j], sincos_at(i, j, 8), atol=1e-6)


@pytest.mark.parametrize("seq_len", [16, 4])
def test_sincos2d_code_token_sits_at_the_centre_of_its_image_region(seq_len):
  """A 4x4 code on a 4x4 patch grid matches patch for patch; a 2x2 code token covers 2x2
  patches and is embedded at their centre (patch coordinates 0.5 and 2.5)."""
  model, variables = sincos_model(seq_len)
  decoder = model.bind(variables).pos_embedding_decoder
  side = int(seq_len**0.5)
  cell = 4 / side
  for i, j in itertools.product(range(side), range(side)):
    centre = ((i + 0.5) * cell - 0.5, (j + 0.5) * cell - 0.5)
    np.testing.assert_allclose(decoder[0, side * i + j], sincos_at(*centre, 8), atol=1e-6)


def test_sincos2d_needs_a_square_code():
  with pytest.raises(ValueError, match="square code"):
    sincos_model(seq_len=6)
