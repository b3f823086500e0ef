"""`ModelConfig`: the shape of a DeepSeek-style model, its presets, validation and cost model."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import numpy as np

from kernels.attention import IMPLS as ATTENTION_IMPLS
from kernels.grouped_matmul import IMPLS as MOE_IMPLS
from model.expert_parallel import DISPATCHES as MOE_DISPATCHES

ATTENTION_TYPES = ("mla", "gqa")
SCORE_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
REMAT_POLICIES = ("none", "full", "dots_saveable")
LAYER_LOOPS = ("auto", "scan", "unroll")
UNROLL_UP_TO = 8  # layer_loop "auto" unrolls a stack of at most this many layers on CPU.
# Fields that choose how the model runs, not which weights it has: init_from may change all of
# them, a resumed run all but dtype (it changes the losses; train.loop keeps it in the run config).
EXECUTION_FIELDS = ("dtype", "remat_policy", "layer_loop", "attention_impl", "moe_impl",
                    "moe_dispatch")


@dataclasses.dataclass(frozen=True)
class YarnConfig:
  """YaRN context extension (https://arxiv.org/abs/2309.00071), DeepSeek's parameterisation."""

  factor: float = 40.0  # Context extension factor.
  original_max_len: int = 4096  # Context length the base model was trained on.
  beta_fast: float = 32.0  # Rotations above which frequencies are left as they are.
  beta_slow: float = 1.0  # Rotations below which frequencies are fully interpolated.
  mscale: float = 1.0  # Numerator of the cos/sin attention factor.
  mscale_all_dim: float = 1.0  # Softmax-scale correction; 0 disables it.

  def __post_init__(self):
    if self.factor < 1:
      raise ValueError(f"YarnConfig.factor must be >= 1, got {self.factor}")
    if self.original_max_len <= 0:
      raise ValueError(f"YarnConfig.original_max_len must be positive, got {self.original_max_len}")
    if self.beta_fast <= self.beta_slow:
      raise ValueError(
          f"YarnConfig.beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow})")


def _yarn_from_dict(fields: dict) -> dict:
  fields = dict(fields)
  if isinstance(fields.get("yarn"), dict):
    fields["yarn"] = YarnConfig(**fields["yarn"])
  return fields


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every shape and numeric choice of the model. Field names follow DeepSeek's where they exist."""

  vocab_size: int = 512
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  attention_type: str = "mla"  # "mla" (multi-head latent) or "gqa" (grouped-query baseline).
  # MLA.
  q_lora_rank: Optional[int] = 64  # None: a plain query projection.
  kv_lora_rank: int = 32
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 16
  v_head_dim: int = 32
  # GQA baseline (attention_type="gqa"): RoPE over the whole head.
  num_kv_heads: int = 4
  head_dim: int = 32
  # Feed-forward.
  dense_ffn_dim: int = 256  # Width of the dense SwiGLU layers.
  moe_ffn_dim: int = 64  # Width of each routed and shared expert.
  num_experts: int = 8  # Routed experts; 0 makes every layer dense.
  num_shared_experts: int = 1
  experts_per_token: int = 2
  num_expert_groups: int = 4
  topk_groups: int = 2  # Groups kept per token before the top-k.
  score_func: str = "sigmoid"
  topk_method: str = "noaux_tc"  # Group score: top-2 sum ("noaux_tc"), max ("group_limited_greedy").
  norm_topk_prob: bool = True  # Renormalise the chosen weights to sum to one.
  routed_scaling_factor: float = 1.0
  first_k_dense: int = 1  # The first k layers use the dense FFN.
  capacity_factor: Optional[float] = None  # None: dropless. Else slots = ceil(T*K/E * factor).
  # Positions.
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  yarn: Optional[YarnConfig] = None
  # Misc.
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  mtp_depth: int = 1  # Multi-token prediction modules.
  init_std: float = 0.02
  dtype: str = "float32"  # Compute dtype; parameters are always float32.
  remat_policy: str = "none"  # Per-block rematerialisation: none, full, or dots_saveable.
  # How a stack of layers runs: "scan" (jax.lax.scan: one compiled layer, residuals stacked),
  # "unroll" (a Python loop: each layer compiled, residuals apart), "auto" (unroll stacks of at
  # most UNROLL_UP_TO layers on CPU without remat, where stacking residuals costs 13-24% of a
  # step; else scan, whose memory stays bounded layer by layer under remat).
  layer_loop: str = "auto"
  # Kernels: "auto" takes the Pallas kernels on accelerators; on CPU the native C++ kernels where
  # they build (else the chunked attention and the blocked grouped matmul).
  attention_impl: str = "auto"  # kernels.attention: auto, xla, chunked, native, pallas, cudnn.
  moe_impl: str = "auto"  # kernels.grouped_matmul (dropless MoE): auto, xla, pallas, ragged,
                          # blocked, native.
  # Expert-parallel token exchange (model/expert_parallel.py): auto (ragged on TPU/GPU), all_to_all
  # (fixed buffers), ragged (ragged_all_to_all; emulated on CPU).
  moe_dispatch: str = "auto"

  def __post_init__(self):
    self._check_types()

    def positive(*names):
      for name in names:
        if getattr(self, name) <= 0:
          raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")

    positive("vocab_size", "d_model", "num_layers", "num_heads", "dense_ffn_dim", "max_seq_len",
             "rope_theta", "rms_norm_eps")
    if self.attention_type not in ATTENTION_TYPES:
      raise ValueError(f"ModelConfig.attention_type must be one of {ATTENTION_TYPES}, "
                       f"got {self.attention_type!r}")
    if self.attention_type == "mla":
      positive("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
      if self.q_lora_rank is not None:
        positive("q_lora_rank")
      if self.qk_rope_head_dim % 2:
        raise ValueError(f"ModelConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
    else:
      positive("num_kv_heads", "head_dim")
      if self.num_heads % self.num_kv_heads:
        raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be divisible by "
                         f"num_kv_heads ({self.num_kv_heads})")
      if self.head_dim % 2:
        raise ValueError(f"ModelConfig.head_dim must be even, got {self.head_dim}")
    if self.num_experts < 0:
      raise ValueError(f"ModelConfig.num_experts must be >= 0, got {self.num_experts}")
    if not 0 <= self.first_k_dense <= self.num_layers:
      raise ValueError(f"ModelConfig.first_k_dense must be in [0, num_layers={self.num_layers}], "
                       f"got {self.first_k_dense}")
    if self.mtp_depth < 0:
      raise ValueError(f"ModelConfig.mtp_depth must be >= 0, got {self.mtp_depth}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"ModelConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat_policy must be one of {REMAT_POLICIES}, "
                       f"got {self.remat_policy!r}")
    if self.layer_loop not in LAYER_LOOPS:
      raise ValueError(f"ModelConfig.layer_loop must be one of {LAYER_LOOPS}, "
                       f"got {self.layer_loop!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}")
    if self.moe_impl not in MOE_IMPLS:
      raise ValueError(f"ModelConfig.moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
    if self.moe_dispatch not in MOE_DISPATCHES:
      raise ValueError(f"ModelConfig.moe_dispatch must be one of {MOE_DISPATCHES}, "
                       f"got {self.moe_dispatch!r}")
    if self.num_experts:
      self._validate_routing()

  def _check_types(self):
    """TypeError naming the field whose value is not of its type: an int field takes integers
    (Python or NumPy, not bools), a float field any real number, a str or bool field just that;
    q_lora_rank and capacity_factor may be None, yarn None or a YarnConfig."""
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name == "yarn":
        expected, ok = YarnConfig, value is None or isinstance(value, YarnConfig)
      elif value is None and f.name in ("q_lora_rank", "capacity_factor"):
        continue
      else:
        expected = {"q_lora_rank": int, "capacity_factor": float}.get(f.name, type(f.default))
        number = {int: numbers.Integral, float: numbers.Real}.get(expected)
        if number is not None:
          ok = isinstance(value, number) and not isinstance(value, (bool, np.bool_))
        else:
          ok = isinstance(value, expected)
      if not ok:
        raise TypeError(f"ModelConfig.{f.name} must be {expected.__name__}, got "
                        f"{type(value).__name__} {value!r}")

  def _validate_routing(self):
    positive_fields = ("moe_ffn_dim", "experts_per_token", "num_expert_groups", "topk_groups")
    for name in positive_fields:
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_shared_experts < 0:
      raise ValueError(f"ModelConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}")
    if self.score_func not in SCORE_FUNCS:
      raise ValueError(f"ModelConfig.score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
    if self.topk_method not in TOPK_METHODS:
      raise ValueError(f"ModelConfig.topk_method must be one of {TOPK_METHODS}, "
                       f"got {self.topk_method!r}")
    if self.experts_per_token > self.num_experts:
      raise ValueError(f"ModelConfig.experts_per_token ({self.experts_per_token}) must not exceed "
                       f"num_experts ({self.num_experts})")
    if self.num_experts % self.num_expert_groups:
      raise ValueError(f"ModelConfig.num_experts ({self.num_experts}) must be divisible by "
                       f"num_expert_groups ({self.num_expert_groups})")
    if self.topk_groups > self.num_expert_groups:
      raise ValueError(f"ModelConfig.topk_groups ({self.topk_groups}) must not exceed "
                       f"num_expert_groups ({self.num_expert_groups})")
    per_group = self.num_experts // self.num_expert_groups
    if self.grouped_routing and self.topk_groups * per_group < self.experts_per_token:
      raise ValueError(f"ModelConfig.experts_per_token ({self.experts_per_token}) exceeds the "
                       f"{self.topk_groups} kept groups x {per_group} experts each")
    if self.grouped_routing and self.topk_method == "noaux_tc" and per_group < 2:
      raise ValueError("ModelConfig.num_expert_groups: noaux_tc scores a group by its top-2 experts, "
                       f"so each group needs at least 2 experts (got {per_group})")
    if self.capacity_factor is not None and self.capacity_factor <= 0:
      raise ValueError(f"ModelConfig.capacity_factor must be positive or None, "
                       f"got {self.capacity_factor}")

  # Derived shapes.

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def grouped_routing(self) -> bool:
    return self.topk_method != "greedy" and self.num_expert_groups > 1

  @property
  def num_dense_layers(self) -> int:
    return self.num_layers if self.num_experts == 0 else self.first_k_dense

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - self.num_dense_layers

  @property
  def rope_dim(self) -> int:
    return self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim

  @property
  def softmax_scale(self) -> float:
    """`qk_head_dim ** -0.5`, times mscale**2 when YaRN extends the context."""
    head = self.qk_head_dim if self.attention_type == "mla" else self.head_dim
    scale = head**-0.5
    if self.yarn is not None and self.yarn.mscale_all_dim:
      m = yarn_mscale(self.yarn.factor, self.yarn.mscale_all_dim)
      scale *= m * m
    return scale

  @classmethod
  def from_dict(cls, fields: dict) -> "ModelConfig":
    """A config from plain values (run_config.json): a `yarn` dict becomes a YarnConfig."""
    return cls(**_yarn_from_dict(fields))

  def replace(self, **changes) -> "ModelConfig":
    """A copy with `changes`; a `yarn` given as a plain dict (a ConfigDict override) is converted."""
    return dataclasses.replace(self, **_yarn_from_dict(changes))

  def same_weights_as(self, other: "ModelConfig") -> bool:
    """Equal up to EXECUTION_FIELDS: one model's weights fit the other."""
    return self.replace(**{f: getattr(other, f) for f in EXECUTION_FIELDS}) == other

  # Cost model.

  def param_counts(self) -> dict:
    """Parameter counts {total, activated, embedding, mtp} from the shape fields (closed form;
    model.params.count_params counts the built model's shapes, and the tests hold them equal).
    Total and activated exclude the MTP modules; activated counts what one token uses:
    everything but the routed experts it is not sent to."""
    d, n = self.d_model, self.num_heads
    if self.attention_type == "mla":
      query = (d * n * self.qk_head_dim if self.q_lora_rank is None else
               d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * n * self.qk_head_dim)
      attention = (query + d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                   + self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim)
                   + n * self.v_head_dim * d)
    else:
      attention = 2 * d * n * self.head_dim + 2 * d * self.num_kv_heads * self.head_dim
    norms = 2 * d
    dense_block = norms + attention + 3 * d * self.dense_ffn_dim
    routed = 3 * self.num_experts * d * self.moe_ffn_dim
    moe_rest = (norms + attention + d * self.num_experts
                + 3 * d * self.moe_ffn_dim * self.num_shared_experts)
    embedding = self.vocab_size * d
    total = (embedding + (0 if self.tie_embeddings else d * self.vocab_size) + d
             + self.num_dense_layers * dense_block + self.num_moe_layers * (moe_rest + routed))
    active = self.experts_per_token / self.num_experts if self.num_experts else 1.0
    activated = total - self.num_moe_layers * routed * (1.0 - active)
    mtp_block = moe_rest + routed if self.num_experts else dense_block
    mtp = self.mtp_depth * (3 * d + 2 * d * d + mtp_block)
    return dict(total=total, activated=int(round(activated)), embedding=embedding, mtp=mtp)

  def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward): 6 x matmul params + attention scores/values."""
    counts = self.param_counts()
    matmul_params = counts["activated"] - counts["embedding"]
    qk = self.qk_head_dim if self.attention_type == "mla" else self.head_dim
    v = self.v_head_dim if self.attention_type == "mla" else self.head_dim
    context = seq_len / 2 if causal else seq_len
    attention = 2 * self.num_heads * (qk + v) * context * self.num_layers
    return 6.0 * matmul_params + 3.0 * attention


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """DeepSeek's YaRN magnitude correction: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


PRESETS = {
    "tiny": ModelConfig(),
    "deepseek_v2_lite": ModelConfig(
        vocab_size=102400, d_model=2048, num_layers=27, num_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        dense_ffn_dim=10944, moe_ffn_dim=1408, num_experts=64, num_shared_experts=2,
        experts_per_token=6, num_expert_groups=1, topk_groups=1, score_func="softmax",
        topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense=1,
        max_seq_len=163840, yarn=YarnConfig(factor=40, original_max_len=4096, beta_fast=32,
                                            beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        mtp_depth=0),
    "moonlight_16b_a3b": ModelConfig(
        vocab_size=163840, d_model=2048, num_layers=27, num_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        dense_ffn_dim=11264, moe_ffn_dim=1408, num_experts=64, num_shared_experts=2,
        experts_per_token=6, num_expert_groups=1, topk_groups=1, score_func="sigmoid",
        topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.446, first_k_dense=1,
        max_seq_len=8192, rope_theta=50000.0, rms_norm_eps=1e-5, mtp_depth=0),
    "deepseek_v3_671b": ModelConfig(
        vocab_size=129280, d_model=7168, num_layers=61, num_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        dense_ffn_dim=18432, moe_ffn_dim=2048, num_experts=256, num_shared_experts=1,
        experts_per_token=8, num_expert_groups=8, topk_groups=4, score_func="sigmoid",
        topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense=3,
        max_seq_len=163840, yarn=YarnConfig(factor=40, original_max_len=4096, beta_fast=32,
                                            beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        mtp_depth=1),
}


def get_preset(name: str) -> ModelConfig:
  """The named preset; the error lists the known names."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name]
