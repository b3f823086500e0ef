"""`python -m train.generate` on a workdir checkpoint streams the greedy continuation."""

import dataclasses
import os
import subprocess
import sys

import jax

from model.generate import generate, pad_prompts
from model.sampling import SamplingConfig
from model.transformer import init_model
from tests.conftest import small_config
from train import optimizer as opt
from train.checkpoint import Checkpointer, check_run_config, load_model
from train.corpus import BuiltinCorpus
from train.step import create_train_state
from train.tokenizer import load_tokenizer, train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workdir(path, cfg):
  """A workdir as train.pretrain leaves it: run_config.json, tokenizer.model, one checkpoint."""
  corpus = BuiltinCorpus(seed=0, num_docs=300)
  tokenizer = train_sentencepiece((corpus[i] for i in range(300)), cfg.vocab_size)
  with open(os.path.join(path, "tokenizer.model"), "wb") as f:
    f.write(tokenizer.model_proto)
  check_run_config(path, dict(model=dataclasses.asdict(cfg), tokenizer=dict(
      kind="train_sentencepiece", path="", bos_token="", eos_token="")))
  tx = opt.make_optimizer(opt.OptimizerConfig(total_steps=2, warmup_steps=0))
  _, state = create_train_state(init_model(cfg, seed=4), tx)
  ckpt = Checkpointer(path, every=1, keep=1)
  ckpt.save(1, state, {})
  ckpt.wait()
  ckpt.close()


def test_cli_streams_the_greedy_continuation(tmp_path):
  cfg = small_config(vocab_size=320, mtp_depth=0)
  _workdir(str(tmp_path), cfg)
  prompt, n = "12 + 7 =", 12
  result = subprocess.run(
      [sys.executable, "-m", "train.generate", f"--checkpoint={tmp_path}", f"--prompt={prompt}",
       f"--max_new_tokens={n}"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
      capture_output=True, timeout=300, check=True)  # Bytes: keep '\r' as written.
  model, tokenizer = load_model(str(tmp_path)), load_tokenizer(str(tmp_path))
  tokens, lengths = pad_prompts([[tokenizer.bos_id] + tokenizer.encode(prompt)])
  out = generate(model, tokens, lengths, jax.random.key(0),
                 SamplingConfig(max_new_tokens=n, stop_tokens=(tokenizer.eos_id,)))
  ids = [t for t in out.tokens[0, :int(out.lengths[0])].tolist() if t != tokenizer.eos_id]
  assert result.stdout.decode("utf-8") == prompt + tokenizer.decode(ids) + "\n"
