"""RoPE and YaRN against transformers' frequencies and a float64 complex-number rotation."""

import jax.numpy as jnp
import numpy as np
import pytest

from model import rope
from model.config import YarnConfig
from tests.conftest import small_config


@pytest.mark.parametrize("yarn", [
    None,
    YarnConfig(factor=40, original_max_len=4096, beta_fast=32, beta_slow=1, mscale=1, mscale_all_dim=1),
    YarnConfig(factor=8, original_max_len=64, beta_fast=16, beta_slow=2, mscale=0.707,
               mscale_all_dim=0.707),
    YarnConfig(factor=4, original_max_len=32, mscale=1.0, mscale_all_dim=0.0),
])
def test_frequencies_match_transformers(yarn):
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from model.hf import to_hf_config
  cfg = small_config(qk_rope_head_dim=64, yarn=yarn, max_seq_len=4096 * 40)
  hf_cfg = transformers.AutoConfig.for_model(**to_hf_config(cfg))
  kind = "default" if yarn is None else "yarn"
  if kind == "default":
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, 64, 2) / 64))
    factor = 1.0
  else:
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    inv_freq = inv_freq.numpy()
  np.testing.assert_allclose(rope.inverse_frequencies(cfg), inv_freq, rtol=1e-6)
  assert rope.attention_factor(cfg) == pytest.approx(factor)


def test_interleaved_rotation_equals_complex_multiplication():
  cfg = small_config(qk_rope_head_dim=8)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8))
  positions = rng.integers(0, 50, size=(2, 5))
  got = rope.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), cfg)
  inv_freq = rope.inverse_frequencies(cfg).astype(np.float64)
  pairs = x[..., 0::2] + 1j * x[..., 1::2]
  rotated = pairs * np.exp(1j * positions[:, :, None, None] * inv_freq)
  expected = np.stack([rotated.real, rotated.imag], -1).reshape(x.shape)
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_rotation_preserves_relative_position():
  cfg = small_config(qk_rope_head_dim=8)
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))
  dot = lambda pq, pk: float((rope.apply_rope(q, jnp.asarray([[pq]]), cfg)
                              * rope.apply_rope(k, jnp.asarray([[pk]]), cfg)).sum())
  assert dot(3, 1) == pytest.approx(dot(13, 11), rel=1e-4)
