"""Where each task's guiding code lies in stage II's sequence: its positions and its token ids.

The sequence holds every oracle's code in the order of their names; word w of task k is token
`first_id[k] + w` (id 0 is BOS / MASK), so the ids of the tasks never overlap and the model's
`seq_len` and `vocab_size` follow from the oracles.
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from uvim.models import lm


@dataclasses.dataclass(frozen=True)
class CodeLayout:
  names: tuple[str, ...]
  code_lens: tuple[int, ...]
  dict_sizes: tuple[int, ...]

  @classmethod
  def of(cls, code_lens: Mapping[str, int], dict_sizes: Mapping[str, int]) -> "CodeLayout":
    """The layout of tasks with these code lengths and dictionary sizes, in the given order."""
    names = tuple(code_lens)
    return cls(names, tuple(code_lens[n] for n in names), tuple(dict_sizes[n] for n in names))

  @property
  def seq_len(self) -> int:
    return sum(self.code_lens)

  @property
  def vocab_size(self) -> int:
    return 1 + sum(self.dict_sizes)

  @property
  def first_id(self) -> dict[str, int]:
    """The token id of word 0 of each task."""
    return dict(zip(self.names, (1 + np.cumsum([0, *self.dict_sizes[:-1]])).tolist(),
                    strict=True))

  def span(self, name: str) -> tuple[int, int]:
    """The positions [first, end) of task `name`'s code in the sequence."""
    i = self.names.index(name)
    first = sum(self.code_lens[:i])
    return first, first + self.code_lens[i]

  def vocab(self, name: str) -> tuple[int, int]:
    """The token ids [low, high) of task `name`'s words."""
    first = self.first_id[name]
    return first, first + self.dict_sizes[self.names.index(name)]

  def whole(self, name: str) -> bool:
    """Whether task `name`'s code is the whole sequence (a single-task model)."""
    return self.span(name) == (0, self.seq_len)

  def pack(self, codes: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    """Every task's word ids (..., code_len) as one sequence of tokens (..., seq_len)."""
    return jnp.concatenate([codes[n] + self.first_id[n] for n in self.names], axis=-1)

  def unpack(self, tokens: jnp.ndarray, name: str) -> jnp.ndarray:
    """Task `name`'s word ids (..., code_len) from a sequence of tokens (..., seq_len)."""
    return tokens[..., slice(*self.span(name))] - self.first_id[name]

  def per_task(self, values_BxL: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """`values` (B, seq_len) split into each task's positions (B, code_len)."""
    return {n: values_BxL[:, slice(*self.span(n))] for n in self.names}

  def roles_mask(self, rng: jax.Array, batch: int, condition_rate: float,
                 min_mask_ratio: float) -> jnp.ndarray:
    """(B, L) positions hidden in a multi-task training batch: per example each task is a
    condition (nothing hidden) with probability `condition_rate`, else a target hiding
    `lm.training_mask` of its code, and an example whose tasks all drew "condition" has one, at
    random, as a target. Every task's code has the same length."""
    role_rng, pick_rng, mask_rng = jax.random.split(rng, 3)
    num_tasks, code_len = len(self.names), self.code_lens[0]
    condition = jax.random.bernoulli(role_rng, condition_rate, (batch, num_tasks))
    pick = jax.random.randint(pick_rng, (batch, 1), 0, num_tasks) == jnp.arange(num_tasks)
    condition = condition & ~(jnp.all(condition, axis=1, keepdims=True) & pick)
    hidden = lm.training_mask(mask_rng, batch * num_tasks, code_len,
                              min_mask_ratio).reshape(batch, num_tasks, -1)
    return (hidden & ~condition[:, :, None]).reshape(batch, -1)

  def dropped_conditions(self, rng: jax.Array, hidden_BxL: jnp.ndarray,
                         rate: float) -> jnp.ndarray:
    """(B, L) positions of condition codes dropped (shown as MASK, no loss) for guidance: an
    example drops every condition task's code (one with no hidden position) with probability
    `rate` (the model's cond_dropout, as it drops its image), so that the model also learns
    p(target | neither image nor other codes), guidance's `everything` pass."""
    batch, num_tasks = len(hidden_BxL), len(self.names)
    condition = ~hidden_BxL.reshape(batch, num_tasks, -1).any(axis=2, keepdims=True)
    drop = jax.random.bernoulli(rng, rate, (batch, 1, 1))
    return jnp.broadcast_to(condition & drop,
                            (batch, num_tasks, self.code_lens[0])).reshape(batch, -1)
