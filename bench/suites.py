"""The benchmark suites: which figures `python -m bench --suite cpu|gpu|quick` measures.

A suite is a list of groups; a group measures related figures (one record each) and may use
the suite's measured matmul peak, taken once per run. `cpu` fits a 2-core machine in minutes;
`gpu` is the paper's full sizes in bf16 at the largest power-of-two batch that fits; `quick`
is every kind of figure at tiny sizes (for the tests).
"""

import dataclasses
from collections.abc import Callable

import jax

from bench import (
  common,
  decoding,
  input_pipeline,
  label_embedding,
  panoptic_quality,
  scaling,
  train_step,
)

Spec = common.ConfigSpec


class Context:
  """What the groups of one run share: the matmul peak (measured on first use)."""

  def __init__(self, peak_n: int, peak_dtype: str):
    self.peak_n, self.peak_dtype = peak_n, peak_dtype
    self._peak = None

  def peak(self) -> dict:
    if self._peak is None:
      self._peak = common.matmul_peak(self.peak_n, self.peak_dtype)
    return self._peak

  def peak_flops(self) -> float:
    return self.peak()["value"]


@dataclasses.dataclass(frozen=True)
class Group:
  """Figures measured together; `specs` are the training configs they use (for --dry_run)."""
  name: str
  run: Callable[[Context], list[dict]]
  specs: tuple[common.ConfigSpec, ...] = ()


# The CPU "bench" sizes: stage I at 128 px with the paper's panoptic heads, stage II at 256 px
# with a 256-token code (its oracle is the same stage I model at 256 px).
_STAGE_I_BENCH_MODEL = {"model.width": 256, "model.oracle_depth": 2, "model.base_model_depth": 4,
                        "model.num_heads": 4, "model.mlp_dim": 1024, "model.dict_size": 1024,
                        "model.codeword_dim": 256}
STAGE_I_BENCH = Spec("panoptic_stage1", "res=128").with_overrides(
    {**_STAGE_I_BENCH_MODEL, "model.code_len": 64, "batch_size": 8})
STAGE_II_BENCH = Spec("panoptic_stage2", "res=256").with_overrides(
    {**{f"oracle.{k}": v for k, v in _STAGE_I_BENCH_MODEL.items()}, "oracle.model.code_len": 256,
     "model.emb_dim": 256, "model.num_layers": 4, "model.num_heads": 4, "model.mlp_dim": 1024,
     "batch_size": 8})


def stage1_patch16(arg: str, batch_size: int) -> common.ConfigSpec:
  """Stage I `:smoke` model and toy heads with 16-px patches (for resolutions up to 512)."""
  heads = {"semantics": (9, 256), "instances": (50, 256)}  # location ids: an offset window of 3
  return Spec("panoptic_stage1", arg).with_overrides(
      {"model.patch_size": (16, 16), "model.inputs": heads, "model.outputs": heads,
       "batch_size": batch_size})


def stage2_code(arg: str, code_len: int, batch_size: int) -> common.ConfigSpec:
  return Spec("panoptic_stage2", arg).with_overrides(
      {"oracle.model.code_len": code_len, "batch_size": batch_size})


def _peak(ctx: Context) -> list[dict]:
  return [ctx.peak()]


def _train(specs: tuple[common.ConfigSpec, ...], steps: int) -> Group:
  return Group("train_step", lambda ctx: [
      train_step.measure(s.build(), steps=steps, peak_flops=ctx.peak_flops()) for s in specs],
               specs)


def _sweep(name: str, specs: tuple[common.ConfigSpec, ...], steps: int) -> Group:
  return Group(name, lambda ctx: scaling.sweep(name, list(specs), steps=steps,
                                              peak_flops=ctx.peak_flops()), specs)


def _decoding(size: str, batch_sizes: tuple[int, ...], code_len: int, compare_len: int,
              dtype: str = "float32") -> Group:
  """Cached decoding of the full code; cached vs uncached on a shorter one (recomputing the
  decoder costs ~code_len / 2 times more, minutes on a CPU at 256 tokens)."""

  def run(ctx: Context) -> list[dict]:
    del ctx
    full = decoding.measure(size, batch_sizes=batch_sizes, code_len=code_len, modes=("cached",),
                            repeats=1, dtype=dtype)
    note = f"uncached only at code {compare_len}: its cost grows as code_len^2"
    both = decoding.measure(size, batch_sizes=batch_sizes, code_len=compare_len, repeats=1,
                            dtype=dtype, notes=note)
    return full + both

  return Group("decoding", run)


def _parallel_decoding(size: str, batch_sizes: tuple[int, ...], dtype: str = "float32") -> Group:
  """MaskGIT and ROAR at 1-16 steps against the cached autoregressive decoder, 256 tokens."""
  return Group("parallel_decoding", lambda ctx: decoding.measure(
      size, batch_sizes=batch_sizes, code_len=256, modes=("cached", "maskgit", "roar"),
      steps=(1, 2, 4, 8, 16), repeats=2, dtype=dtype))


def _data(res: int, batches: int, dataset: str, pq_images: int) -> list[Group]:
  return [Group("input_pipeline", lambda ctx: input_pipeline.measure(
              res, batches=batches, dataset=dataset)),
          Group("panoptic_quality", lambda ctx: panoptic_quality.measure(pq_images, repeats=3))]


def cpu() -> list[Group]:
  """Every figure of issue 8 at CPU sizes (minutes on 2 cores)."""
  return [
      Group("peak", _peak),
      _train((Spec("panoptic_stage1", "smoke"), Spec("panoptic_stage2", "smoke"),
              STAGE_I_BENCH, STAGE_II_BENCH), steps=5),
      Group("label_embedding", lambda ctx: label_embedding.measure(STAGE_I_BENCH, steps=5),
            (STAGE_I_BENCH,)),
      _decoding("bench", (1, 8, 32), code_len=256, compare_len=64),
      _parallel_decoding("bench", (1, 8, 32)),
      *_data(512, batches=5, dataset="toy_scenes/small", pq_images=50),
      Group("device_scaling", lambda ctx: scaling.devices(STAGE_I_BENCH, (1, 2, 4, 8), steps=2),
            (STAGE_I_BENCH,)),
      _sweep("resolution_scaling", tuple(stage1_patch16(f"smoke,res={r}", 8)
                                         for r in (128, 256, 512)), steps=2),
      _sweep("code_length_scaling", tuple(stage2_code("smoke,res=128", n, 8)
                                          for n in (16, 64, 256)), steps=3),
  ]


def gpu() -> list[Group]:
  """The paper's full sizes in bf16 on an accelerator, with the einsum and the fused (cuDNN)
  attention; MFU against the datasheet peak."""
  bf16 = {"compute_dtype": "bfloat16"}
  full = tuple(Spec(name).with_overrides({**bf16, "attention": attention})
               for name in ("panoptic_stage1", "panoptic_stage2")
               for attention in ("einsum", "fused"))

  def train(ctx: Context) -> list[dict]:
    return [train_step.measure(s.with_overrides({"batch_size": fit_batch(s)}).build(), steps=10,
                               peak_flops=ctx.peak_flops(), notes="largest 2^k batch that fits")
            for s in full]

  return [
      Group("peak", _peak),
      Group("peak_float32", lambda ctx: [common.matmul_peak(8192, "float32")]),
      Group("train_step", train, full),
      _decoding("large", (1, 8, 32, 128), code_len=256, compare_len=64, dtype="bfloat16"),
      _parallel_decoding("large", (1, 8, 32, 128), dtype="bfloat16"),
      *_data(512, batches=20, dataset="toy_scenes/small", pq_images=50),
      _sweep("resolution_scaling", tuple(s.with_overrides({"batch_size": 8}) for s in (
          Spec("panoptic_stage1", f"res={r}").with_overrides(bf16) for r in (256, 512, 768))),
             steps=5),
      _sweep("code_length_scaling", tuple(
          stage2_code("", n, 16).with_overrides(bf16) for n in (64, 256, 1024)), steps=5),
  ]


def quick() -> list[Group]:
  """Every kind of figure at tiny sizes, in well under a minute (the tests run it)."""
  tiny = Spec("panoptic_stage1", "smoke,res=32").with_overrides({"batch_size": 4})
  # Enough classes to gather; 50 instance slots: location ids with an offset window of 3.
  heads = {"semantics": (40, 64), "instances": (50, 64)}
  many_classes = tiny.with_overrides({"model.inputs": heads, "model.outputs": heads})
  return [
      Group("peak", _peak),
      _train((tiny,), steps=2),
      Group("label_embedding", lambda ctx: label_embedding.measure(many_classes, steps=2),
            (many_classes,)),
      Group("decoding", lambda ctx: decoding.measure(
          "tiny", batch_sizes=(1, 4), code_len=16, modes=("cached", "uncached", "maskgit"),
          steps=(2,), repeats=1)),
      *_data(64, batches=2, dataset="toy_scenes/tiny", pq_images=4),
      Group("device_scaling", lambda ctx: scaling.devices(tiny, (2,), steps=1), (tiny,)),
      _sweep("resolution_scaling", (tiny, Spec("panoptic_stage1", "smoke,res=64").with_overrides(
          {"batch_size": 4})), steps=1),
  ]


SUITES = {"cpu": cpu, "gpu": gpu, "quick": quick}


def fit_batch(spec: common.ConfigSpec, probe: int = 8, largest: int = 1024,
              fill: float = 0.85) -> int:
  """The largest power-of-two global batch whose step should fit in `fill` of the device
  memory, from XLA's memory analysis at batch `probe` (temporaries grow ~linearly with the
  batch). Devices that report no memory limit get `probe`."""
  from uvim import sharding
  from uvim.tools import plan

  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return probe
  config = spec.with_overrides({"batch_size": probe}).build()
  figures = plan.plan(config, sharding.make_mesh(config.mesh))
  fixed = figures["peak_bytes_estimate"] - figures["temp_bytes"]
  per_example = figures["temp_bytes"] / probe
  fits = lambda b: fixed + b * per_example <= fill * stats["bytes_limit"]
  batch = probe
  while batch > 1 and not fits(batch):
    batch //= 2
  while 2 * batch <= largest and fits(2 * batch):
    batch *= 2
  return batch
