"""Stage II encoder init from a big_vision ViT .npz: mapping, posemb resampling, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from uvim import checkpoint
from uvim.models import lm, vit, vit_init

WIDTH, PATCH = 32, 4


def make_vit(depth: int = 2, width: int = WIDTH, patch: int = PATCH, grid: int = 4,
             cls_in_posemb: bool = True, seed: int = 0) -> dict:
  """A random ViT in big_vision's layout (Transformer, embedding, pos_embedding, cls, head)."""
  rng = np.random.default_rng(seed)
  encoder = vit.Encoder(depth=depth, mlp_dim=2 * width, num_heads=4)
  transformer = encoder.init(jax.random.key(seed), jnp.zeros((1, grid * grid, width)))["params"]
  # Random LayerNorm scales/biases too, so a swapped or skipped array cannot go unnoticed.
  transformer = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), transformer)
  tokens = grid * grid + int(cls_in_posemb)
  return {
      "Transformer": transformer,
      "embedding": {"kernel": rng.normal(size=(patch, patch, 3, width)).astype(np.float32),
                    "bias": rng.normal(size=(width,)).astype(np.float32)},
      "pos_embedding": rng.normal(size=(1, tokens, width)).astype(np.float32),
      "cls": rng.normal(size=(1, 1, width)).astype(np.float32),
      "head": {"kernel": np.zeros((width, 10), np.float32), "bias": np.zeros(10, np.float32)},
  }


def save(tmp_path, tree, name="vit.npz") -> str:
  path = tmp_path / name
  checkpoint.save_npz(path, tree)
  return str(path)


@pytest.fixture(scope="module")
def stage2_params():
  model = lm.Model(patches={"size": (PATCH, PATCH)}, num_heads=4, num_layers=2, mlp_dim=64,
                   emb_dim=WIDTH, vocab_size=9, seq_len=4, input_size=(32, 32))
  return model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32))[
      "params"]


def test_load_encoder_maps_vit_into_stage2(tmp_path, stage2_params):
  tree = make_vit()
  new = vit_init.load_encoder(save(tmp_path, tree), stage2_params)

  want = checkpoint.flatten(tree["Transformer"])
  got = checkpoint.flatten(new["encoder"])
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  np.testing.assert_array_equal(new["EmbedPatches"]["kernel"], tree["embedding"]["kernel"])
  np.testing.assert_array_equal(new["EmbedPatches"]["bias"], tree["embedding"]["bias"])

  grid_4x4 = tree["pos_embedding"][0, 1:].reshape(4, 4, WIDTH)
  want_pe = scipy.ndimage.zoom(grid_4x4, (2, 2, 1), order=1).reshape(1, 64, WIDTH)
  assert new["pos_embedding_encoder"].shape == (1, 64, WIDTH)
  np.testing.assert_allclose(new["pos_embedding_encoder"], want_pe, atol=1e-6, rtol=0)

  before, after = checkpoint.flatten(stage2_params), checkpoint.flatten(new)
  assert after.keys() == before.keys()
  replaced = ("encoder/", "EmbedPatches/", "pos_embedding_encoder")
  untouched = [k for k in before if not k.startswith(replaced)]
  assert any(k.startswith("decoder/") for k in untouched)
  assert "pos_embedding_decoder" in untouched
  for k in untouched:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  for k in before:
    assert after[k].dtype == before[k].dtype, k
  # The input is not modified.
  assert not np.array_equal(checkpoint.flatten(stage2_params)["EmbedPatches/kernel"],
                            after["EmbedPatches/kernel"])


def test_load_encoder_same_grid_without_cls_copies_posemb(tmp_path):
  tree = make_vit(grid=8, cls_in_posemb=False)
  model = lm.Model(patches={"size": (PATCH, PATCH)}, num_heads=4, num_layers=2, mlp_dim=64,
                   emb_dim=WIDTH, vocab_size=9, seq_len=4, input_size=(32, 32))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             jnp.zeros((1, 4), jnp.int32)))["params"]
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
  new = vit_init.load_encoder(save(tmp_path, tree), params)
  np.testing.assert_array_equal(new["pos_embedding_encoder"], tree["pos_embedding"])


def test_load_encoder_reads_old_vit_jax_layout(tmp_path, stage2_params):
  """AugReg files: pre-linen numbering and posemb inside the Transformer."""
  tree = make_vit()
  old_names = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0":
               "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
               "MlpBlock_0": "MlpBlock_3"}
  old = {k: v for k, v in tree.items() if k != "pos_embedding"}
  old["Transformer"] = {
      block: ({old_names[m]: sub for m, sub in mods.items()} if block.startswith("encoderblock")
              else mods)
      for block, mods in tree["Transformer"].items()}
  old["Transformer"]["posembed_input"] = {"pos_embedding": tree["pos_embedding"]}
  got = vit_init.load_encoder(save(tmp_path, old, "old.npz"), stage2_params)
  want = vit_init.load_encoder(save(tmp_path, tree, "new.npz"), stage2_params)
  for k, v in checkpoint.flatten(want).items():
    np.testing.assert_array_equal(checkpoint.flatten(got)[k], v, err_msg=k)


@pytest.mark.parametrize("old_grid,new_grid", [((4, 4), (6, 6)), ((4, 4), (4, 4)),
                                               ((3, 5), (7, 4)), ((6, 6), (3, 3)),
                                               ((1, 4), (3, 2)), ((5, 5), (1, 1))])
def test_resample_posemb_matches_scipy_zoom(old_grid, new_grid):
  (h, w), (gh, gw) = old_grid, new_grid
  posemb = np.random.default_rng(0).normal(size=(1, h * w, 8)).astype(np.float32)
  want = scipy.ndimage.zoom(posemb.reshape(h, w, 8), (gh / h, gw / w, 1), order=1)
  assert want.shape == (gh, gw, 8)
  square = h == w
  got = vit_init.resample_posemb(posemb, new_grid, None if square else old_grid)
  assert got.shape == (1, gh * gw, 8) and got.dtype == posemb.dtype
  np.testing.assert_allclose(got, want.reshape(1, gh * gw, 8), atol=1e-6, rtol=0)
  if old_grid == new_grid:
    np.testing.assert_array_equal(got, posemb)


def test_resample_posemb_rejects_non_square_without_grid():
  with pytest.raises(ValueError, match="not a square grid"):
    vit_init.resample_posemb(np.zeros((1, 15, 8)), (4, 4))


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, stage2_params):
  tree = make_vit()
  dense = tree["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]
  dense["kernel"] = np.zeros((WIDTH, 65), np.float32)
  with pytest.raises(ValueError) as e:
    vit_init.load_encoder(save(tmp_path, tree), stage2_params)
  msg = str(e.value)
  assert "encoder/encoderblock_1/MlpBlock_0/Dense_0/kernel" in msg
  assert "(32, 65)" in msg and "(32, 64)" in msg


def test_wider_and_deeper_checkpoint_is_rejected(tmp_path, stage2_params):
  """A ViT-B into a ViT-L-sized model, in miniature: width and depth both differ."""
  with pytest.raises(ValueError) as e:
    vit_init.load_encoder(save(tmp_path, make_vit(depth=3, width=48)), stage2_params)
  msg = str(e.value)
  assert "width 48, depth 3" in msg and "width 32, depth 2" in msg
  assert "Transformer/encoderblock_2" in msg
  assert "encoder/encoderblock_0/LayerNorm_0/scale: checkpoint Transformer/encoderblock_0/" \
         "LayerNorm_0/scale has shape (48,), the model expects (32,)" in msg


def test_missing_encoder_blocks_are_rejected(tmp_path, stage2_params):
  tree = make_vit()
  del tree["Transformer"]["encoderblock_1"]
  with pytest.raises(ValueError, match=r"missing in the checkpoint .*encoder/encoderblock_1/"):
    vit_init.load_encoder(save(tmp_path, tree), stage2_params)


def test_patch_size_mismatch_is_rejected(tmp_path, stage2_params):
  with pytest.raises(ValueError) as e:
    vit_init.load_encoder(save(tmp_path, make_vit(patch=8)), stage2_params)
  msg = str(e.value)
  assert "patch 8x8" in msg and "patch 4x4" in msg
  assert "EmbedPatches/kernel: checkpoint embedding/kernel has shape (8, 8, 3, 32)" in msg


def test_missing_path_lists_vanity_names(tmp_path, stage2_params):
  with pytest.raises(FileNotFoundError) as e:
    vit_init.load_encoder(str(tmp_path / "nope.npz"), stage2_params)
  assert "nope.npz" in str(e.value)
  for name in vit_init.VANITY_NAMES:
    assert name in str(e.value)


def test_unknown_vanity_name_suggests_a_close_one(tmp_path):
  with pytest.raises(FileNotFoundError, match="Did you mean 'howto-i21k-L/16'"):
    vit_init.resolve("howto-i21k-L16", cache_dir=str(tmp_path))


def test_vanity_names_point_at_augreg_npz_files():
  assert {"howto-i21k-Ti/16", "howto-i21k-S/16", "howto-i21k-B/16", "howto-i21k-L/16",
          "howto-i21k-B/8"} <= vit_init.VANITY_NAMES.keys()
  for name, path in vit_init.VANITY_NAMES.items():
    variant = name.removeprefix("howto-i21k-").replace("/", "_")
    assert path.startswith(f"gs://vit_models/augreg/{variant}-i21k-300ep-"), name
    assert path.endswith(".npz"), name


def test_resolve_uses_the_cache_without_network(tmp_path, monkeypatch):
  monkeypatch.setattr(vit_init, "URL_PREFIX", "http://127.0.0.1:9/")
  basename = vit_init.VANITY_NAMES["howto-i21k-B/16"].rsplit("/", 1)[-1]
  (tmp_path / basename).write_bytes(b"cached")
  assert vit_init.resolve("howto-i21k-B/16", cache_dir=str(tmp_path)) == str(tmp_path / basename)
  monkeypatch.setenv(vit_init.CACHE_ENV, str(tmp_path))
  assert vit_init.resolve("howto-i21k-B/16") == str(tmp_path / basename)


def test_resolve_download_failure_says_where_to_put_the_file(tmp_path, monkeypatch):
  monkeypatch.setattr(vit_init, "URL_PREFIX", "http://127.0.0.1:9/")
  cache = tmp_path / "cache"
  with pytest.raises(FileNotFoundError) as e:
    vit_init.resolve("howto-i21k-Ti/16", cache_dir=str(cache))
  basename = vit_init.VANITY_NAMES["howto-i21k-Ti/16"].rsplit("/", 1)[-1]
  msg = str(e.value)
  assert str(cache / basename) in msg
  assert "howto-i21k-Ti/16" in msg and f"http://127.0.0.1:9/{basename}" in msg
  assert f"gsutil cp {vit_init.VANITY_NAMES['howto-i21k-Ti/16']}" in msg
  assert not any(cache.iterdir())  # No partial file left behind.
