"""The train state and the pure train step shared by every training stage.

`train_step(state, batch, frozen) -> (state, metrics)`: gradient accumulation over micro-batches of
a stage's loss, a skip for non-finite updates and loss spikes, and DeepSeek-V3's auxiliary-loss-free
router-bias update outside the gradient (for every stage whose model routes).

One loss convention for every stage: `loss_fn(model, batch, frozen, step)` returns
`(loss_sum, weight, aux)`, a sum and the weight it is a sum over (tokens, sequences or pairs).
`aux["sums"]` are metric sums over the same weight (reported divided by it); `aux["totals"]` are
counts reported as they are (`load` [L, E] feeds the router-bias update); the optional
`aux["maxima"]` (float scalars) are reported as their maximum over micro-batches. Accumulation
adds sums and weights over micro-batches and divides once, so a masked batch split into
micro-batches gives the gradient of the whole batch. `frozen` holds parameter trees that are not
trained (a reference policy, a reward model, LoRA's base weights): step arguments with their own
shardings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model.sharding import constrain
from model.transformer import Transformer
from train.loss import mean_or_zero, mtp_targets, token_cross_entropy



@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; plain nested dicts so checkpoints stay readable."""

  step: jax.Array
  params: Any  # Pure dict of the model's nnx.Param values.
  extra: Any  # Pure dict of the other variables (router load-balancing biases).
  opt_state: Any
  skipped: jax.Array  # Updates skipped: non-finite loss or gradients, or a loss spike.
  bad_streak: jax.Array  # Consecutive skipped updates up to now.
  loss_window: jax.Array  # [W] recent accepted losses, for the spike z-score.
  window_count: jax.Array  # How many accepted losses the window has seen.


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Loss weights and the bias-update speed, with DeepSeek-V3's step-function schedules."""

  mtp_weight: float = 0.3  # DeepSeek-V3: 0.3 for the first 10T tokens, then 0.1.
  mtp_weight_final: float = 0.1  # The MTP weight from `mtp_switch_step` on.
  mtp_switch_step: int = 0  # 0: never switch.
  balance_weight: float = 1e-4  # Sequence-wise balance loss alpha.
  bias_gamma: float = 1e-3  # Bias update speed; 0 turns the update off.
  bias_gamma_stop_step: int = 0  # From this step on gamma is 0 (V3: the last 500B tokens); 0: never.
  microbatches: int = 1  # Gradient accumulation: the batch is split along its first axis.
  spike_zscore: float = 0.0  # Skip a step whose loss is this many stds above the window; 0: off.
  spike_window: int = 32  # Accepted losses the spike statistics are taken over.


def mtp_weight_at(cfg: StepConfig, step):
  """The MTP loss weight at `step`: mtp_weight, then mtp_weight_final from mtp_switch_step."""
  late = (cfg.mtp_switch_step > 0) & (step >= cfg.mtp_switch_step)
  return jnp.where(late, cfg.mtp_weight_final, cfg.mtp_weight).astype(jnp.float32)


def bias_gamma_at(cfg: StepConfig, step):
  """The bias-update speed at `step`: bias_gamma, then 0 from bias_gamma_stop_step."""
  stopped = (cfg.bias_gamma_stop_step > 0) & (step >= cfg.bias_gamma_stop_step)
  return jnp.where(stopped, 0.0, cfg.bias_gamma).astype(jnp.float32)


class ModelTemplate:
  """Turns TrainState dicts back into a model: the graph plus the abstract variable layout."""

  def __init__(self, model: Transformer):
    self.graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    self.params_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    self.extra_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), extra)

  def merge(self, params: dict, extra: dict) -> Transformer:
    p = jax.tree.map(lambda x: x, self.params_template)
    e = jax.tree.map(lambda x: x, self.extra_template)
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(e, extra)
    return nnx.merge(self.graphdef, p, e)


def create_train_state(model: Transformer, optimizer: optax.GradientTransformation,
                       spike_window: int = 32, params: Any = None):
  """(template, state) for `model`: parameters, router biases and a fresh optimizer state.

  `params`: what is trained, when not the model's own parameters (LoRA adapters).
  """
  template = ModelTemplate(model)
  if params is None:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  extra = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra,
                     opt_state=optimizer.init(params), skipped=jnp.zeros((), jnp.int32),
                     bad_streak=jnp.zeros((), jnp.int32),
                     loss_window=jnp.zeros((spike_window,), jnp.float32),
                     window_count=jnp.zeros((), jnp.int32))
  return template, state


def router_totals(out) -> dict:
  """The router's per-layer expert load [L, E] and dropped assignments, or {} for a dense model."""
  if out.router is None:
    return {}
  return dict(load=out.router.tokens_per_expert, dropped=out.router.dropped.sum())


def lm_loss(model: Transformer, batch: dict, mtp_weight, balance_weight):
  """Next-token loss over `loss_mask` tokens + mtp_weight x mean MTP loss + balance_weight x
  balance loss, as (loss_sum, tokens, aux): per token, the DeepSeek-V3 objective."""
  out = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  weights = batch["loss_mask"].astype(jnp.float32)
  ce_sum, count = token_cross_entropy(out.logits, batch["targets"], weights)
  mtp = jnp.zeros((), jnp.float32)
  if out.mtp_logits is not None:
    for d in range(out.mtp_logits.shape[0]):
      targets, w = mtp_targets(batch["targets"], batch["segment_ids"], weights, d + 1)
      mtp += mean_or_zero(*token_cross_entropy(out.mtp_logits[d], targets, w))
    mtp /= out.mtp_logits.shape[0]
  balance = out.router.balance_loss.mean() if out.router is not None else jnp.zeros(())
  loss_sum = ce_sum + count * (mtp_weight * mtp + balance_weight * balance)
  sums = dict(loss=ce_sum, mtp_loss=mtp * count, balance_loss=balance * count)
  return loss_sum, count, dict(sums=sums, totals=dict(tokens=count, **router_totals(out)))


def pretrain_loss(cfg: "StepConfig"):
  """The language-model loss as a stage loss_fn, with the step's MTP-weight schedule."""
  def loss_fn(model, batch, frozen, step):
    del frozen
    return lm_loss(model, batch, mtp_weight_at(cfg, step), cfg.balance_weight)
  return loss_fn


def router_bias_update(extra: dict, load_LE: jax.Array, gamma) -> dict:
  """bias_i += gamma * sign(mean load - load_i) for every MoE layer, main layers then MTP blocks;
  MTP blocks keep their biases when `load_LE` has rows for the main layers only (a forward that
  skipped them). A model with a head on a trunk (reward and value models) keeps the trunk's under
  "trunk"."""
  if "trunk" in extra:
    return dict(extra, trunk=router_bias_update(extra["trunk"], load_LE, gamma))
  delta_LE = gamma * jnp.sign(load_LE.mean(-1, keepdims=True) - load_LE)
  extra = jax.tree.map(lambda x: x, extra)
  n = 0
  if "moe_layers" in extra:
    bias = extra["moe_layers"]["ffn"]["router"]["bias"]
    n = bias.shape[0]
    extra["moe_layers"]["ffn"]["router"]["bias"] = bias + delta_LE[:n]
  for k in sorted(extra.get("mtp", {})) if load_LE.shape[0] > n else ():
    router = extra["mtp"][k]["block"]["ffn"]["router"]
    router["bias"] = router["bias"] + delta_LE[n]
    n += 1
  return extra


def expert_load_metrics(load_LE: jax.Array) -> dict:
  """Worst layer's max/mean load and the mean coefficient of variation of the load."""
  load = load_LE.astype(jnp.float32)
  mean = load.mean(-1)
  return dict(expert_load_max_over_mean=(load.max(-1) / jnp.maximum(mean, 1)).max(),
              expert_load_min_over_mean=(load.min(-1) / jnp.maximum(mean, 1)).min(),
              expert_load_cv=(load.std(-1) / jnp.maximum(mean, 1)).mean())


def loss_spike(state: TrainState, loss, cfg: StepConfig):
  """True when the window is full and `loss` is more than `spike_zscore` stds above its mean."""
  if not cfg.spike_zscore:
    return jnp.zeros((), bool)
  window = state.loss_window
  z = (loss - window.mean()) / (window.std() + 1e-6)
  return (state.window_count >= window.shape[0]) & (z > cfg.spike_zscore)


def make_train_step(template: ModelTemplate, optimizer: optax.GradientTransformation,
                    cfg: StepConfig, learning_rate: Callable | None = None,
                    loss_fn: Callable | None = None, model_params: Callable | None = None):
  """The pure `train_step(state, batch, frozen=None) -> (state, metrics)`; jit it with donated
  state.

  `loss_fn(model, batch, frozen, step) -> (loss_sum, weight, aux)` (default: the pre-training
  loss); `model_params(trained, frozen)` builds the model's parameters from the trained ones
  (default: they are the model's parameters; LoRA adds adapters to frozen base weights).
  """
  loss_fn = pretrain_loss(cfg) if loss_fn is None else loss_fn

  def objective(params, extra, frozen, micro, step):
    full = params if model_params is None else model_params(params, frozen)
    loss_sum, weight, aux = loss_fn(template.merge(full, extra), micro, frozen, step)
    return loss_sum, (weight, aux)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state: TrainState, batch: dict, frozen: Any = None):
    m = cfg.microbatches
    # Contiguous micro-batches; on a mesh each is spread over every device (a cheap reshuffle of
    # the token ids), not held by 1/m of them.
    micro = jax.tree.map(lambda x: constrain(x.reshape((m, x.shape[0] // m) + x.shape[1:]), None,
                                             "batch", *(None,) * (x.ndim - 1)), batch)

    def accumulate(carry, mb):
      (_, (weight, aux)), grads = grad_fn(state.params, state.extra, frozen, mb, state.step)
      added, maxima = carry
      aux = dict(aux)
      maxima = jax.tree.map(jnp.maximum, maxima, aux.pop("maxima", {}))
      return (jax.tree.map(jnp.add, added, (grads, weight, aux)), maxima), None

    shapes = jax.eval_shape(lambda: grad_fn(state.params, state.extra, frozen,
                                            jax.tree.map(lambda x: x[0], micro), state.step))
    aux_shapes = dict(shapes[0][1][1])
    lowest = jax.tree.map(lambda s: jnp.full(s.shape, -jnp.inf, s.dtype),
                          aux_shapes.pop("maxima", {}))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         (shapes[1], shapes[0][1][0], aux_shapes))
    ((grads, weight, aux), maxima), _ = jax.lax.scan(accumulate, (zeros, lowest), micro)
    denominator = jnp.maximum(weight, 1e-9)  # An all-masked batch has zero gradient, not NaN.
    grads = jax.tree.map(lambda g: g / denominator, grads)
    means = {k: v / denominator for k, v in aux["sums"].items()}
    totals = dict(aux["totals"])
    load, dropped = totals.pop("load", None), totals.pop("dropped", None)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(means["loss"]) & jnp.isfinite(grad_norm)
    spike = loss_spike(state, means["loss"], cfg)
    ok = finite & ~spike
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    extra = state.extra
    bad_streak = jnp.where(ok, 0, state.bad_streak + 1)
    metrics = dict(**means, **totals, **maxima, grad_norm=grad_norm,
                   skipped=state.skipped + (~ok).astype(jnp.int32), loss_spike=spike,
                   bad_streak=bad_streak)
    if load is not None:
      extra = keep(router_bias_update(state.extra, load, bias_gamma_at(cfg, state.step)),
                   state.extra)
      metrics.update(expert_load_metrics(load), dropped_tokens=dropped)
    if learning_rate is not None:
      metrics["lr"] = learning_rate(state.step)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params), extra=extra,
                           opt_state=keep(opt_state, state.opt_state), skipped=metrics["skipped"],
                           bad_streak=bad_streak,
                           loss_window=jnp.where(ok, jnp.roll(state.loss_window, 1).at[0].set(
                               means["loss"]), state.loss_window),
                           window_count=state.window_count + ok.astype(jnp.int32))
    return new_state, metrics

  return train_step
