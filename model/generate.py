"""Batched generation from an MLA model over its latent cache (the CLI is train/generate.py).

`generate` runs prefill and the whole decode loop (`jax.lax.while_loop`) in one jitted call: what RL
rollouts and evaluation use. `stream` yields one token at a time for the CLI.

Greedy decoding can speculate with the MTP module (`generate(..., speculative=True)`,
`speculative_greedy`), as DeepSeek-V3 reports (85-90% acceptance of the second token): each step
feeds the main model the last token and the MTP module's draft of the one after it. The main
model's own greedy choice at the first position is always kept (so the output is plain greedy
decoding's); when it equals the draft, its choice at the draft's position is kept as well, a
second token from the same step. Then the MTP module drafts again from the main model's hidden
state at the last kept position. Rejected drafts are overwritten in both caches at the next step.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.decode import (Cache, decode_hidden, decode_step, last_token_logits, mtp_decode,
                          mtp_prefill, prefill, prefill_hidden, unstacked_layers)
from model.sampling import SamplingConfig, sample_logits
from model.transformer import Transformer, inference_model


class Generation(NamedTuple):
  """Sampled continuations; positions past a row's length hold the pad token and log-prob 0."""

  tokens: jax.Array  # [B, max_new_tokens] int32.
  logprobs: jax.Array  # [B, max_new_tokens] float32: log p(token) at the sampling temperature.
  lengths: jax.Array  # [B] int32: tokens generated, a stop token included.
  # With record_experts: [moe layers, B, prompt + new, K] int32 experts each prompt and fed token
  # used (-1 for padding and the last sampled token, which was never fed); else None.
  experts: jax.Array | None = None


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token: int = 0, width: int | None = None):
  """Right-pads token lists into (tokens [B, T] int32, lengths [B] int32).

  T is the longest prompt, or `width` (fixed shapes: one compilation for every batch).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  t = max(len(p) for p in prompts)
  if width is not None:
    if width < t:
      raise ValueError(f"pad_prompts: a prompt has {t} tokens, more than width={width}")
    t = width
  tokens = np.full((len(prompts), t), pad_token, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def _check_length(model: Transformer, prompt_len: int, sampling: SamplingConfig) -> int:
  total = prompt_len + sampling.max_new_tokens
  if total > model.cfg.max_seq_len:
    raise ValueError(f"prompt length {prompt_len} + max_new_tokens {sampling.max_new_tokens} = "
                     f"{total} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
  return total


def _finish(tokens_B, logprobs_B, done_B, sampling: SamplingConfig):
  """Masks rows already stopped; returns (tokens, logprobs, still generating, now done)."""
  active_B = ~done_B
  tokens_B = jnp.where(active_B, tokens_B, sampling.pad_token)
  logprobs_B = jnp.where(active_B, logprobs_B, 0.0)
  stopped_B = jnp.isin(tokens_B, jnp.asarray(sampling.stop_tokens, jnp.int32)) & active_B
  return tokens_B, logprobs_B, active_B, done_B | stopped_B


@functools.partial(nnx.jit, static_argnames=("sampling",), donate_argnames=("cache",))
def decode_loop(model: Transformer, cache: Cache, logits_BY, key, sampling: SamplingConfig):
  """Samples max_new_tokens from the prefill logits onwards in a `jax.lax.while_loop`.

  Returns (Generation, the cache after the last decoded token); the cache is donated.
  """
  b, n = logits_BY.shape[0], sampling.max_new_tokens

  def sample_and_record(i, logits, tokens, logprobs, lengths, done):
    tok, lp = sample_logits(logits, jax.random.fold_in(key, i), sampling)
    tok, lp, active, done = _finish(tok, lp, done, sampling)
    return (tok, tokens.at[:, i].set(tok), logprobs.at[:, i].set(lp),
            lengths + active.astype(jnp.int32), done)

  zeros = jnp.zeros((b,), jnp.int32)
  tok, tokens, logprobs, lengths, done = sample_and_record(
      0, logits_BY, jnp.full((b, n), sampling.pad_token, jnp.int32), jnp.zeros((b, n)), zeros,
      jnp.zeros((b,), bool))

  def cond(carry):
    i, _, _, _, _, _, done = carry
    return (i < n) & ~jnp.all(done)

  layers = unstacked_layers(model)

  def body(carry):
    i, cache, tok, tokens, logprobs, lengths, done = carry
    logits, cache = decode_step(model, cache, tok[:, None], layers)
    tok, tokens, logprobs, lengths, done = sample_and_record(
        i, logits[:, 0], tokens, logprobs, lengths, done)
    return i + 1, cache, tok, tokens, logprobs, lengths, done

  carry = (jnp.ones((), jnp.int32), cache, tok, tokens, logprobs, lengths, done)
  _, cache, _, tokens, logprobs, lengths, _ = jax.lax.while_loop(cond, body, carry)
  return Generation(tokens, logprobs, lengths, cache.experts), cache


class Speculation(NamedTuple):
  """What a speculative decode did, per row."""

  steps: jax.Array  # [B] int32: verify steps the row was generating in.
  accepted: jax.Array  # [B] int32: drafts the main model confirmed (each a second token).


@functools.partial(nnx.jit, static_argnames=("sampling", "kind"))
def speculative_greedy(model: Transformer, tokens_BT, lengths_B, sampling: SamplingConfig,
                       kind: str = "latent") -> tuple[Generation, Speculation]:
  """Greedy continuations of right-padded prompts, drafting one token ahead with the first MTP
  module and verifying it in the same main-model step (module docstring). Same tokens and
  log-probabilities as `generate` at temperature 0; fewer main-model steps when drafts hit."""
  problems = [p for p, bad in (("temperature must be 0 (greedy)", sampling.temperature != 0),
                               ("the model has no MTP module", model.cfg.mtp_depth < 1)) if bad]
  if problems:
    raise ValueError(f"speculative decoding: {'; '.join(problems)}")
  greedy = lambda logits_BY: sample_logits(logits_BY, None, sampling)  # No key: argmax.
  b, t = tokens_BT.shape
  n = sampling.max_new_tokens
  rows_B = jnp.arange(b)
  stops = jnp.asarray(sampling.stop_tokens, jnp.int32)
  h_BTD, cache = prefill_hidden(model, tokens_BT, lengths_B, t + n, kind)
  tok, lp = greedy(last_token_logits(model, h_BTD, cache.lengths))
  tok, lp, _, done = _finish(tok, lp, jnp.zeros((b,), bool), sampling)
  out_tokens = jnp.full((b, n), sampling.pad_token, jnp.int32).at[:, 0].set(tok)
  out_logprobs = jnp.zeros((b, n)).at[:, 0].set(lp)
  produced = jnp.ones((b,), jnp.int32)
  done = done | (produced >= n)
  # The MTP module's input at prompt position j is the token at j + 1: the prompt's next token,
  # and at the last prompt position the token just chosen.
  next_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1))).at[rows_B, cache.lengths - 1].set(tok)
  mtp_logits_BTY, mtp_cache = mtp_prefill(model, h_BTD, next_BT, cache.lengths, t + n, kind)
  draft = jnp.argmax(mtp_logits_BTY[rows_B, cache.lengths - 1], axis=-1).astype(jnp.int32)
  zeros = jnp.zeros((b,), jnp.int32)
  layers = unstacked_layers(model)

  def body(carry):
    cache, mtp_cache, tok, draft, out_tokens, out_logprobs, produced, done, steps, accepted = carry
    start_B = cache.lengths  # Position of `tok`; the draft goes at start + 1.
    h_B2D, cache = decode_hidden(model, cache, jnp.stack([tok, draft], axis=1), layers)
    logits_B2Y = model.output_logits(model.final_norm(h_B2D))
    first, first_lp = greedy(logits_B2Y[:, 0])
    second, second_lp = greedy(logits_B2Y[:, 1])
    hit = first == draft
    active = ~done
    two = active & hit & ~jnp.isin(first, stops)  # The draft is kept and a second token follows.
    write = lambda out, at, keep, value: out.at[rows_B, jnp.where(keep, at, n)].set(
        value, mode="drop")  # Column n is out of bounds: not written.
    out_tokens = write(write(out_tokens, produced, active, first), produced + 1, two, second)
    out_logprobs = write(write(out_logprobs, produced, active, first_lp), produced + 1, two,
                         second_lp)
    done = done | (active & jnp.isin(first, stops)) | (two & jnp.isin(second, stops))
    produced = jnp.minimum(produced + active + two, n)
    done = done | (produced >= n)
    # The MTP module at the two positions: h there with the token after each (the second is only
    # kept on a hit; a miss leaves it past the cache length, to be overwritten).
    mtp_logits_B2Y, mtp_cache = mtp_decode(model, mtp_cache, start_B, h_B2D,
                                           jnp.stack([first, second], axis=1), kind)
    draft = jnp.argmax(jnp.where(hit[:, None], mtp_logits_B2Y[:, 1], mtp_logits_B2Y[:, 0]),
                       axis=-1).astype(jnp.int32)
    cache = cache.replace(lengths=jnp.where(active, start_B + 1 + hit, start_B))
    tok = jnp.where(hit, second, first)
    return (cache, mtp_cache, tok, draft, out_tokens, out_logprobs, produced, done,
            steps + active, accepted + (active & hit))

  carry = (cache, mtp_cache, tok, draft, out_tokens, out_logprobs, produced, done, zeros, zeros)
  carry = jax.lax.while_loop(lambda c: ~jnp.all(c[7]), body, carry)
  _, _, _, _, out_tokens, out_logprobs, produced, _, steps, accepted = carry
  return Generation(out_tokens, out_logprobs, produced), Speculation(steps, accepted)


jitted_prefill = nnx.jit(prefill, static_argnames=("max_len", "kind", "record_experts"))
jitted_decode_step = nnx.jit(decode_step, donate_argnames=("cache",))


def generate(model: Transformer, tokens_BT, lengths_B, key, sampling: SamplingConfig,
             cache_kind: str = "latent", record_experts: bool = False,
             speculative: bool = False) -> Generation:
  """Continuations of right-padded prompts (row b: `lengths[b]` tokens), all rows at once (MoE
  dropless, whatever the training capacity factor). `record_experts`: also return the experts
  every token was routed to (routing replay). `speculative`: greedy decoding drafted by the MTP
  module (`speculative_greedy`; the same tokens, in fewer main-model steps)."""
  model = inference_model(model)
  max_len = _check_length(model, tokens_BT.shape[1], sampling)
  if speculative:
    if record_experts:
      raise ValueError("generate(speculative=True): record_experts is not supported")
    return speculative_greedy(model, tokens_BT, lengths_B, sampling, cache_kind)[0]
  logits, cache = jitted_prefill(model, tokens_BT, lengths_B, max_len=max_len, kind=cache_kind,
                                 record_experts=record_experts)
  return decode_loop(model, cache, logits, key, sampling)[0]


def stream(model: Transformer, prompt: Sequence[int], key, sampling: SamplingConfig,
           cache_kind: str = "latent") -> Iterator[int]:
  """Yields the tokens of one prompt's continuation as each is decoded (stop token included)."""
  model = inference_model(model)
  tokens_BT, lengths_B = pad_prompts([prompt])
  max_len = _check_length(model, tokens_BT.shape[1], sampling)
  logits, cache = jitted_prefill(model, tokens_BT, lengths_B, max_len=max_len, kind=cache_kind)
  step = nnx.cached_partial(jitted_decode_step, model)  # Skips re-walking the module graph per call.
  for i in range(sampling.max_new_tokens):
    tok, _ = sample_logits(logits, jax.random.fold_in(key, i), sampling)
    token = int(tok[0])
    yield token
    if token in sampling.stop_tokens or i + 1 == sampling.max_new_tokens:
      return
    step_logits, cache = step(cache, tok[:, None])
    logits = step_logits[:, 0]
