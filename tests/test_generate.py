"""Cached decoding and sampling: absorbed == expanded attention, greedy == argmax of the full
forward pass, batches of ragged prompts == each prompt alone, cache sizes, sampling rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.attention import attention_mask
from model.decode import absorbed_attention, cache_bytes_per_token, prefill
from model.generate import generate, pad_prompts, stream
from model.config import YarnConfig, get_preset
from model.sampling import SamplingConfig, sample_logits, truncate_logits
from model.transformer import forward, init_model
from tests.conftest import small_config

PROMPTS = [[5, 9, 13, 2, 40, 7], [11, 3], [60, 1, 22, 8]]
N = 6  # New tokens: one shared SamplingConfig, so the tests share compiled loops.
GREEDY = SamplingConfig(max_new_tokens=N)


@pytest.fixture(scope="module")
def model():
  return init_model(small_config(), 3)


def _first_layer(stack):
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x[0], state))


@pytest.mark.parametrize("changes", [{}, dict(q_lora_rank=None, yarn=YarnConfig(
    factor=4.0, original_max_len=16, mscale=0.8, mscale_all_dim=0.8))])
def test_absorbed_attention_equals_expanded(changes):
  cfg = small_config(**changes)
  attn = _first_layer(init_model(cfg, 1).dense_layers).attn
  b, t = 2, 9
  x = jax.random.normal(jax.random.key(0), (b, t, cfg.d_model))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  segments = jnp.asarray([[1] * 4 + [2] * 5, [1] * 9])
  mask = attention_mask(segments)

  @nnx.jit
  def both(attn, x):
    latent, k_rope = attn.latent(x, positions)
    return attn(x, positions, segments), absorbed_attention(attn, x, positions, latent, k_rope, mask)

  expanded, absorbed = both(attn, x)
  np.testing.assert_allclose(absorbed, expanded, atol=1e-5, rtol=1e-5)


def test_greedy_equals_argmax_of_full_forward(model):
  tokens, lengths = pad_prompts(PROMPTS)
  n = N
  out = generate(model, tokens, lengths, jax.random.key(0), GREEDY)
  assert out.lengths.tolist() == [n] * len(PROMPTS)
  full, _ = pad_prompts([p + out.tokens[i].tolist() for i, p in enumerate(PROMPTS)])
  all_logits = forward(model, full).logits  # Right padding: causality keeps it out of the logits.
  for i, p in enumerate(PROMPTS):
    logits = all_logits[i, len(p) - 1:len(p) - 1 + n]
    np.testing.assert_array_equal(out.tokens[i], jnp.argmax(logits, -1))
    logprobs = jax.nn.log_softmax(logits, -1)[jnp.arange(n), out.tokens[i]]
    np.testing.assert_allclose(out.logprobs[i], logprobs, atol=1e-5)


def test_ragged_batch_equals_each_prompt_alone(model):
  sampling = GREEDY
  tokens, lengths = pad_prompts(PROMPTS)
  batch = generate(model, tokens, lengths, jax.random.key(0), sampling)
  for i, p in enumerate(PROMPTS):
    alone_tokens, alone_lengths = pad_prompts([p], width=tokens.shape[1])  # One compilation.
    alone = generate(model, alone_tokens, alone_lengths, jax.random.key(0), sampling)
    np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
    np.testing.assert_allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)


def test_layers_sliced_once_decode_as_the_scan_does(model):
  """On CPU the decode loop slices each layer's weights once, outside its token loop
  (`unstacked_layers`); with layer_loop="scan" every step scans the stacks. Same tokens, same
  log-probs; the recorded experts too."""
  assert model.cfg.layer_loop == "auto"  # Unrolled on CPU: the sliced-once path.
  scanned = init_model(small_config(layer_loop="scan"), 3)
  tokens, lengths = pad_prompts(PROMPTS)
  a, b = (generate(m, tokens, lengths, jax.random.key(0), GREEDY, record_experts=True)
          for m in (model, scanned))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  np.testing.assert_array_equal(a.experts, b.experts)


def test_expanded_cache_decodes_the_same(model):
  tokens, lengths = pad_prompts(PROMPTS)
  sampling = GREEDY
  latent = generate(model, tokens, lengths, jax.random.key(0), sampling)
  expanded = generate(model, tokens, lengths, jax.random.key(0), sampling, cache_kind="expanded")
  np.testing.assert_array_equal(latent.tokens, expanded.tokens)
  np.testing.assert_allclose(latent.logprobs, expanded.logprobs, atol=1e-5)


def test_stop_tokens_end_rows_and_pad(model):
  tokens, lengths = pad_prompts(PROMPTS)
  free = generate(model, tokens, lengths, jax.random.key(0), GREEDY)
  stop = int(free.tokens[0, 2])  # Row 0 emits it at step 2 (or earlier).
  first_stop = [int(np.argmax(np.asarray(r) == stop)) if stop in r.tolist() else None
                for r in free.tokens]
  out = generate(model, tokens, lengths, jax.random.key(0),
                 SamplingConfig(max_new_tokens=6, stop_tokens=(stop,), pad_token=-1))
  for i, s in enumerate(first_stop):
    n = 6 if s is None else s + 1
    assert int(out.lengths[i]) == n
    np.testing.assert_array_equal(out.tokens[i, :n], free.tokens[i, :n])
    assert np.all(np.asarray(out.tokens[i, n:]) == -1)
    assert np.all(np.asarray(out.logprobs[i, n:]) == 0)


def test_stream_yields_what_generate_returns(model):
  sampling = SamplingConfig(max_new_tokens=4, temperature=1.0)
  tokens, lengths = pad_prompts(PROMPTS[:1])
  batch = generate(model, tokens, lengths, jax.random.key(5), sampling)
  assert list(stream(model, PROMPTS[0], jax.random.key(5), sampling)) == batch.tokens[0].tolist()


def test_cache_bytes_match_formula(model):
  cfg = model.cfg
  tokens, lengths = pad_prompts(PROMPTS)
  _, cache = prefill(model, tokens, lengths, max_len=20)
  b = len(PROMPTS)
  expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_layers * b * 20 * 4
  assert cache.nbytes == expected == cache_bytes_per_token(cfg) * b * 20
  v3 = get_preset("deepseek_v3_671b").replace(dtype="bfloat16")
  latent, mha = cache_bytes_per_token(v3, "latent"), cache_bytes_per_token(v3, "expanded")
  assert latent // v3.num_layers // 2 == 576  # bfloat16: 2 bytes per element.
  assert 1 - latent / (61 * 2 * 128 * 128 * 2) == pytest.approx(0.9824, abs=1e-4)
  assert mha > latent


def test_sampling_rules():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
  kept = truncate_logits(logits, top_k=2, top_p=1.0)
  assert (kept > -1e30).sum(-1).tolist() == [2, 2]
  assert (truncate_logits(logits, 0, 0.75) > -1e30).sum(-1).tolist() == [2, 3]  # .5+.3; .4+.3+.2
  assert (truncate_logits(logits, 0, 0.01) > -1e30).sum(-1).tolist() == [1, 1]
  hot = SamplingConfig(temperature=1.0, top_k=2)
  draws = jnp.stack([sample_logits(logits, jax.random.key(i), hot)[0] for i in range(64)])
  assert set(np.unique(draws[:, 0])) <= {0, 1} and set(np.unique(draws[:, 1])) <= {2, 3}
  assert len(np.unique(draws[:, 0])) == 2  # Both survivors get drawn.
  again = jnp.stack([sample_logits(logits, jax.random.key(i), hot)[0] for i in range(64)])
  np.testing.assert_array_equal(draws, again)  # Seeded.
  greedy = sample_logits(logits, jax.random.key(0), SamplingConfig())
  np.testing.assert_array_equal(greedy[0], [0, 3])
  np.testing.assert_allclose(greedy[1], np.log([0.5, 0.4]), rtol=1e-6)
  warm = sample_logits(logits, jax.random.key(0), SamplingConfig(temperature=2.0, top_k=1))
  np.testing.assert_array_equal(warm[0], [0, 3])
  np.testing.assert_allclose(warm[1], jax.nn.log_softmax(logits / 2.0)[jnp.arange(2), [0, 3]],
                             rtol=1e-6)


def test_bad_requests_are_refused(model):
  tokens, lengths = pad_prompts(PROMPTS)
  with pytest.raises(ValueError, match="max_seq_len 64"):
    generate(model, tokens, lengths, jax.random.key(0), SamplingConfig(max_new_tokens=60))
  with pytest.raises(ValueError, match="at least one token"):
    pad_prompts([[1], []])
  with pytest.raises(ValueError, match="more than width=2"):
    pad_prompts([[1, 2, 3]], width=2)
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)
  gqa = init_model(small_config(attention_type="gqa", num_kv_heads=1, head_dim=8, num_layers=2), 0)
  with pytest.raises(ValueError, match="attention_type='mla'"):
    prefill(gqa, tokens, lengths, max_len=16)
