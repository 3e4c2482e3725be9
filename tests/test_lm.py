"""Stage II model: parity with big_vision's UViM LM (logits and greedy sequences)."""

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
