"""AI feedback (RL-CAI): a judge model, not a person, labels which of two responses better follows
a constitution's principles; the soft labels feed the reward-model and DPO paths unchanged.

  python -m posttrain.ai_feedback --judge=CKPT --policy=CKPT --prompts=FILE --out=prefs.jsonl \
      [--constitution=FILE] [--principles=2]   # --prompts=task:arithmetic for built-in prompts
  python -m posttrain.ai_feedback --mode=sl_cai --policy=CKPT --prompts=FILE --out=sft.jsonl \
      [--rounds=2] [--max_seq_len=384]   # a tiny model's 128 tokens hold no round

For each prompt the policy samples two responses. The judge sees one principle, the prompt and
both responses as (A) and (B), and its preference is the normalised probability of the two
answers: P(A) = p("A") / (p("A") + p("B")), each the judge's probability of that whole answer as
its assistant turn. The label is the mean over `principles` sampled principles and over both
orders (P(A) with the first response as A, and 1 - P(A) with it as B), which cancels position
bias: swapping the two responses gives exactly 1 - label.

SL-CAI (`--mode=sl_cai`, `critique_revise`): the policy answers, then critiques and rewrites its
own answer under sampled principles for a few rounds; the last rewrites are SFT data.

A constitution is a text file with one principle per line (blank lines and '#' comments
skipped). The judge is any loaded chat checkpoint (the policy itself included); the built-in one
is trained by posttrain/judge.py.
"""

from __future__ import annotations

import numpy as np

from posttrain.chat import encode_prompt, encode_text, strip_structure
from posttrain.data import bucket_width
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


def both_orders(principle: str, prompt: str, first: str, second: str) -> tuple[str, str]:
  """The judge question about two responses with `first` as A, then with `first` as B (the
  responses' structural tokens stripped, so they can stand inside a message)."""
  a, b = strip_structure(first), strip_structure(second)
  return judge_question(principle, prompt, a, b), judge_question(principle, prompt, b, a)


def judge_fits(judge, tokenizer, question: str) -> bool:
  """Whether `question` and the longer of the two answers fit the judge's context."""
  answer = max(len(encode_text(tokenizer, a)) for a in ANSWERS)
  prompt = encode_prompt(tokenizer, [{"role": "user", "content": question}])
  return len(prompt) + answer <= judge.cfg.max_seq_len


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
                     "sample shorter responses (--max_new_tokens) or extend the context "
                     "(--max_seq_len)")
  width = bucket_width([len(t) for t, _ in rows], limit)
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
      questions += both_orders(principle, p, a, b)
      owners.append(i)
  pa = prefer_a(judge, tokenizer, questions, batch_size).reshape(-1, 2)
  per_principle = 0.5 * (pa[:, 0] + (1.0 - pa[:, 1]))
  owners = np.asarray(owners)
  return np.array([per_principle[owners == i].mean() for i in range(len(prompts))])


def read_prompts(spec: str, count: int, seed: int = 0) -> list[str]:
  """Prompts from a JSONL file ({"prompt": ...} per line; the first `count`) or, as
  `task:NAME[,NAME...]`, `count` train problems of each built-in task family."""
  if spec.startswith("task:"):
    from posttrain.tasks import get_task, task_names
    return [p.prompt for name in task_names(spec[5:])
            for p in get_task(name).problems("train", count, seed)]
  from train.data import read_jsonl
  return [r["prompt"] for _, r in read_jsonl(spec, required=("prompt",))][:count]


def sample_turns(model, tokenizer, conversations: list[list[dict]], seed: int = 0,
                 temperature: float = 1.0, max_new_tokens: int = 64,
                 batch_size: int | None = None) -> list[str]:
  """The next assistant turn of each conversation, sampled from `model` on the rollout path
  (temperature 0: greedy), as message contents, in batches of `batch_size` rows (default: all of
  them, at most 64)."""
  import jax
  from model.sampling import SamplingConfig
  from posttrain import chat, rollout
  pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
  sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens,
                            stop_tokens=chat.stop_tokens(tokenizer), pad_token=pad)
  ids = [chat.encode_prompt(tokenizer, c) for c in conversations]
  out = rollout.sample(model, ids, sampling, jax.random.key(seed),
                       batch_size=batch_size or min(64, len(ids)),
                       width=bucket_width([len(i) for i in ids],
                                          model.cfg.max_seq_len - max_new_tokens))
  return [chat.turn_content(rollout.response_text(tokenizer, t, "chat")) for t in out.tokens]


def sample_pairs(policy, tokenizer, prompts: list[str], seed: int = 0, temperature: float = 1.0,
                 max_new_tokens: int = 64) -> tuple[list[str], list[str]]:
  """Two responses per user prompt sampled from `policy`: (first, second), one of each per
  prompt."""
  texts = sample_turns(policy, tokenizer, [[{"role": "user", "content": p}] for p in prompts
                                           for _ in range(2)], seed, temperature, max_new_tokens)
  return texts[0::2], texts[1::2]


def label_policy_samples(judge, judge_tokenizer, policy, tokenizer, prompts: list[str],
                         principles: list[str], per_pair: int, seed: int = 0,
                         temperature: float = 1.0, max_new_tokens: int = 64):
  """RL-CAI: two sampled responses per prompt from `policy`, labelled by `judge` under `per_pair`
  principles drawn per pair; Preference records (the judge's favourite as "chosen"). A prompt
  whose two samples are the same text makes no pair (its label would be exactly 0.5)."""
  from posttrain.preferences import Preference
  first, second = sample_pairs(policy, tokenizer, prompts, seed, temperature, max_new_tokens)
  distinct = [i for i, (a, b) in enumerate(zip(first, second)) if a != b]
  prompts, first, second = ([x[i] for i in distinct] for x in (prompts, first, second))
  if not prompts:
    return []
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


CRITIQUE_REQUEST = "Critique: where does your last response fail this principle? {principle}"
REVISION_REQUEST = "Rewrite your response so that it follows the principle: {principle}"


def critique_revise(model, tokenizer, prompts: list[str], principles: list[str], rounds: int,
                    seed: int = 0, temperature: float = 1.0,
                    max_new_tokens: int = 64) -> list[dict]:
  """SL-CAI: `model` answers each prompt, then for `rounds` rounds, under a principle drawn per
  prompt and round, critiques its current response (CRITIQUE_REQUEST as the next user turn) and
  rewrites it (REVISION_REQUEST); the rewrite becomes the current response. Each round sees only
  the prompt, the current response and that round's critique. A round whose conversation would not
  fit the model's context (with `max_new_tokens` to generate) is not run for that prompt; an empty
  rewrite is recorded but keeps the current response.

  Returns SFT records {"prompt", "completion" (the last revision), "initial", "rounds": [{
  "principle", "critique", "revision"}]}; posttrain.sft reads them as {"prompt", "completion"}."""
  rng = np.random.default_rng([seed, 17])
  rows = min(64, len(prompts))  # One batch size for every round: shared compiled shapes.
  first = sample_turns(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                       seed, temperature, max_new_tokens, rows)
  records = [dict(prompt=p, completion=r, initial=r, rounds=[]) for p, r in zip(prompts, first)]
  limit = model.cfg.max_seq_len - max_new_tokens
  fits = lambda conversation: len(encode_prompt(tokenizer, conversation)) <= limit
  for r in range(rounds):
    drawn = [str(rng.choice(principles)) for _ in prompts]
    asks = [[{"role": "user", "content": rec["prompt"]},
             {"role": "assistant", "content": rec["completion"]},
             {"role": "user", "content": CRITIQUE_REQUEST.format(principle=drawn[i])}]
            for i, rec in enumerate(records)]
    critiqued = [i for i, a in enumerate(asks) if fits(a)]  # Prompt indices.
    if not critiqued:
      break
    critiques = sample_turns(model, tokenizer, [asks[i] for i in critiqued],
                             seed + 1000 * (2 * r + 1), temperature, max_new_tokens, rows)
    revise = [asks[i] + [{"role": "assistant", "content": c},
                         {"role": "user", "content": REVISION_REQUEST.format(principle=drawn[i])}]
              for i, c in zip(critiqued, critiques)]
    revised = [j for j, a in enumerate(revise) if fits(a)]  # Indices into `critiqued`.
    revisions = sample_turns(model, tokenizer, [revise[j] for j in revised],
                             seed + 1000 * (2 * r + 2), temperature, max_new_tokens,
                             rows) if revised else []
    for j, text in zip(revised, revisions):
      record = records[critiqued[j]]
      record["rounds"].append(dict(principle=drawn[critiqued[j]], critique=critiques[j],
                                   revision=text))
      if text.strip():  # An empty rewrite keeps the current response.
        record["completion"] = text
  return records


def main(argv):
  del argv
  import json
  from posttrain.preferences import write_preferences
  from posttrain.start import load_chat_model
  from train.checkpoint import write_atomically
  from train.metrics import quiet_logging
  quiet_logging()
  f = flags.FLAGS
  principles = read_constitution(f.constitution) if f.constitution else list(DEFAULT_CONSTITUTION)
  context = dict(max_seq_len=f.max_seq_len)  # 0: each checkpoint's own.
  policy, tokenizer = load_chat_model(f.policy, execution=context)
  prompts = read_prompts(f.prompts, f.n, f.seed)
  if f.mode == "sl_cai":
    records = critique_revise(policy, tokenizer, prompts, principles, f.rounds, f.seed,
                              f.temperature, f.max_new_tokens)
    revised = [r for r in records if any(x["revision"].strip() for x in r["rounds"])]
    if not revised:
      raise ValueError(f"no response was revised: a critique-and-revise conversation does not fit "
                       f"the context ({policy.cfg.max_seq_len} tokens with {f.max_new_tokens} to "
                       "generate); raise --max_seq_len")
    write_atomically(f.out, "".join(json.dumps(r) + "\n" for r in revised))
    print(f"{len(revised)} revised SFT records of {len(records)} prompts (the rest did not fit "
          f"the context or were never rewritten) -> {f.out}", flush=True)
    return
  if not f.judge:
    raise app.UsageError("--mode=rl_cai needs --judge")
  judge, judge_tokenizer = ((policy, tokenizer) if f.judge == f.policy
                            else load_chat_model(f.judge, execution=context))
  pairs = label_policy_samples(judge, judge_tokenizer, policy, tokenizer, prompts, principles,
                               f.principles, f.seed, f.temperature, f.max_new_tokens)
  if not pairs:
    raise ValueError("every prompt sampled the same response twice: nothing to label (raise "
                     "--temperature)")
  write_preferences(f.out, pairs)
  print(f"{len(pairs)} labelled pairs of {len(prompts)} prompts (the rest sampled the same response "
        f"twice) -> {f.out} (mean confidence "
        f"{np.mean([p.label for p in pairs]):.3f})", flush=True)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_enum("mode", "rl_cai", ["rl_cai", "sl_cai"], "rl_cai: judge-labelled preference "
                    "pairs; sl_cai: critique-and-revise SFT records.")
  flags.DEFINE_string("judge", "", "rl_cai: the judge checkpoint (any chat workdir or HF dir).")
  flags.DEFINE_string("policy", None, "The policy that samples (and, for sl_cai, critiques and "
                      "revises).", required=True)
  flags.DEFINE_string("prompts", None, "JSONL with a 'prompt' per line, or task:NAME[,NAME].",
                      required=True)
  flags.DEFINE_string("out", None, "Where to write the preference (rl_cai) or SFT (sl_cai) JSONL.",
                      required=True)
  flags.DEFINE_string("constitution", "", "Principles file; default: the built-in four.")
  flags.DEFINE_integer("principles", 2, "rl_cai: principles sampled per pair.")
  flags.DEFINE_integer("rounds", 2, "sl_cai: critique-and-revise rounds per prompt.")
  flags.DEFINE_integer("n", 200, "Prompts to use (per family with task:).")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
  flags.DEFINE_integer("max_new_tokens", 64, "Longest sampled turn.")
  flags.DEFINE_integer("seed", 0, "Sampling and principle seed.")
  flags.DEFINE_integer("max_seq_len", 0, "Context length to run the models at (no weight depends "
                       "on it; positions past the trained length are untrained); 0: their own.")
  app.run(main)
