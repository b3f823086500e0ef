"""Pre-training on the built-in corpus with the tiny model: the no-flag default of train.pretrain.

  python -m train.pretrain --config=configs/pretrain.py --workdir=/tmp/run --config.total_steps=50

`--config=configs/pretrain.py:deepseek_v3` is DeepSeek-V3 671B on a TPU v5p-1024 mesh (README,
"Parallelism"); point `data` and `tokenizer` at real files.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0  # Model initialisation.
  c.model = ml_collections.ConfigDict(dict(preset="tiny"))
  # ModelConfig fields over the preset; the execution fields are listed so flags can set them.
  c.model_overrides = ml_collections.ConfigDict(dict(
      vocab_size=512, max_seq_len=128, dtype="float32", remat_policy="none", layer_loop="auto",
      attention_impl="auto", moe_impl="auto", moe_dispatch="auto"))
  c.init_from = ""  # A workdir checkpoint dir or HF directory: its weights, a fresh optimizer.
  c.data = ml_collections.ConfigDict(dict(
      source="builtin", paths="", jsonl_field="text", builtin_docs=20000, seq_len=128, batch_size=8,
      seed=0, eval_fraction=0.02, add_bos=True, add_eos=True))
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="train_sentencepiece",  # Or "sentencepiece" / "hf_json" with `path`.
      path="", train_docs=4000, bos_token="", eos_token=""))
  c.optimizer = common.optimizer()
  c.step = common.step(mtp_switch_step=1600)  # V3: 0.3, then 0.1 for the last fifth.
  c.mesh = common.mesh()
  common.add_loop(c, total_steps=2000, checkpoint_every=500, eval_every=500)
  if arg == "deepseek_v3":
    c.model.preset = "deepseek_v3_671b"
    c.model_overrides.update(vocab_size=129280, max_seq_len=4096, dtype="bfloat16",
                             remat_policy="full", capacity_factor=1.25)
    c.data.update(source="jsonl", seq_len=4096, batch_size=1024)
    c.tokenizer.kind = "hf_json"
    c.step.microbatches = 8
    c.mesh.update(data=1, fsdp=4, expert=32, tensor=4)
  elif arg:
    raise ValueError(f"configs/pretrain.py: unknown variant {arg!r}; known: deepseek_v3")
  return c
