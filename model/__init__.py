"""DeepSeek-style model definitions: config, layers, RoPE, MLA, MoE, transformer, HF interop.

Shape convention: capital-letter einsum strings, used in every file of this package.

  B batch            T query positions     S key positions      D d_model
  N attention heads  H qk head dim         V value head dim     P rope dim
  R latent rank      F ffn width           E experts            K experts per token
  G expert groups    C capacity slots      L layers             Y vocabulary
  M grouped rows     X devices (expert parallelism)

Modules are Flax NNX modules used functionally: a forward pass never mutates state, and everything
it produces (logits, router statistics, balance losses) comes back in its return value.
"""
