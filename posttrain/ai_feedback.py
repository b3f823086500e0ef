"""AI feedback (RL-CAI): a judge model, not a person, labels which of two responses better follows
a constitution's principles; the soft labels feed the reward-model and DPO paths unchanged.

  python -m posttrain.ai_feedback --judge=CKPT --policy=CKPT --prompts=FILE --out=prefs.jsonl \
      [--constitution=FILE] [--principles=2]   # --prompts=task:arithmetic for built-in prompts

For each prompt the policy samples two responses. The judge sees one principle, the prompt and
both responses as (A) and (B), and its preference is the normalised probability of the two
answers: P(A) = p("A") / (p("A") + p("B")), each the judge's probability of that whole answer as
its assistant turn. The label is the mean over `principles` sampled principles and over both
orders (P(A) with the first response as A, and 1 - P(A) with it as B), which cancels position
bias: swapping the two responses gives exactly 1 - label.

A constitution is a text file with one principle per line (blank lines and '#' comments
skipped). The judge is any loaded chat checkpoint (the policy itself included).
"""

from __future__ import annotations

import numpy as np

from posttrain.chat import encode_prompt, encode_text, strip_structure
from train.loss import jitted_logprobs

ANSWERS = ("A", "B")

DEFAULT_CONSTITUTION = (
    "The final answer is correct.",
    "The reasoning is shown step by step before the answer.",
    "The answer is concise: no repeated or needless reasoning.",
    "The response follows the format: reasoning in <think> tags, then only the answer.",
)


def read_constitution(path: str) -> list[str]:
  """The principles of a constitution file; ValueError naming the file when it has none."""
  with open(path, encoding="utf-8") as f:
    principles = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
  if not principles:
    raise ValueError(f"{path}: the constitution has no principles (one per line; '#' comments "
                     "and blank lines are skipped)")
  return principles


def judge_question(principle: str, prompt: str, response_a: str, response_b: str) -> str:
  """The judge's user turn: the principle, the prompt and both responses, asking for A or B (kept
  short: a tiny judge's context is 128 tokens)."""
  return f"{principle}\n{prompt}\nA: {response_a}\nB: {response_b}\nA or B?"


def prefer_a(judge, tokenizer, questions: list[str], batch_size: int = 16) -> np.ndarray:
  """P(A) for each judge question: the two answers' probabilities as the judge's assistant turn,
  normalised over the pair [N] (float64)."""
  answers = [encode_text(tokenizer, a) for a in ANSWERS]
  rows = []
  for q in questions:
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": q}])
    rows += [(prompt + a, len(prompt)) for a in answers]
  limit = judge.cfg.max_seq_len
  if max(len(t) for t, _ in rows) > limit:
    raise ValueError(f"a judge question is longer than the judge's max_seq_len {limit} tokens: "
                     "sample shorter responses (--max_new_tokens)")
  width = -(-max(len(t) for t, _ in rows) // 32) * 32
  sums = []
  for start in range(0, len(rows), 2 * batch_size):
    chunk = rows[start:start + 2 * batch_size]
    tokens = np.zeros((2 * batch_size, width), np.int32)
    mask = np.zeros((2 * batch_size, width), np.float32)
    for i, (t, n) in enumerate(chunk):
      tokens[i, :len(t)], mask[i, n:len(t)] = t, 1
    sums.append(np.asarray(jitted_logprobs(judge, tokens, mask)[1])[:len(chunk)])
  logp = np.concatenate(sums).astype(np.float64).reshape(-1, 2)
  return 1.0 / (1.0 + np.exp(logp[:, 1] - logp[:, 0]))


def soft_labels(judge, tokenizer, prompts: list[str], first: list[str], second: list[str],
                principles: list[list[str]], batch_size: int = 16) -> np.ndarray:
  """The probability that `first[i]` is preferred over `second[i]`, averaged over both orders and
  over `principles[i]` (the principles drawn for pair i) [N]."""
  questions, owners = [], []
  for i, (p, a, b) in enumerate(zip(prompts, first, second)):
    for principle in principles[i]:
      questions += [judge_question(principle, p, strip_structure(a), strip_structure(b)),
                    judge_question(principle, p, strip_structure(b), strip_structure(a))]
      owners.append(i)
  pa = prefer_a(judge, tokenizer, questions, batch_size).reshape(-1, 2)
  per_principle = 0.5 * (pa[:, 0] + (1.0 - pa[:, 1]))
  owners = np.asarray(owners)
  return np.array([per_principle[owners == i].mean() for i in range(len(prompts))])


def read_prompts(spec: str, count: int, seed: int = 0) -> list[str]:
  """Prompts from a JSONL file ({"prompt": ...} per line) or, as `task:NAME`, the train
  problems of a built-in task family."""
  if spec.startswith("task:"):
    from posttrain.tasks import get_task
    return [p.prompt for p in get_task(spec[5:]).problems("train", count, seed)]
  from train.data import read_jsonl
  return [r["prompt"] for _, r in read_jsonl(spec, required=("prompt",))][:count]


def label_policy_samples(judge, judge_tokenizer, policy, tokenizer, prompts: list[str],
                         principles: list[str], per_pair: int, seed: int = 0,
                         temperature: float = 1.0, max_new_tokens: int = 64):
  """RL-CAI: two sampled responses per prompt from `policy`, labelled by `judge` under `per_pair`
  principles drawn per pair; Preference records (the judge's favourite as "chosen")."""
  import jax
  from model.sampling import SamplingConfig
  from posttrain import chat, rollout
  from posttrain.preferences import Preference
  pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
  sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens,
                            stop_tokens=chat.stop_tokens(tokenizer), pad_token=pad)
  ids = [chat.encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
  out = rollout.sample(policy, [i for i in ids for _ in range(2)], sampling, jax.random.key(seed),
                       batch_size=min(64, 2 * len(ids)))
  texts = [chat.turn_content(rollout.response_text(tokenizer, t, "chat")) for t in out.tokens]
  first, second = texts[0::2], texts[1::2]
  rng = np.random.default_rng([seed, 11])
  drawn = [list(rng.choice(principles, min(per_pair, len(principles)), replace=False))
           for _ in prompts]
  labels = soft_labels(judge, judge_tokenizer, prompts, first, second, drawn)
  pairs = []
  for p, a, b, label in zip(prompts, first, second, labels):
    chosen, rejected, label = (a, b, label) if label >= 0.5 else (b, a, 1.0 - label)
    pairs.append(Preference([{"role": "user", "content": p}],
                            [{"role": "assistant", "content": chosen}],
                            [{"role": "assistant", "content": rejected}], float(label)))
  return pairs


def main(argv):
  del argv
  from posttrain.preferences import write_preferences
  from posttrain.start import load_chat_model
  from train.metrics import quiet_logging
  quiet_logging()
  f = flags.FLAGS
  principles = read_constitution(f.constitution) if f.constitution else list(DEFAULT_CONSTITUTION)
  policy, tokenizer = load_chat_model(f.policy)
  judge, judge_tokenizer = ((policy, tokenizer) if f.judge == f.policy
                            else load_chat_model(f.judge))
  prompts = read_prompts(f.prompts, f.n, f.seed)
  pairs = label_policy_samples(judge, judge_tokenizer, policy, tokenizer, prompts, principles,
                               f.principles, f.seed, f.temperature, f.max_new_tokens)
  write_preferences(f.out, pairs)
  print(f"{len(pairs)} labelled pairs -> {f.out} (mean confidence "
        f"{np.mean([p.label for p in pairs]):.3f})", flush=True)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("judge", None, "The judge checkpoint (any chat workdir or HF dir).",
                      required=True)
  flags.DEFINE_string("policy", None, "The policy whose samples are labelled.", required=True)
  flags.DEFINE_string("prompts", None, "JSONL with a 'prompt' per line, or task:NAME.",
                      required=True)
  flags.DEFINE_string("out", None, "Where to write the preference JSONL.", required=True)
  flags.DEFINE_string("constitution", "", "Principles file; default: the built-in four.")
  flags.DEFINE_integer("principles", 2, "Principles sampled per pair.")
  flags.DEFINE_integer("n", 200, "Prompts to label.")
  flags.DEFINE_float("temperature", 1.0, "Policy sampling temperature.")
  flags.DEFINE_integer("max_new_tokens", 64, "Longest sampled response.")
  flags.DEFINE_integer("seed", 0, "Sampling and principle seed.")
  app.run(main)
