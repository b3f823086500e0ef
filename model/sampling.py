"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are drawn and when a row stops."""

  temperature: float = 0.0  # 0: greedy (argmax).
  top_k: int = 0  # Keep the k most likely tokens; 0: all.
  top_p: float = 1.0  # Keep the smallest set whose probability reaches p; 1: all.
  max_new_tokens: int = 64
  stop_tokens: tuple[int, ...] = ()  # A row stops after emitting one of these (it is kept).
  pad_token: int = 0  # Written after a row has stopped.

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")


def truncate_logits(logits_BY: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Logits with every token outside the top-k and the top-p nucleus set to -inf."""
  neg = jnp.finfo(logits_BY.dtype).min
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BY, min(top_k, logits_BY.shape[-1]))[0][:, -1:]
    logits_BY = jnp.where(logits_BY < kth_B1, neg, logits_BY)
  if top_p < 1:
    sorted_BY = jnp.sort(logits_BY, axis=-1)[:, ::-1]
    probs_BY = jax.nn.softmax(sorted_BY, axis=-1)
    before_BY = jnp.cumsum(probs_BY, axis=-1) - probs_BY  # Mass of strictly likelier tokens.
    kept = jnp.sum(before_BY < top_p, axis=-1, keepdims=True)  # At least the likeliest token.
    threshold_B1 = jnp.take_along_axis(sorted_BY, kept - 1, axis=-1)
    logits_BY = jnp.where(logits_BY < threshold_B1, neg, logits_BY)
  return logits_BY


def sample_logits(logits_BY: jax.Array, key: jax.Array, cfg: SamplingConfig):
  """(tokens [B], log-probabilities [B]) for float32 logits [B, Y].

  The log-probability is the model's, at the sampling temperature and before top-k/top-p
  truncation: the quantity policy-gradient losses recompute (temperature 1 when greedy).
  """
  logits_BY = logits_BY.astype(jnp.float32)
  scaled_BY = logits_BY / cfg.temperature if cfg.temperature > 0 else logits_BY
  if cfg.temperature == 0:
    tokens_B = jnp.argmax(logits_BY, axis=-1).astype(jnp.int32)
  else:
    kept_BY = truncate_logits(scaled_BY, cfg.top_k, cfg.top_p)
    tokens_B = jax.random.categorical(key, kept_BY, axis=-1).astype(jnp.int32)
  logprobs_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BY, axis=-1), tokens_B[:, None],
                                   axis=-1)[:, 0]
  return tokens_B, logprobs_B
