"""RL with verifiable rewards (GRPO family): the no-flag default of posttrain.grpo.

  python -m posttrain.grpo --config=configs/grpo.py --workdir=workdir/grpo \
      --config.init_from=workdir/sft
  python -m posttrain.grpo --config=configs/grpo.py:dapo ...   # clip-higher, token mean, dynamic sampling
  python -m posttrain.grpo --config=configs/grpo.py:dr_grpo ... # no std scaling, constant normaliser
  python -m posttrain.grpo --config=configs/grpo.py:reasoning ... # built-in arithmetic recipe
  python -m posttrain.grpo --config=configs/grpo.py:rlhf --config.rewards.reward_model=workdir/rm ...

Each step samples rollout.prompts x rollout.samples completions from the current policy on the
tasks' train problems, scores them with the verifiers, and takes rollout.epochs x
rollout.minibatches optimizer steps on them (total_steps counts optimizer steps).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # Required: an SFT workdir (any chat checkpoint) or a HF directory.
  c.model_overrides = common.model_overrides()
  c.data = ml_collections.ConfigDict(dict(
      tasks="arithmetic,countdown",  # Built-in families whose train problems are the prompts
                                     # (program: code checked by running tests in the sandbox).
      problems=4000,  # Train problems per family.
      seed=0))  # Prompt order and rollout sampling.
  c.rollout = ml_collections.ConfigDict(dict(
      prompts=8, samples=8, max_new_tokens=64, temperature=1.0, top_p=1.0, epochs=1,
      minibatches=1, dynamic_sampling=False, max_refills=3, overlong="keep", batch_size=64,
      routing_replay=False,  # MoE: train on the experts the sampler chose (routing replay).
      old_logprobs="forward",  # The ratio's old log-probs: a training forward (once per rollout
                               # when it serves several updates, else the loss's own), or
                               # "sampler": the sampler's, for every update (no forward).
      environment="",  # "python_tool": multi-turn episodes where the model may run Python
                       # (posttrain/environments.py); max_new_tokens is then the whole episode's.
      max_turns=3, turn_tokens=0))  # Episodes: turns at most, tokens per turn (0: max_new_tokens).
  c.grpo = ml_collections.ConfigDict(dict(
      advantage="grpo", aggregation="sequence_mean", ratio="token", surrogate="clip",
      eps_low=0.2, eps_high=0.2, dual_clip=0.0, beta=0.0, kl_estimator="k3", tis_cap=0.0,
      std_eps=1e-4))
  c.rewards = ml_collections.ConfigDict(dict(
      accuracy=1.0,  # Weight of the verifier's score.
      format=0.0,  # Weight of the <think>...</think>answer format reward; 0: off.
      steps=0.0,  # Weight of the process reward: the fraction of the problem's own steps the
                  # reasoning carries out right (the task's step_score: arithmetic's steps,
                  # countdown's legal moves); 0: off.
      overlong_cache=0,  # > 0: DAPO's soft overlong penalty over the last this many tokens.
      reward_model="",  # A reward-model workdir (posttrain.reward_model): RLHF against it.
      reward_model_weight=1.0,
      code_tests="all",  # Program task: "all" (1 only when every hidden test passes) or "fraction".
      sandbox="namespaces"))  # Program task isolation; "rlimits" accepts rlimits only (sandbox.py).
  c.eval = ml_collections.ConfigDict(dict(
      tasks="",  # Held-out greedy pass@1 of these families every eval_every steps, logged as
                 # eval_TASK_pass_at_1 (a family not in data.tasks measures transfer); "": none.
      problems=100))  # Held-out problems per family.
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="q_a,q_b,kv_a,kv_b,o"))
  common.add_rl_training(c, peak_lr=2e-4, log_every=5)
  if arg == "dapo":
    c.grpo.update(eps_high=0.28, aggregation="token_mean")
    c.rollout.update(dynamic_sampling=True, overlong="filter")
  elif arg == "dr_grpo":
    c.grpo.update(advantage="dr_grpo", aggregation="constant")
  elif arg == "gspo":
    c.grpo.update(ratio="sequence", eps_low=3e-4, eps_high=4e-4)
  elif arg == "cispo":
    c.grpo.update(surrogate="cispo", eps_high=2.0, aggregation="token_mean")
  elif arg == "rloo":
    c.grpo.update(advantage="rloo", aggregation="token_mean")
  elif arg == "reasoning":  # Arithmetic in under 10 minutes (README, "What GRPO does").
    c.data.tasks = "arithmetic"
    c.rewards.steps = 1.0  # With the answer's accuracy: right steps, not lucky answers.
    c.grpo.advantage = "process"  # Each step's credit on its own tokens (outcome: +6.3 mean).
    c.rollout.update(prompts=32, batch_size=128,  # 256 completions per rollout: at 8 x 8 the
                     minibatches=2,  # gradient is too noisy; two updates of 128 per rollout,
                     old_logprobs="sampler")  # whose old log-probs are the sampler's (no forward).
    c.optimizer.peak_lr = 1e-4  # Held for 3/4 of the steps, then down to 1e-5: the last policy
    c.optimizer.update(schedule="wsd", decay_fraction=0.25, end_lr_fraction=0.1)  # settles.
    c.rollout.temperature = 0.7  # Closer to the greedy policy that is evaluated than 1.0.
    # DAPO's soft overlong penalty over the last 16 tokens: nothing else rewards stopping, and on
    # countdown (2026-12-08 demo, from DPO, 200 held-out problems) completions drifted into
    # running past their answer: format 1.00 -> 0.77, pass@1 0.265 -> 0.105; with the penalty
    # 0.995 and 0.225 (arithmetic 0.59 -> 0.645, as without it, 0.65).
    c.rewards.overlong_cache = 16
    c.update(total_steps=380, checkpoint_every=100, eval_every=100)
    c.eval.tasks = "arithmetic,countdown"  # Countdown is not trained on: transfer.
  elif arg == "rlhf":  # GRPO against a learned reward: pass --config.rewards.reward_model=DIR.
    c.rewards.accuracy = 0.0  # The verifier's score is logged (reward_accuracy), not optimised.
    c.grpo.beta = 0.04
  elif arg:
    raise ValueError(f"configs/grpo.py: unknown variant {arg!r}; known: cispo, dapo, dr_grpo, "
                     "gspo, reasoning, rlhf, rloo")
  return c
