"""Shared tiny configs for the tests, and one persistent JAX compilation cache per test session
(set before JAX is imported; subprocesses inherit it): the many tiny runs that compile the same
programs compile each once.

The tests also compile with XLA's CPU backend at optimisation level 0 (LLVM without its
optimisation passes; XLA's own graph passes, fusion included, still run): their tiny programs
run in milliseconds but took seconds to compile. On a fresh clone (`bash .ci/run`, 2 cores,
2026-12-07) the suite took 1356-1469 s before and 995 s after. Runs, benchmarks and the demo
keep XLA's default. Set XLA_FLAGS with your own --xla_backend_optimization_level to test at
another level.
"""

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="jax-test-cache-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import pytest  # pylint: disable=wrong-import-position

from model.config import ModelConfig  # pylint: disable=wrong-import-position


def small_config(**changes) -> ModelConfig:
  """A very small MoE + MLA config with group-limited top-2 of 8 experts and one MTP depth."""
  base = dict(vocab_size=61, d_model=32, num_layers=3, num_heads=2, q_lora_rank=16, kv_lora_rank=8,
              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, dense_ffn_dim=48, moe_ffn_dim=12,
              num_experts=8, num_shared_experts=1, experts_per_token=2, num_expert_groups=4,
              topk_groups=2, first_k_dense=1, mtp_depth=1, max_seq_len=64)
  base.update(changes)
  return ModelConfig(**base)


@pytest.fixture
def cfg():
  return small_config()


@pytest.fixture(scope="session")
def tiny_pretrain(tmp_path_factory):
  """A pre-training workdir of the default tiny model (vocabulary 320) after 3 steps: the start
  of the post-training end-to-end tests, trained once per session."""
  from configs.pretrain import get_config
  from train.loop import pretrain
  c = get_config()
  c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 3, 1, 3, 0
  c.optimizer.warmup_steps, c.peak_flops = 1, 1e11
  c.data.builtin_docs, c.data.batch_size, c.tokenizer.train_docs = 400, 2, 400
  c.model_overrides.vocab_size = 320
  workdir = str(tmp_path_factory.mktemp("tiny_pretrain"))
  pretrain(c, workdir)
  return workdir


@pytest.fixture(scope="session")
def chat_tok(tmp_path_factory):
  """A SentencePiece tokenizer (vocabulary 320) trained on the built-in corpus, extended with the
  chat special tokens: what RL and environment tests sample with."""
  from posttrain import chat
  from train import corpus
  from train.tokenizer import SentencePieceTokenizer, train_sentencepiece
  sp = train_sentencepiece([corpus.document(0, i) for i in range(300)], vocab_size=320)
  return SentencePieceTokenizer(chat.chat_tokenizer_file(sp, str(tmp_path_factory.mktemp("tok"))))
