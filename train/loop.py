"""The pre-training run: build or resume everything from a config, then step, log, evaluate, save."""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import ml_collections
import numpy as np

from model.config import EXECUTION_FIELDS, ModelConfig, get_preset
from model.sharding import MeshConfig, make_mesh
from model.transformer import init_model
from train import optimizer as opt
from train.checkpoint import Checkpointer, check_run_config, load_model
from train.data import DataConfig, make_dataset, open_source
from train.metrics import MetricsWriter, peak_flops
from train.parallel import create_sharded_state, jit_sharded, jit_train_step, put_batch, shard_state
from train.step import StepConfig, create_train_state, lm_loss, make_train_step
from train.tokenizer import configured_tokenizer, train_sentencepiece


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
  with open(path, "wb") as f:
    f.write(tokenizer.model_proto)
  return tokenizer


def _initial_model(c, cfg: ModelConfig):
  """A fresh model, or the weights of `init_from` (a HF directory or a workdir) for `cfg`."""
  if not c.init_from:
    return init_model(cfg, seed=c.seed)
  model = load_model(c.init_from)
  if not model.cfg.same_weights_as(cfg):
    raise ValueError(f"config.init_from {c.init_from!r}: its model config does not match the "
                     "run's; set config.model_overrides to the checkpoint's shapes")
  return model


def _run_model_fields(cfg: ModelConfig) -> dict:
  """The model fields a resumed run must keep: all but the kernel and remat choices (the dtype
  stays: it changes the losses)."""
  return {k: v for k, v in dataclasses.asdict(cfg).items()
          if k == "dtype" or k not in EXECUTION_FIELDS}


def pretrain(c: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) pre-training; returns the logged metrics rows of this invocation."""
  os.makedirs(workdir, exist_ok=True)
  cfg = model_config(c)
  data_cfg = DataConfig(**dict(c.data))
  opt_cfg = opt.OptimizerConfig(total_steps=c.total_steps, **dict(c.optimizer))
  step_cfg = StepConfig(**dict(c.step))
  check_run_config(workdir, dict(
      model=_run_model_fields(cfg), data=dataclasses.asdict(data_cfg),
      tokenizer=dict(c.tokenizer), optimizer=dataclasses.asdict(opt_cfg),
      step=dataclasses.asdict(step_cfg), seed=c.seed, init_from=c.init_from))
  tokenizer = build_tokenizer(c, data_cfg, cfg.vocab_size, workdir)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                     f"config.model_overrides.vocab_size is {cfg.vocab_size}")

  tx = opt.make_optimizer(opt_cfg)
  mesh = make_mesh(MeshConfig(**dict(c.mesh)))
  if c.init_from:  # Loaded on the host, then laid out on the mesh.
    template, state = create_train_state(_initial_model(c, cfg), tx, step_cfg.spike_window)
    state, shardings = shard_state(state, mesh)
  else:  # Born sharded: no host holds the whole state.
    template, state, shardings = create_sharded_state(cfg, tx, mesh, c.seed, step_cfg.spike_window)
  data = iter(make_dataset(data_cfg, tokenizer, "train", jax.process_index(), jax.process_count()))
  ckpt = Checkpointer(workdir, c.checkpoint_every, c.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    state, data_state = ckpt.restore(start, state)
    data.set_state(data_state)
    print(f"resumed from {workdir}/checkpoints step {start}", flush=True)

  lr = opt.learning_rate(opt_cfg)
  train_step = jit_train_step(make_train_step(template, tx, step_cfg, lr), shardings, mesh,
                              data_cfg.batch_size)
  eval_loss = jit_sharded(
      lambda params, extra, batch: lm_loss(template.merge(params, extra), batch, 0.0, 0.0)[1]["loss"],
      mesh, None, None)

  tokens_per_step = data_cfg.batch_size * data_cfg.seq_len
  peak, peak_source = peak_flops(c.peak_flops)
  flops_per_token = cfg.flops_per_token(data_cfg.seq_len)
  writer = MetricsWriter(workdir, c.total_steps, enabled=jax.process_index() == 0)
  rows, step, tick, restores = [], int(state.step), time.perf_counter(), 0
  while step < c.total_steps:
    state, metrics = train_step(state, put_batch(next(data), mesh, data_cfg.batch_size))
    step += 1
    if c.max_bad_steps and int(metrics["bad_streak"]) >= c.max_bad_steps:
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
      tps = tokens_per_step * logged / elapsed
      row = dict(metrics, tokens_per_sec=tps, mfu=flops_per_token * tps / peak,
                 peak_flops_source=peak_source)
      if c.eval_every and (step % c.eval_every == 0 or step == c.total_steps):
        row["eval_loss"] = _evaluate(eval_loss, state, data_cfg, tokenizer, c.eval_batches, mesh)
        row["eval_perplexity"] = math.exp(min(row["eval_loss"], 50.0))
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


def _evaluate(eval_loss, state, data_cfg, tokenizer, batches: int, mesh) -> float:
  """Mean next-token loss over the first `batches` held-out batches."""
  losses = []
  for i, batch in enumerate(make_dataset(data_cfg, tokenizer, "eval", jax.process_index(),
                                         jax.process_count())):
    if i == batches:
      break
    if batch["inputs"].shape[0] * jax.process_count() != data_cfg.batch_size:
      break  # The last, partial batch would compile another shape.
    losses.append(float(eval_loss(state.params, state.extra,
                                  put_batch(batch, mesh, data_cfg.batch_size))))
  return float(np.mean(losses)) if losses else float("nan")
