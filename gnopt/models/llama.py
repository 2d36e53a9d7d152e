"""LLaMA-style decoder-only transformer (Touvron et al. 2023), in equinox.

Pre-norm blocks ``h += attn(RMSNorm(h)); h += mlp(RMSNorm(h))``, causal
multi-head attention with rotary position embeddings (Su et al. 2021), no
biases, a final RMSNorm and an untied LM head. Attention is plain einsum +
masked softmax, so the model is differentiable in forward mode (``jax.jvp``,
``jax.linearize``), which the Gauss-Newton products need.

Two knobs follow the public code of Abreu et al. (2025), which the presets
``"45m"`` and ``"150m"`` reproduce: ``mlp="gelu"`` (a two-matrix GELU MLP, where
LLaMA has SwiGLU) and ``qk_norm=True`` (LayerNorm on queries and keys over
``d_model``, before the split into heads).

References:
  Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", 2023.
  Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021.
  Abreu, Vyas, Kakade, Morwani, "The Potential of Second-Order Optimization for
  LLMs: A Study with Full Gauss-Newton", 2025 (github.com/natalieabreu/full-gauss-newton).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from gnopt.models.layers import Array, Embedding, LayerNorm, Linear, RMSNorm, Tap

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_INITS = ("default", "paper")
_MLPS = ("swiglu", "gelu")


@dataclasses.dataclass(frozen=True)
class LLaMAConfig:
    """Static description of a :class:`LLaMA`.

    Attributes:
      vocab_size, d_model, n_layers, n_heads, d_ff, seq_len: sizes; ``d_ff`` is
        the hidden width of the MLP; ``seq_len`` the longest input accepted.
      norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base; pair ``i`` of a head turns at ``θ^(−2i/d_head)``.
      compute_dtype: ``"float32"`` or ``"bfloat16"``: activations and matmuls
        (parameters stay float32, softmax and norms run in float32, logits are
        returned in float32).
      init: ``"default"``: every matrix ``N(0, 1/fan_in)``, embedding ``N(0, 1)``;
        ``"paper"``: the reference code's ``N(0, (0.02/√fan_in)²)`` for every
        matrix and ``N(0, 0.02²)`` for the embedding.
      mlp: ``"swiglu"``: ``down(silu(gate x) ⊙ up x)``; ``"gelu"``: ``down(gelu(up x))``.
      qk_norm: LayerNorm on queries and keys (reference code of Abreu et al.).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    seq_len: int
    norm_eps: float = 1e-6
    rope_theta: float = 1e4
    compute_dtype: str = "float32"
    init: str = "default"
    mlp: str = "swiglu"
    qk_norm: bool = False

    def __post_init__(self):
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LLaMAConfig.{key} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"LLaMAConfig.d_model={self.d_model} must split into n_heads={self.n_heads} "
                "heads of even size (RoPE turns pairs of coordinates)")
        for key, allowed in (("compute_dtype", tuple(_DTYPES)), ("init", _INITS), ("mlp", _MLPS)):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"LLaMAConfig.{key}={getattr(self, key)!r}; expected one of {allowed}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def linear_std(self, fan_in: int) -> float:
        """Initial standard deviation of a matrix with ``fan_in`` inputs."""
        return (0.02 if self.init == "paper" else 1.0) / math.sqrt(fan_in)


_PAPER = dict(vocab_size=32000, seq_len=1024, mlp="gelu", qk_norm=True, init="paper")
PRESETS: dict[str, LLaMAConfig] = {
    "tiny": LLaMAConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=256,
                        seq_len=128, mlp="gelu", qk_norm=True, init="paper"),
    "45m": LLaMAConfig(d_model=512, n_layers=4, n_heads=8, d_ff=2048, **_PAPER),
    "150m": LLaMAConfig(d_model=768, n_layers=12, n_heads=16, d_ff=3072, **_PAPER),
}
"""Named configurations. ``"45m"`` and ``"150m"`` are the models of Abreu et al.
(2025) as in their code (GELU MLP, QK-LayerNorm, their init); ``"tiny"`` is the
same family at byte-level vocabulary, small enough to train on a laptop CPU."""


def llama_config(name: str, **overrides) -> LLaMAConfig:
    """Returns the preset ``name`` (see :data:`PRESETS`) with ``overrides`` applied.

    Example: ``llama_config("45m", compute_dtype="bfloat16", mlp="swiglu")``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown LLaMA config {name!r}; known names: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(LLaMAConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown LLaMAConfig field(s) {unknown}; fields are {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def apply_rope(x: Array, theta: float, positions: Array | None = None) -> Array:
    """Rotary position embedding of ``x [..., T, heads, d_head]``.

    Coordinate pair ``(x_{2i}, x_{2i+1})`` at position ``m`` is turned by the
    angle ``m · θ^(−2i/d_head)``, so ``⟨rope(q)_m, rope(k)_n⟩`` depends on
    ``q``, ``k`` and ``m − n`` only (Su et al. 2021). Computed in float32.

    Args:
      x: array whose axis ``-3`` is the position axis.
      theta: the RoPE base.
      positions: ``[T]`` positions, ``arange(T)`` by default.
    """
    length, dim = x.shape[-3], x.shape[-1]
    if positions is None:
        positions = jnp.arange(length)
    wide = jnp.promote_types(x.dtype, jnp.float32)
    freqs = theta ** (-jnp.arange(0, dim, 2, dtype=wide) / dim)
    angles = positions.astype(wide)[:, None, None] * freqs  # [T, 1, d/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(wide).reshape(*x.shape[:-1], dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    turned = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return turned.reshape(x.shape).astype(x.dtype)


class Attention(eqx.Module):
    """Causal multi-head self-attention with RoPE.

    ``softmax(q kᵀ/√d_head + causal mask) v``, softmax in float32; projections
    ``wq, wk, wv, wo`` are tappable :class:`Linear` layers.
    """

    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    q_norm: Optional[LayerNorm]
    k_norm: Optional[LayerNorm]
    n_heads: int = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True)

    def __init__(self, config: LLaMAConfig, *, key: Array, name: str):
        d = config.d_model
        kq, kk, kv, ko = jax.random.split(key, 4)
        std = config.linear_std(d)
        self.wq = Linear(d, d, key=kq, name=f"{name}.wq", init_std=std)
        self.wk = Linear(d, d, key=kk, name=f"{name}.wk", init_std=std)
        self.wv = Linear(d, d, key=kv, name=f"{name}.wv", init_std=std)
        self.wo = Linear(d, d, key=ko, name=f"{name}.wo", init_std=std)
        self.q_norm = LayerNorm(d) if config.qk_norm else None
        self.k_norm = LayerNorm(d) if config.qk_norm else None
        self.n_heads = config.n_heads
        self.rope_theta = config.rope_theta

    def __call__(self, x: Array, tap: Tap | None = None) -> Array:
        batch, length, d = x.shape
        q, k, v = self.wq(x, tap), self.wk(x, tap), self.wv(x, tap)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        heads = lambda t: t.reshape(batch, length, self.n_heads, d // self.n_heads)
        q, k, v = apply_rope(heads(q), self.rope_theta), apply_rope(heads(k), self.rope_theta), heads(v)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, scores / math.sqrt(d // self.n_heads), -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, d)
        return self.wo(out, tap)


class FeedForward(eqx.Module):
    """Position-wise MLP: ``down(silu(gate x) ⊙ up x)`` (SwiGLU, Shazeer 2020) or
    ``down(gelu(up x))`` when ``gate`` is ``None``."""

    gate: Optional[Linear]
    up: Linear
    down: Linear

    def __init__(self, config: LLaMAConfig, *, key: Array, name: str):
        d, h = config.d_model, config.d_ff
        kg, ku, kd = jax.random.split(key, 3)
        std = config.linear_std(d)
        self.gate = (Linear(d, h, key=kg, name=f"{name}.gate", init_std=std)
                     if config.mlp == "swiglu" else None)
        self.up = Linear(d, h, key=ku, name=f"{name}.up", init_std=std)
        self.down = Linear(h, d, key=kd, name=f"{name}.down", init_std=config.linear_std(h))

    def __call__(self, x: Array, tap: Tap | None = None) -> Array:
        hidden = self.up(x, tap)
        if self.gate is None:
            hidden = jax.nn.gelu(hidden)
        else:
            hidden = jax.nn.silu(self.gate(x, tap)) * hidden
        return self.down(hidden, tap)


class TransformerBlock(eqx.Module):
    """Pre-norm block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``."""

    attn_norm: RMSNorm
    attn: Attention
    mlp_norm: RMSNorm
    mlp: FeedForward

    def __init__(self, config: LLaMAConfig, *, key: Array, name: str):
        ka, km = jax.random.split(key)
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, key=ka, name=f"{name}.attn")
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = FeedForward(config, key=km, name=f"{name}.mlp")

    def __call__(self, h: Array, tap: Tap | None = None) -> Array:
        h = h + self.attn(self.attn_norm(h), tap)
        return h + self.mlp(self.mlp_norm(h), tap)


class LLaMA(eqx.Module):
    """Decoder-only language model: ``tokens [B, T] int → logits [B, T, V] float32``.

    Top-level fields are the natural layerwise blocks of the Gauss-Newton paper:
    ``embed``, each element of ``layers``, ``norm``, ``head``. Dense layers are
    named ``"layers.{i}.attn.{wq,wk,wv,wo}"``, ``"layers.{i}.mlp.{gate,up,down}"``
    and ``"head"``.
    """

    embed: Embedding
    layers: tuple[TransformerBlock, ...]
    norm: RMSNorm
    head: Linear
    config: LLaMAConfig = eqx.field(static=True)

    def __init__(self, config: LLaMAConfig, *, key: Array):
        ke, kh, *kl = jax.random.split(key, config.n_layers + 2)
        self.embed = Embedding(config.vocab_size, config.d_model, key=ke,
                               init_std=0.02 if config.init == "paper" else 1.0)
        self.layers = tuple(TransformerBlock(config, key=k, name=f"layers.{i}")
                            for i, k in enumerate(kl))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = Linear(config.d_model, config.vocab_size, key=kh, name="head",
                           init_std=config.linear_std(config.d_model))
        self.config = config

    def __call__(self, tokens: Array, tap: Tap | None = None) -> Array:
        """Logits of the next token at every position.

        Args:
          tokens: ``[B, T]`` integer tokens, ``T ≤ config.seq_len``.
          tap: optional hook given to every :class:`Linear` (see :data:`Tap`).
        """
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"LLaMA expects integer tokens [batch, time], got "
                             f"shape {tokens.shape} dtype {tokens.dtype}")
        if tokens.shape[1] > self.config.seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds "
                             f"config.seq_len={self.config.seq_len}")
        wide = jnp.promote_types(self.embed.weight.dtype, jnp.float32)  # float64 stays float64
        compute = jnp.bfloat16 if self.config.compute_dtype == "bfloat16" else wide
        h = self.embed(tokens).astype(compute)
        for layer in self.layers:
            h = layer(h, tap)
        return self.head(self.norm(h), tap).astype(wide)
