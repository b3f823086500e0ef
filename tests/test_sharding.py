"""Sharding: the table, the mesh, and (in one 8-device subprocess) sharded steps against one device."""

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from model import sharding
from model.params import abstract_model
from tests.conftest import small_config
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def test_every_parameter_has_table_axes():
  for cfg in (small_config(), small_config(attention_type="gqa", num_kv_heads=1, head_dim=8),
              small_config(q_lora_rank=None, tie_embeddings=True)):
    for path, v in nnx.to_flat_state(nnx.state(abstract_model(cfg))):
      axes = sharding.param_axes([str(p) for p in path], len(v.shape))
      assert len(axes) == len(v.shape)


def test_logical_to_spec_drops_axes_that_do_not_fit():
  sizes = dict(data=2, fsdp=2, expert=2, tensor=2)
  assert sharding.logical_to_spec(("layers", "experts", "embed", "expert_mlp"), (3, 8, 32, 12),
                                  sizes) == P(None, "expert", "fsdp", "tensor")
  assert sharding.logical_to_spec(("vocab", "embed"), (61, 32), sizes) == P(None, ("fsdp", "expert"))
  assert sharding.logical_to_spec(("vocab", "embed"), (64, 34), sizes) == P("tensor", "fsdp")
  assert sharding.logical_to_spec(("batch", None), (8, 16), sizes) == P(("data", "fsdp", "expert"))
  assert sharding.logical_to_spec(("batch", None), (4, 16), sizes) == P(("data", "fsdp"))
  assert sharding.logical_to_spec(("batch",), (8,), dict(data=1, fsdp=1, expert=1, tensor=8)) == P()


def test_mesh_config_resolves_minus_one_and_says_what_is_wrong():
  assert sharding.MeshConfig(data=-1, expert=4).ici_shape(8) == (2, 1, 4, 1)
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.MeshConfig(data=-1, fsdp=-1).ici_shape(8)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.MeshConfig(data=-1, expert=3).ici_shape(8)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  assert dict(mesh.shape) == dict(data=jax.device_count(), fsdp=1, expert=1, tensor=1)


def test_constrain_is_a_no_op_without_a_mesh():
  x = jax.numpy.ones((4, 3))
  assert sharding.constrain(x, "batch", None) is x


@pytest.fixture(scope="module")
def multidevice(tmp_path_factory):
  """Runs tests/multidevice_checks.py once on 8 host CPU devices; its JSON results."""
  out = tmp_path_factory.mktemp("multidevice") / "results.json"
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "tests.multidevice_checks", str(out)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "data2_expert4", "fsdp2_expert2_tensor2"])
def test_sharded_train_step_matches_one_device(multidevice, mesh):
  r = multidevice["train_step"][mesh]
  assert r["init_diff"] == 0.0, r
  assert r["loss_diff"] < TOL and r["param_diff"] < TOL, r
  assert r["wrong_shardings"] == [], r
  if mesh != "data8":
    assert r["sharded_params"] > 0 and r["sharded_opt_leaves"] == 2 * r["sharded_params"], r
  assert r["dropped"] == r["ref_dropped"] == 0


@pytest.mark.parametrize("dispatch", ["all_to_all", "ragged"])
def test_expert_parallel_moe_matches_unsharded(multidevice, dispatch):
  moe = multidevice["moe"]
  for name in ("data2_expert4", "fsdp2_expert2_tensor2"):
    r = moe[f"{name}/{dispatch}/capacity=None"]
    assert r["y_diff"] < TOL and r["dropped"] == 0, (name, r)
  if dispatch == "ragged":
    assert moe["data2_expert4/ragged/capacity=None"]["grad_diff"] < TOL
  r = moe[f"data2_expert4/{dispatch}/capacity=0.5"]
  assert r["dropped"] > 0, r  # A capacity below what the routing needs drops and counts.


def test_modules_init_is_born_sharded(multidevice):
  r = multidevice["modules_init"]
  assert r["wrong_shardings"] == [], r
  assert 0.015 < r["min_std"] and r["max_std"] < 0.025, r  # normal(0, init_std=0.02) matrices.


def test_planner_matches_compiled_memory_analysis_per_device(multidevice):
  """Sharded state bytes exactly; temp bytes loosely (16 tokens per device: XLA's param-sized
  temporaries weigh as much as the activations)."""
  for mesh, r in multidevice["train_step"].items():
    m = r["memory"]
    counters = 152  # Step counters, Adam's count and the 32-entry spike window: not planned.
    assert abs(m["xla_arguments"] - m["plan_arguments"] - counters) <= 1e-3 * m["plan_arguments"], (
        mesh, m)
    assert 0.6 < m["xla_temp"] / m["plan_temp"] < 1.7, (mesh, m)


def test_pallas_kernels_run_per_device_under_a_mesh(multidevice):
  assert multidevice["pallas_attention"]["logits_diff"] < TOL, multidevice["pallas_attention"]


def test_gradient_accumulation_on_a_mesh_matches_one_device(multidevice):
  r = multidevice["microbatches"]
  assert r["loss_diff"] < TOL and r["param_diff"] < TOL, r


def test_generation_on_a_mesh_matches_one_device(multidevice):
  r = multidevice["generation"]
  assert r["tokens_equal"] and r["logprob_diff"] < TOL, r
  assert r["cache_spec"] == "P(None, ('data', 'expert'))", r  # Layers, then batch.
