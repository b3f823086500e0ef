"""The DPO family: every variant against a hand computation, soft labels, and an end-to-end run
whose first loss is ln 2 (policy = reference), with cached and online references agreeing."""

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.dpo import DpoConfig, dpo, preference_losses


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x))


PC, PR, RC, RR = [-3.0, -5.0], [-4.0, -4.5], [-3.5, -4.0], [-3.8, -5.0]
LEN_C, LEN_R = [2.0, 4.0], [5.0, 1.0]


def _losses(cfg, label=(1.0, 1.0)):
  arr = lambda x: jnp.asarray(x, jnp.float32)
  out = preference_losses(cfg, arr(PC), arr(PR), arr(RC), arr(RR), arr(label), arr(LEN_C),
                          arr(LEN_R))
  return [np.asarray(x) for x in out]


def test_dpo_variants_match_hand_computations():
  beta = 0.2
  for i in range(2):
    h = (PC[i] - RC[i]) - (PR[i] - RR[i])
    loss, r_c, r_r = _losses(DpoConfig(beta=beta))
    np.testing.assert_allclose(loss[i], -_log_sigmoid(beta * h), rtol=1e-5)
    np.testing.assert_allclose([r_c[i], r_r[i]], [beta * (PC[i] - RC[i]), beta * (PR[i] - RR[i])],
                               rtol=1e-5)
    eps = 0.1  # Conservative DPO.
    loss, _, _ = _losses(DpoConfig(beta=beta, label_smoothing=eps))
    np.testing.assert_allclose(
        loss[i], -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h), rtol=1e-5)
    loss, _, _ = _losses(DpoConfig(loss="ipo", beta=beta))
    np.testing.assert_allclose(loss[i], (h - 1 / (2 * beta)) ** 2, rtol=1e-5)
    gamma = 0.3
    loss, r_c, _ = _losses(DpoConfig(loss="simpo", beta=beta, simpo_gamma=gamma))
    z = beta * PC[i] / LEN_C[i] - beta * PR[i] / LEN_R[i] - gamma
    np.testing.assert_allclose(loss[i], -_log_sigmoid(z), rtol=1e-5)
    np.testing.assert_allclose(r_c[i], beta * PC[i] / LEN_C[i], rtol=1e-5)
    loss, _, _ = _losses(DpoConfig(beta=beta, nll_weight=0.5))  # RPO.
    np.testing.assert_allclose(loss[i], -_log_sigmoid(beta * h) - 0.5 * PC[i] / LEN_C[i],
                               rtol=1e-5)


def test_soft_labels():
  beta = 0.2
  hard = _losses(DpoConfig(beta=beta))[0]
  np.testing.assert_array_equal(_losses(DpoConfig(beta=beta), label=(1.0, 1.0))[0], hard)
  soft = _losses(DpoConfig(beta=beta), label=(0.7, 0.0))[0]
  for i, p in enumerate((0.7, 0.0)):
    x = beta * ((PC[i] - RC[i]) - (PR[i] - RR[i]))
    np.testing.assert_allclose(soft[i], -(p * _log_sigmoid(x) + (1 - p) * _log_sigmoid(-x)),
                               rtol=1e-5)
  # Label 0 is the swapped pair with label 1.
  swapped = preference_losses(DpoConfig(beta=beta), *[jnp.asarray(x) for x in (PR, PC, RR, RC)],
                              jnp.ones(2), jnp.asarray(LEN_R), jnp.asarray(LEN_C))[0]
  np.testing.assert_allclose(soft[1], np.asarray(swapped)[1], rtol=1e-5)
  # IPO's soft target (p - 1/2) / beta: no preference, no push.
  ipo = _losses(DpoConfig(loss="ipo", beta=beta), label=(0.5, 0.5))[0]
  h = np.array([(PC[i] - RC[i]) - (PR[i] - RR[i]) for i in range(2)])
  np.testing.assert_allclose(ipo, h ** 2, rtol=1e-5)
  with pytest.raises(ValueError, match="config.dpo.loss"):
    DpoConfig(loss="kto")


def _config(tiny_pretrain, reference, **dpo_fields):
  from configs.dpo import get_config
  c = get_config()
  c.init_from = tiny_pretrain
  c.data.update(builtin_pairs=16, eval_pairs=8, seq_len=96, batch_size=4)
  c.dpo.update(reference=reference, **dpo_fields)
  c.optimizer.update(peak_lr=1e-3, warmup_steps=0)
  c.total_steps, c.log_every, c.checkpoint_every, c.eval_every, c.eval_batches = 2, 1, 2, 2, 2
  c.peak_flops = 1e11
  return c


@pytest.mark.slow
def test_dpo_end_to_end_cached_and_online_references_agree(tmp_path, tiny_pretrain):
  cached = dpo(_config(tiny_pretrain, "cached"), str(tmp_path / "cached"))
  assert os.path.exists(tmp_path / "cached" / "reference_logprobs_train.npz")
  online = dpo(_config(tiny_pretrain, "online"), str(tmp_path / "online"))
  # Step 1: the policy is the reference, so every pair's loss is ln 2 and its margin 0.
  for rows in (cached, online):
    np.testing.assert_allclose(rows[0]["loss"], math.log(2), atol=1e-6)
    np.testing.assert_allclose(rows[0]["margin"], 0.0, atol=1e-6)
  for key in ("loss", "margin", "logp_chosen", "eval_loss", "eval_accuracy"):
    np.testing.assert_allclose(cached[-1][key], online[-1][key], rtol=1e-4, atol=1e-5)
  assert cached[-1]["loss"] != cached[0]["loss"]
