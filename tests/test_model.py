"""Transformer properties: causality, packed documents, jit, MTP, attention types, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import UNROLL_UP_TO
from model.transformer import forward, init_model, scans_layers
from tests.conftest import small_config

CONFIGS = {
    "mla_moe": small_config(),
    "mla_plain_query": small_config(q_lora_rank=None),
    "gqa": small_config(attention_type="gqa", num_kv_heads=1, head_dim=8),
    "dense_only": small_config(num_experts=0, mtp_depth=0),
}


def _tokens(b, t, seed=0, vocab=61):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab, dtype=jnp.int32)


def _embedded_forward(model):
  """Logits as a function of the input embeddings, so gradients w.r.t. inputs exist."""
  def fn(x_BTD):
    b, t, _ = x_BTD.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    h, _ = model.blocks(x_BTD, positions, jnp.ones((b, t), jnp.int32))
    return model.output_logits(model.final_norm(h))
  return fn


@pytest.mark.parametrize("name", ["mla_moe", "gqa"])
def test_no_gradient_from_future_tokens(name):
  model = init_model(CONFIGS[name], 0)
  x = model.embed(_tokens(1, 12))
  t = 5
  grad = jax.jit(jax.grad(lambda x: _embedded_forward(model)(x)[0, t].sum()))(x)
  norms = np.abs(np.asarray(grad[0])).sum(-1)
  assert np.all(norms[t + 1:] == 0), norms
  assert np.all(norms[: t + 1] > 0), norms


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_documents_are_isolated(name):
  cfg = CONFIGS[name].replace(capacity_factor=None)
  model = init_model(cfg, 1)
  lengths = [5, 7, 4]
  total = sum(lengths)
  docs = [_tokens(1, n, seed=i) for i, n in enumerate(lengths)]
  packed = jnp.concatenate(docs, axis=1)
  segments = jnp.concatenate([jnp.full((1, n), i + 1, jnp.int32) for i, n in enumerate(lengths)], 1)
  positions = jnp.concatenate([jnp.arange(n)[None] for n in lengths], 1)
  out = forward(model, packed, positions, segments)
  start = 0
  for doc, n in zip(docs, lengths):
    # Alone, padded at the end (one compiled shape); causality keeps padding out of the doc's logits.
    alone = forward(model, jnp.pad(doc, ((0, 0), (0, total - n))))
    np.testing.assert_allclose(out.logits[:, start:start + n], alone.logits[:, :n], atol=1e-5,
                               rtol=1e-5)
    start += n


def test_jit_equals_eager():
  model = init_model(CONFIGS["mla_moe"], 2)
  tokens = _tokens(2, 9)
  eager = model(tokens)  # Eager NNX call, no jit.
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  np.testing.assert_allclose(eager.logits, jitted.logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(eager.mtp_logits, jitted.mtp_logits, atol=1e-5, rtol=1e-5)


def test_outputs_and_router_stats():
  cfg = CONFIGS["mla_moe"]
  out = forward(init_model(cfg, 3), _tokens(2, 9))
  assert out.logits.shape == (2, 9, 61) and out.logits.dtype == jnp.float32
  assert out.mtp_logits.shape == (1, 2, 9, 61)
  layers = cfg.num_moe_layers + cfg.mtp_depth  # Main MoE layers, then the MTP block.
  assert out.router.tokens_per_expert.shape == (layers, 8)
  np.testing.assert_array_equal(out.router.tokens_per_expert.sum(-1), [2 * 9 * 2] * layers)
  assert out.router.balance_loss.shape == (layers,)
  assert np.all(np.asarray(out.router.balance_loss) > 0)
  assert np.all(np.asarray(out.router.dropped) == 0)


def test_mtp_sees_the_next_token():
  """MTP logits at t depend on token t+1 (the shifted embedding) but never on t+2."""
  model = init_model(CONFIGS["mla_moe"], 4)
  tokens = _tokens(1, 10)
  base = forward(model, tokens).mtp_logits[0, 0]
  t = 4
  changed_next = forward(model, tokens.at[0, t + 1].set((tokens[0, t + 1] + 1) % 61)).mtp_logits[0, 0]
  changed_after = forward(model, tokens.at[0, t + 2].set((tokens[0, t + 2] + 1) % 61)).mtp_logits[0, 0]
  assert not np.allclose(base[t], changed_next[t])
  np.testing.assert_allclose(base[t], changed_after[t], atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  cfg = CONFIGS["mla_moe"].replace(dtype="bfloat16")
  model = init_model(cfg, 5)
  out = forward(model, _tokens(2, 8))
  ref = forward(init_model(cfg.replace(dtype="float32"), 5), _tokens(2, 8))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert out.logits.dtype == jnp.float32 and np.all(np.isfinite(out.logits))
  np.testing.assert_allclose(out.logits, ref.logits, atol=0.1)


def test_v3_shapes_without_memory():
  from model.config import PRESETS
  from model.params import abstract_model
  model = abstract_model(PRESETS["deepseek_v3_671b"])
  assert model.moe_layers.ffn.w_gate.shape == (58, 256, 7168, 2048)
  assert model.dense_layers.attn.q_b.w.shape == (3, 1536, 128, 192)
  assert model.mtp[0].block.ffn.w_down.shape == (256, 2048, 7168)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_gives_the_same_gradients(policy):
  cfg = small_config(num_layers=2, mtp_depth=0)
  tokens = _tokens(2, 8)

  def grads(c):
    graphdef, params, rest = nnx.split(init_model(c, 0), nnx.Param, ...)
    loss = lambda p: nnx.merge(graphdef, p, rest)(tokens).logits.sum()
    return jax.jit(jax.grad(loss))(params)

  for a, b in zip(jax.tree.leaves(grads(cfg)), jax.tree.leaves(grads(cfg.replace(remat_policy=policy)))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_unrolled_layers_equal_scanned():
  """layer_loop "unroll" (what "auto" does on CPU for 1-layer stacks without remat) and "scan":
  the same logits, router stats and gradients."""
  cfg = small_config(num_layers=2, first_k_dense=1, mtp_depth=0)  # A dense and an MoE stack.
  tokens = _tokens(2, 8)

  def run(c):
    graphdef, params, rest = nnx.split(init_model(c, 0), nnx.Param, ...)
    def loss(p):
      out = nnx.merge(graphdef, p, rest)(tokens)
      return out.logits.sum(), out
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  assert not scans_layers(cfg, 1) and scans_layers(cfg, UNROLL_UP_TO + 1)  # "auto" on CPU.
  assert scans_layers(cfg.replace(remat_policy="full"), 1)
  (grads, out), (want_grads, want) = run(cfg), run(cfg.replace(layer_loop="scan"))
  np.testing.assert_allclose(out.logits, want.logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(out.router.experts, want.router.experts)
  np.testing.assert_array_equal(out.router.tokens_per_expert, want.router.tokens_per_expert)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
