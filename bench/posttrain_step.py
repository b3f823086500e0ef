"""Post-training step throughput: our SFT, DPO and GRPO steps against TRL's SFTTrainer,
DPOTrainer and GRPOTrainer.

SFT: the same config, random weights and batch of B rows x T tokens with a loss on the
"assistant" part of each row only (the last 3/4, as in a chat example). DPO: B pairs of T tokens a
side (a shared prompt of T/4 tokens, then each response), the sigmoid loss with beta 0.1. Ours is
the jitted step of the stage's loss (AdamW), timed with the reference log-probs cached (our
default) and computed online by a frozen copy in the step (TRL's default, which this compares
against); TRL's trainers run PyTorch eagerly (AdamW), both float32 on CPU. TRL is a benchmark
peer only: `pip install -e .[hf,peers]`; without it, only our steps are timed and a
{"kind": "skipped"} line says why. GRPO: 4 prompts of 64 tokens x 8 completions x 64 new
tokens (every completion runs to 64), beta 0.04 (a frozen reference online in both), generation
included; ours split into rollout and train seconds. Prints one JSON object per implementation,
then the ratios.

  .venv/bin/python -m bench.posttrain_step --shape=bench-tiny --steps=5 --stages=sft,dpo,grpo
"""

from __future__ import annotations

import copy
import json
import tempfile
import time

import numpy as np
from absl import app, flags

from bench.jax_step import time_jax, time_step
from bench.shapes import bench_config
from model import hf
from model.config import ModelConfig

_SHAPE = flags.DEFINE_string("shape", "bench-tiny", "Benchmark shape (bench/shapes.py).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per implementation (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed TRL steps first (allocator, autograd).")
_STAGES = flags.DEFINE_list("stages", ["sft", "dpo", "grpo"], "Which steps to time: sft, dpo, grpo.")


def assistant_mask(b: int, t: int) -> np.ndarray:
  """[B, T] weights: 0 on each row's first quarter (the prompt), 1 on the rest."""
  mask = np.ones((b, t), np.float32)
  mask[:, :t // 4] = 0
  return mask


def _tokenizer(vocab_size: int):
  """A word-level tokenizer object over the ids, with a pad token: SFTTrainer requires one even
  for a pre-tokenized dataset."""
  import tokenizers
  import transformers
  vocab = {f"t{i}": i for i in range(vocab_size)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()  # "t3 t4" -> [3, 4] (DPO's text).
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1")


def time_trl(cfg: ModelConfig, tokens: np.ndarray, mask: np.ndarray, steps: int,
             warmup: int) -> float:
  """Seconds per SFTTrainer optimizer step (the median of `steps` after `warmup`), timed between
  its step-begin and step-end callbacks."""
  import datasets
  import torch
  import transformers
  import trl
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(**hf.to_hf_config(cfg))).float()
  b, t = tokens.shape[0], tokens.shape[1] - 1
  # The first token is never predicted: TRL's assistant mask is over the inputs, ours over targets.
  rows = [dict(input_ids=tokens[i, :t + 1].tolist(),
               assistant_masks=[0] + mask[i].astype(int).tolist()) for i in range(b)]
  data = datasets.Dataset.from_list(rows * (warmup + steps))
  times = []
  with tempfile.TemporaryDirectory() as out:
    args = trl.SFTConfig(
        output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=b,
        max_length=t + 1, packing=False, learning_rate=1e-3, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, bf16=False, fp16=False, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                             processing_class=_tokenizer(cfg.vocab_size), callbacks=[_step_timer(times)])
    trainer.train()
  return float(np.median(times[warmup:]))


def _step_timer(times: list):
  """A TrainerCallback that appends each optimizer step's seconds to `times`."""
  import transformers

  class StepTimer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.perf_counter() - self.start)
  return StepTimer()


def pair_batch_arrays(tokens: np.ndarray, prompt: int) -> dict:
  """Our DPO batch from [B, 2, T] token ids sharing their first `prompt` ids: both sides, their
  response masks and last indices, hard labels and zero cached reference log-probs."""
  b, _, t = tokens.shape
  mask = np.zeros((b, t), np.float32)
  mask[:, prompt:] = 1
  return dict(chosen=tokens[:, 0], rejected=tokens[:, 1], chosen_mask=mask, rejected_mask=mask,
              chosen_last=np.full((b,), t - 1, np.int32), rejected_last=np.full((b,), t - 1, np.int32),
              label=np.ones((b,), np.float32), margin=np.zeros((b,), np.float32),
              ref_chosen=np.zeros((b,), np.float32), ref_rejected=np.zeros((b,), np.float32))


def time_dpo_ours(cfg: ModelConfig, batch: dict, steps: int) -> dict:
  """Seconds per DPO step of ours, with cached and with online reference log-probs."""
  from model.transformer import init_model
  from posttrain.dpo import DpoConfig, dpo_loss
  from posttrain.start import frozen_copy
  tree, rebuild = frozen_copy(init_model(cfg, seed=0))
  online = dpo_loss(DpoConfig(), reference=lambda f: rebuild(f["reference"]))
  return {"jax_cached": time_step(cfg, batch, steps, dpo_loss(DpoConfig())),
          "jax_online": time_step(cfg, batch, steps, online, frozen={"reference": tree})}


def time_dpo_trl(cfg: ModelConfig, tokens: np.ndarray, prompt: int, steps: int,
                 warmup: int) -> float:
  """Seconds per DPOTrainer optimizer step (sigmoid loss, its reference model online; the median
  of `steps` after `warmup`)."""
  import datasets
  import torch
  import transformers
  import trl
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(**hf.to_hf_config(cfg))).float()
  words = lambda ids: " ".join(f"t{i}" for i in ids)
  # TRL appends eos to each response: one id fewer here keeps T tokens a side.
  rows = [dict(prompt=words(row[0, :prompt]), chosen=" " + words(row[0, prompt:-1]),
               rejected=" " + words(row[1, prompt:-1])) for row in tokens]
  data = datasets.Dataset.from_list(rows * (warmup + steps))
  times = []
  with tempfile.TemporaryDirectory() as out:
    args = trl.DPOConfig(
        output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=len(tokens),
        max_length=tokens.shape[2], beta=0.1, loss_type=["sigmoid"], learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10**6, save_strategy="no",
        report_to="none", use_cpu=True, dataloader_num_workers=0, bf16=False, fp16=False, seed=0)
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=data,
                             processing_class=_tokenizer(cfg.vocab_size), callbacks=[_step_timer(times)])
    trainer.train()
  return float(np.median(times[warmup:]))


def _has_trl() -> bool:
  try:
    import trl  # noqa: F401
  except ImportError as e:
    print(json.dumps(dict(kind="skipped", impl="trl", reason=f"{e}; pip install -e .[hf,peers]")))
    return False
  return True


def bench_sft(cfg: ModelConfig, b: int, t: int, trl_ok: bool) -> None:
  """Prints the SFT step rows and ratio."""
  tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  mask = assistant_mask(b, t)
  results = {"jax": time_jax(cfg, tokens, _STEPS.value, loss_mask=mask)}
  if trl_ok:
    results["trl"] = time_trl(cfg, tokens, mask, _STEPS.value, _WARMUP.value)
  for impl, seconds in results.items():
    print(json.dumps(dict(kind="step", stage="sft", shape=_SHAPE.value, impl=impl, batch=b,
                          seq_len=t, seconds_per_step=seconds, tokens_per_sec=b * t / seconds,
                          loss_tokens=int(mask.sum()))), flush=True)
  if "trl" in results:
    print(json.dumps(dict(kind="ratio", stage="sft", shape=_SHAPE.value,
                          ours_over_trl=results["trl"] / results["jax"])), flush=True)


def bench_dpo(cfg: ModelConfig, b: int, t: int, trl_ok: bool) -> None:
  """Prints the DPO step rows (B pairs, T tokens a side) and ratios."""
  rng = np.random.default_rng(1)
  prompt = t // 4
  tokens = rng.integers(2, cfg.vocab_size, (b, 2, t)).astype(np.int32)
  tokens[:, 1, :prompt] = tokens[:, 0, :prompt]
  results = time_dpo_ours(cfg, pair_batch_arrays(tokens, prompt), _STEPS.value)
  if trl_ok:
    results["trl"] = time_dpo_trl(cfg, tokens, prompt, _STEPS.value, _WARMUP.value)
  for impl, seconds in results.items():
    print(json.dumps(dict(kind="step", stage="dpo", shape=_SHAPE.value, impl=impl, pairs=b,
                          tokens_per_side=t, seconds_per_step=seconds,
                          pairs_per_sec=b / seconds)), flush=True)
  if "trl" in results:
    print(json.dumps(dict(kind="ratio", stage="dpo", shape=_SHAPE.value,
                          ours_over_trl=results["trl"] / results["jax_online"],
                          ours_cached_over_trl=results["trl"] / results["jax_cached"])), flush=True)


def time_grpo_ours(cfg: ModelConfig, prompts: np.ndarray, samples: int, new_tokens: int,
                   steps: int, beta: float) -> dict:
  """Seconds per GRPO step of ours, split into rollout (sampling P x G completions with the
  current policy, rewards, group advantages) and the train step (the GRPO loss with a frozen
  reference, AdamW; one update per rollout, so the old log-probs are the loss's own forward, as
  in posttrain/rl.py and TRL): the medians of `steps` after a compiling warm-up."""
  import jax
  from model.generate import generate
  from model.sampling import SamplingConfig
  from model.transformer import init_model
  from posttrain.grpo import GrpoConfig, grpo_loss
  from posttrain.rl import group_advantages
  from posttrain.start import frozen_copy
  from train import optimizer as opt
  from train.step import StepConfig, create_train_state, make_train_step
  model = init_model(cfg, seed=0)
  tree, rebuild = frozen_copy(model)
  loss_fn = grpo_loss(GrpoConfig(beta=beta), new_tokens, lambda f: rebuild(f["reference"]))
  tx = opt.make_optimizer(opt.OptimizerConfig(peak_lr=1e-5, warmup_steps=0, total_steps=1000,
                                              weight_decay=0.0))
  template, state = create_train_state(model, tx)
  step = jax.jit(make_train_step(template, tx, StepConfig(mtp_weight=0.0, balance_weight=0.0,
                                                          bias_gamma=0.0), loss_fn=loss_fn),
                 donate_argnums=0)
  p, width = prompts.shape
  rows = np.repeat(prompts, samples, axis=0)
  lengths = np.full((len(rows),), width, np.int32)
  sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)
  mask = np.zeros((len(rows), width + new_tokens), np.float32)
  mask[:, width:] = 1
  rollout_s, train_s = [], []
  for i in range(steps + 1):
    start = time.perf_counter()
    policy = template.merge(state.params, state.extra)
    out = jax.device_get(generate(policy, rows, lengths, jax.random.key(i), sampling))
    tokens = np.concatenate([rows, out.tokens], axis=1)
    rewards = (out.tokens % 2 == 0).mean(1).reshape(p, samples)  # Any per-completion score.
    advantages = group_advantages(rewards, "grpo").reshape(-1).astype(np.float32)
    sampler = np.zeros(mask.shape, np.float32)
    sampler[:, width:] = out.logprobs
    middle = time.perf_counter()
    batch = dict(tokens=tokens, completion_mask=mask, advantages=advantages,
                 sampler_logprobs=sampler)
    state, metrics = step(state, batch, {"reference": tree})
    jax.block_until_ready(metrics)
    if i:  # Step 0 compiles.
      rollout_s.append(middle - start)
      train_s.append(time.perf_counter() - middle)
  rollout, train = float(np.median(rollout_s)), float(np.median(train_s))
  return dict(seconds_per_step=rollout + train, rollout_seconds=rollout, train_seconds=train)


def time_grpo_trl(cfg: ModelConfig, prompts: np.ndarray, samples: int, new_tokens: int,
                  steps: int, warmup: int, beta: float) -> float:
  """Seconds per GRPOTrainer step (generation with transformers' generate included; its
  reference model online for beta > 0; the median of `steps` after `warmup`), the same reward on
  the completion's ids."""
  import datasets
  import torch
  import transformers
  import trl
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(**hf.to_hf_config(cfg))).float()
  words = lambda ids: " ".join(f"t{i}" for i in ids)

  def reward(completions, **kwargs):
    return [float(np.mean([int(w[1:]) % 2 == 0 for w in c.split()] or [0])) for c in completions]

  data = datasets.Dataset.from_list([dict(prompt=words(row)) for row in prompts] * (warmup + steps))
  times = []
  with tempfile.TemporaryDirectory() as out:
    model.save_pretrained(out + "/model")  # With beta > 0 TRL loads its reference from a path.
    args = trl.GRPOConfig(
        output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=len(prompts) * samples,
        num_generations=samples, max_completion_length=new_tokens, temperature=1.0, beta=beta,
        generation_kwargs=dict(min_new_tokens=new_tokens), learning_rate=1e-5,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10**6, save_strategy="no",
        report_to="none", use_cpu=True, dataloader_num_workers=0, bf16=False, fp16=False, seed=0)
    trainer = trl.GRPOTrainer(model=out + "/model", reward_funcs=[reward], args=args,
                              train_dataset=data,
                              processing_class=_tokenizer(cfg.vocab_size),
                              callbacks=[_step_timer(times)])
    trainer.train()
  return float(np.median(times[warmup:]))


def bench_grpo(cfg: ModelConfig, trl_ok: bool, prompts_n: int = 4, samples: int = 8,
               new_tokens: int = 64, prompt_tokens: int = 64, beta: float = 0.04) -> None:
  """Prints the GRPO step rows (P prompts x G completions x N new tokens, generation included)
  and the ratio on completions per second."""
  prompts = np.random.default_rng(2).integers(2, cfg.vocab_size, (prompts_n, prompt_tokens))
  prompts = prompts.astype(np.int32)
  completions = prompts_n * samples
  ours = time_grpo_ours(cfg, prompts, samples, new_tokens, _STEPS.value, beta)
  rows = {"jax": ours}
  if trl_ok:
    rows["trl"] = dict(seconds_per_step=time_grpo_trl(cfg, prompts, samples, new_tokens,
                                                      _STEPS.value, _WARMUP.value, beta))
  for impl, r in rows.items():
    print(json.dumps(dict(kind="step", stage="grpo", shape=_SHAPE.value, impl=impl,
                          prompts=prompts_n, samples=samples, new_tokens=new_tokens, beta=beta,
                          completions_per_sec=completions / r["seconds_per_step"], **r)),
          flush=True)
  if "trl" in rows:
    print(json.dumps(dict(kind="ratio", stage="grpo", shape=_SHAPE.value,
                          ours_over_trl=rows["trl"]["seconds_per_step"] / ours["seconds_per_step"])),
          flush=True)


def main(argv):
  del argv
  cfg, (b, t) = bench_config(_SHAPE.value)
  trl_ok = _has_trl()
  unknown = sorted(set(_STAGES.value) - {"sft", "dpo", "grpo"})
  if unknown:
    raise SystemExit(f"--stages: unknown {unknown}; known: sft, dpo, grpo")
  if "sft" in _STAGES.value:
    bench_sft(cfg, b, t, trl_ok)
  if "dpo" in _STAGES.value:
    bench_dpo(cfg, b, t, trl_ok)
  if "grpo" in _STAGES.value:
    bench_grpo(cfg, trl_ok)


if __name__ == "__main__":
  app.run(main)
