"""The one training loop: build or resume everything from a stage and a run config, then step, log,
evaluate, save. Pre-training is one stage (`pretrain_stage`); SFT, reward modelling, DPO and RL
supply theirs from `posttrain/`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterable, Optional

import jax
import ml_collections

from model.config import EXECUTION_FIELDS, ModelConfig, get_preset
from model.sharding import MeshConfig, make_mesh
from model.transformer import Transformer, init_model, with_config
from train import optimizer as opt
from train.checkpoint import Checkpointer, check_run_config, load_model, write_atomically
from train.data import DataConfig, make_dataset, open_source
from train.metrics import MetricsWriter, peak_flops, read_metrics
from train.parallel import (check_batch_layout, create_sharded_state, jit_sharded,
                            jit_train_step, param_shardings, put_batch, shard_state)
from train.step import StepConfig, create_train_state, make_train_step, pretrain_loss
from train.tokenizer import configured_tokenizer, train_sentencepiece


@dataclasses.dataclass
class Stage:
  """What a training stage supplies to `run`; everything else (state, step, checkpoints, guard,
  metrics, resume) is shared."""

  name: str
  cfg: ModelConfig  # The run's model config.
  run_config: dict  # The stage's settings, recorded in DIR/run_config.json and checked on resume.
  # Resumable iterator of host batches (get_state / set_state), global batch_size rows. A source
  # with `next_batch(policy)` is handed the current model each step instead (RL rollouts), and
  # one with `pop_metrics()` adds its metrics to each logged row.
  batches: Any
  batch_size: int
  tokens_per_batch: int  # For tokens/s and MFU.
  loss_fn: Optional[Callable] = None  # (model, batch, frozen, step) -> (sum, weight, aux).
  initial_model: Optional[Callable[[], Transformer]] = None  # None: fresh, born sharded.
  frozen: Any = None  # Parameter trees the loss reads but nothing trains (checkpointed by path).
  trainable: Optional[Callable[[Transformer], Any]] = None  # model -> trained tree (LoRA).
  model_params: Optional[Callable] = None  # (trained, frozen) -> the model's parameters.
  eval_batches: Optional[Callable[[], Iterable[dict]]] = None  # Held-out batches, for eval_loss.
  # model -> {name: value}: held-out measures beyond a loss (RL: greedy pass@1), at eval steps.
  evaluate: Optional[Callable[[Transformer], dict]] = None
  flops_per_token: float = 0.0
  perplexity: bool = True  # Whether eval_loss is a token cross-entropy (then eval_perplexity too).
  batch_source: str = "config.data.batch_size"  # The fields batch_size comes from (for errors).


def config_differences(saved: ModelConfig, wanted: ModelConfig, ignore=EXECUTION_FIELDS) -> list:
  """'field: checkpoint X, run Y' for every weight-shaping field where the two configs differ."""
  return [f"{f.name}: checkpoint {getattr(saved, f.name)!r}, run {getattr(wanted, f.name)!r}"
          for f in dataclasses.fields(ModelConfig)
          if f.name not in ignore and getattr(saved, f.name) != getattr(wanted, f.name)]


def load_for_run(path: str, cfg: ModelConfig) -> Transformer:
  """The weights of a workdir or HF directory under the run's config `cfg` (its dtype, remat and
  kernels); a ValueError names every weight-shaping field that differs, with both values."""
  model = load_model(path)
  differences = config_differences(model.cfg, cfg)
  if differences:
    raise ValueError(f"config.init_from {path!r}: its model config does not match the run's ("
                     + "; ".join(differences) + "); set config.model_overrides to the checkpoint's")
  return with_config(model, cfg)


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """The preset named by `model.preset` with `model_overrides` applied."""
  return get_preset(c.model.preset).replace(**dict(c.model_overrides))


def build_tokenizer(c: ml_collections.ConfigDict, data_cfg: DataConfig, vocab_size: int, workdir: str):
  """Trains (once; later runs reuse DIR/tokenizer.model) or loads the configured tokenizer."""
  t = c.tokenizer
  path = os.path.join(workdir, "tokenizer.model")
  if t.kind != "train_sentencepiece" or os.path.exists(path):
    return configured_tokenizer(t, workdir)
  source = open_source(data_cfg)
  tokenizer = train_sentencepiece((source[i] for i in range(min(t.train_docs, len(source)))),
                                  vocab_size)
  write_atomically(path, tokenizer.model_proto)
  return tokenizer


def _initial_model(c, cfg: ModelConfig):
  """A fresh model, or the weights of `init_from` (a HF directory or a workdir) under `cfg`."""
  if not c.init_from:
    return init_model(cfg, seed=c.seed)
  return load_for_run(c.init_from, cfg)


def run_model_fields(cfg: ModelConfig) -> dict:
  """The model fields a resumed run must keep: all but the kernel and remat choices (the dtype
  stays: it changes the losses)."""
  return {k: v for k, v in dataclasses.asdict(cfg).items()
          if k == "dtype" or k not in EXECUTION_FIELDS}


def pretrain_stage(c: ml_collections.ConfigDict, workdir: str) -> Stage:
  """Next-token (+ MTP) prediction over packed documents of the configured corpus."""
  os.makedirs(workdir, exist_ok=True)
  cfg = model_config(c)
  data_cfg = DataConfig(**dict(c.data))
  run_config = dict(model=run_model_fields(cfg), data=dataclasses.asdict(data_cfg),
                    tokenizer=dict(c.tokenizer), init_from=c.init_from)
  if data_cfg.seq_len > cfg.max_seq_len:
    raise ValueError(f"config.data.seq_len {data_cfg.seq_len} exceeds the model's max_seq_len "
                     f"{cfg.max_seq_len}")
  tokenizer = build_tokenizer(c, data_cfg, cfg.vocab_size, workdir)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                     f"config.model_overrides.vocab_size is {cfg.vocab_size}")
  shard = (jax.process_index(), jax.process_count())
  # Built once (each evaluation iterates it from its start); an empty held-out split fails now,
  # not at the first evaluation.
  held_out = make_dataset(data_cfg, tokenizer, "eval", *shard) if c.eval_every else None
  check_run_config(workdir, dict(run_config, **loop_fields(c)))  # Written once the inputs pass.
  return Stage(
      name="pretrain", cfg=cfg, run_config=run_config,
      batches=iter(make_dataset(data_cfg, tokenizer, "train", *shard)),
      batch_size=data_cfg.batch_size, tokens_per_batch=data_cfg.batch_size * data_cfg.seq_len,
      initial_model=(lambda: _initial_model(c, cfg)) if c.init_from else None,
      eval_batches=(lambda: held_out) if held_out is not None else None,
      flops_per_token=cfg.flops_per_token(data_cfg.seq_len))


def pretrain(c: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) pre-training; returns the logged metrics rows of this invocation."""
  return run(pretrain_stage(c, workdir), c, workdir)


def loop_fields(c) -> dict:
  """The run-config fields every stage shares (recorded beside the stage's own)."""
  opt_cfg = opt.OptimizerConfig(total_steps=c.total_steps, **dict(c.optimizer))
  return dict(optimizer=dataclasses.asdict(opt_cfg), step=dataclasses.asdict(StepConfig(**dict(c.step))),
              seed=c.seed)


def run(stage: Stage, c: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains `stage` to `c.total_steps` (resuming from DIR/checkpoints); returns this invocation's
  logged metrics rows. `c` gives the optimizer, step, mesh, schedule and logging fields."""
  os.makedirs(workdir, exist_ok=True)
  check_run_config(workdir, dict(stage.run_config, **loop_fields(c)))
  opt_cfg = opt.OptimizerConfig(total_steps=c.total_steps, **dict(c.optimizer))
  step_cfg = StepConfig(**dict(c.step))
  tx = opt.make_optimizer(opt_cfg)
  mesh = make_mesh(MeshConfig(**dict(c.mesh)))
  check_batch_layout(stage.batch_size, step_cfg.microbatches, mesh, stage.batch_source)
  if stage.initial_model is not None:  # Loaded on the host, then laid out on the mesh.
    model = stage.initial_model()
    trained = stage.trainable(model) if stage.trainable is not None else None
    template, state = create_train_state(model, tx, step_cfg.spike_window, params=trained)
    state, shardings = shard_state(state, mesh)
  else:  # Born sharded: no host holds the whole state.
    template, state, shardings = create_sharded_state(stage.cfg, tx, mesh, c.seed,
                                                      step_cfg.spike_window)
  frozen_shardings = param_shardings(stage.frozen if stage.frozen is not None else {}, mesh)
  frozen = jax.device_put(stage.frozen if stage.frozen is not None else {}, frozen_shardings)
  data = stage.batches
  ckpt = Checkpointer(workdir, c.checkpoint_every, c.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(state)
    if restored is None:
      check_nothing_lost(workdir, c.checkpoint_every)
  except Exception:
    ckpt.close()
    raise
  start = None
  if restored is not None:
    start, state, data_state = restored
    data.set_state(data_state)
    print(f"resumed from {workdir}/checkpoints step {start}", flush=True)

  lr = opt.learning_rate(opt_cfg)
  train_step = jit_train_step(
      make_train_step(template, tx, step_cfg, lr, stage.loss_fn, stage.model_params), shardings,
      mesh, stage.batch_size, frozen_shardings)
  loss_fn = stage.loss_fn or pretrain_loss(step_cfg)

  def held_out(params, extra, frozen, batch):
    full = params if stage.model_params is None else stage.model_params(params, frozen)
    _, weight, aux = loss_fn(template.merge(full, extra), batch, frozen, 0)
    return aux["sums"], weight
  eval_loss = jit_sharded(held_out, mesh, None, None)

  def policy(state):  # The model being trained, as of `state`: what RL samples its rollouts from.
    full = state.params if stage.model_params is None else stage.model_params(state.params, frozen)
    return template.merge(full, state.extra)

  peak, peak_source = peak_flops(c.peak_flops)
  writer = MetricsWriter(workdir, c.total_steps, enabled=jax.process_index() == 0,
                         resume_step=start or 0)
  rows, step, tick, restores = [], int(state.step), time.perf_counter(), 0
  unread = None  # The previous step's bad-step streak, not yet read on the host.
  while step < c.total_steps:
    host_batch = data.next_batch(policy(state)) if hasattr(data, "next_batch") else next(data)
    state, metrics = train_step(state, put_batch(host_batch, mesh, stage.batch_size), frozen)
    step += 1
    # The guard reads each step's bad-step streak one step late, once the next step is queued, so
    # the host never idles the device; steps that log or checkpoint (which wait anyway) read it now.
    streaks = [unread] if unread is not None else []
    if step % c.log_every == 0 or step % ckpt.every == 0 or step == c.total_steps:
      streaks, unread = streaks + [metrics["bad_streak"]], None
    else:
      unread = metrics["bad_streak"]
    if c.max_bad_steps and any(int(s) >= c.max_bad_steps for s in streaks):
      unread = None
      good = ckpt.latest_step()
      restores += 1
      if good is None or restores > 3:
        raise RuntimeError(f"step {step}: {c.max_bad_steps} consecutive skipped steps and "
                           f"{'no checkpoint' if good is None else 'three restores already'}; "
                           "lower config.optimizer.peak_lr or inspect the data")
      ckpt.wait()
      state, _ = ckpt.restore(good, state)  # The data iterator moves on past the bad batches.
      print(f"step {step}: {c.max_bad_steps} consecutive skipped steps; restored the checkpoint of "
            f"step {good}", flush=True)
      step = good
      continue
    if step % c.log_every == 0 or step == c.total_steps:
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - tick
      logged = step - (rows[-1]["step"] if rows else (start or 0))
      tps = stage.tokens_per_batch * logged / elapsed
      row = dict(metrics, tokens_per_sec=tps, mfu=stage.flops_per_token * tps / peak,
                 seconds_per_step=elapsed / logged, peak_flops_source=peak_source)
      if hasattr(data, "pop_metrics"):  # Host-side metrics of the batch source (RL rollouts).
        row.update(data.pop_metrics())
      if c.eval_every and (step % c.eval_every == 0 or step == c.total_steps):
        if stage.eval_batches is not None:
          row.update(_evaluate(eval_loss, state, frozen, stage, c.eval_batches, mesh))
          if stage.perplexity:
            row["eval_perplexity"] = math.exp(min(row["eval_loss"], 50.0))
        if stage.evaluate is not None:
          row.update(stage.evaluate(policy(state)))
      writer.write(step, row)
      rows.append(dict(row, step=step))
      tick = time.perf_counter()
    ckpt.save(step, state, data.get_state())
  if ckpt.latest_step() != step:
    ckpt.save(step, state, data.get_state(), force=True)
  else:
    print(f"{workdir}: run complete at step {step}", flush=True)
  ckpt.wait()
  ckpt.close()
  return rows


def check_nothing_lost(workdir: str, checkpoint_every: int) -> None:
  """Raises when DIR has no checkpoint but its metrics show one was complete (a row past step
  2 x checkpoint_every: the next save waits for the previous one): starting over would silently
  replace that work. A run killed before its first checkpoint completed starts over."""
  rows = read_metrics(workdir)
  if rows and checkpoint_every and rows[-1]["step"] > 2 * checkpoint_every:
    raise ValueError(
        f"{workdir}/checkpoints holds no checkpoint, but {workdir}/metrics.jsonl logs steps up to "
        f"{rows[-1]['step']} (checkpoints every {checkpoint_every}): they were deleted or lost. "
        "Put them back, or start over in a new --workdir")


def _evaluate(eval_loss, state, frozen, stage: Stage, batches: int, mesh) -> dict:
  """Weighted means of the loss's metric sums over the first `batches` full held-out batches, as
  eval_<name> (eval_loss; a reward model's eval_accuracy, ...); NaN when there is none."""
  totals, weight = {}, 0.0
  for i, batch in enumerate(stage.eval_batches()):
    if i == batches:
      break
    if len(next(iter(batch.values()))) * jax.process_count() != stage.batch_size:
      break  # The last, partial batch would compile another shape.
    sums, w = eval_loss(state.params, state.extra, frozen, put_batch(batch, mesh, stage.batch_size))
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
    weight += float(w)
  if not weight:
    return {"eval_loss": float("nan")}
  return {f"eval_{k}": v / weight for k, v in totals.items()}
