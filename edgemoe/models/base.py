"""Blocks every family shares: norms, rotary embeddings, the KV cache, attention.

Shape legend: B sequences, S new tokens, L cached + new positions, H heads,
Hkv key/value heads, Dh head dim, D hidden.

A forward pass is over rows of sequence slots of the KV cache
(edgemoe/kvcache.py), right-padded: each slot keeps its own length, so
sequences of different lengths share a pass and each sees positions 0, 1, 2...
Pad tokens are masked out of attention and skipped by MoE layers. A packed
pass (kvcache.Packed) has no pads: one row of every sequence's new tokens,
attended by runs over each sequence's own keys (attend_runs).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Protocol

import torch
import torch.nn.functional as F

from edgemoe.fused import FusedChain, FusedLayer
from edgemoe.kernels import DenseLinear, Linear
from edgemoe.kvcache import KVCache, Runs
from edgemoe.moe.executor import ExpertExecutor


class Weights(Protocol):
    """Resident (non-expert) weights by Hugging Face name."""

    dtype: torch.dtype

    def has(self, name: str) -> bool: ...

    def tensor(self, name: str) -> torch.Tensor:
        """Dense tensor; 1-D tensors (norms, biases) in float32, others in dtype."""

    def linear(self, name: str, bias: str | None = None) -> Linear:
        """y = x @ W.T (+ bias), fused on stored codes where possible."""


class StandardArgs:
    """Geometry the standard (GQA) families share; a family's ModelArgs derives from it."""

    def kv_dims(self) -> tuple[int, int, int]:
        """(kv heads, key dim, value dim) a cached token holds per layer."""
        return self.num_key_value_heads, self.head_dim, self.head_dim


def from_dict(cls, cfg: dict):
    """Build an args dataclass from a config dict, dropping unknown keys (mlx-lm style)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names and v is not None})


def finish_args(args, cfg: dict):
    """Defaults the standard families share: rope_theta (either key), head_dim, KV heads."""
    args.rope_theta = rope_theta(cfg, args.rope_theta)
    args.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
    args.num_key_value_heads = args.num_key_value_heads or args.num_attention_heads
    return args


def rope_theta(cfg: dict, default: float = 10000.0) -> float:
    """rope_theta from either the classic key or transformers 5's rope_parameters."""
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", default))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: in float32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype) if weight.dtype == x.dtype else (weight * h).to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor,
    dim: int,
    theta: float,
    dtype: torch.dtype,
    inv_freq: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, dim] for integer positions [B, S] (rotate-half layout)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, S, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, Dh]; cos/sin [B, S, Dh]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """q [B, H, S, Dh], k/v [B, Hkv, L, *], mask [B, 1, S, L] -> [B, S, H * Dv]."""
    # grouped KV heads are shared in the kernel (no copy of the cache per step)
    gqa = k.shape[1] != q.shape[1]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def attend_runs(q, kc, vc, runs: Runs, scale: float) -> torch.Tensor:
    """A packed pass's attention: q [1, H, T, Dh], the layer's cache kc/vc [N, Hkv, max_len, *]
    -> [1, T, H * Dv]. Each run reads a view of its slots' own keys (no padding past the
    run's longest row, no copy)."""
    gqa = kc.shape[1] != q.shape[1]
    rows = q[0].transpose(0, 1)[:, :, None]  # [T, H, 1, Dh]: a decode run's queries are a slice
    outs = []
    for r in runs:
        k, v = kc[r.lo : r.hi, :, : r.length], vc[r.lo : r.hi, :, : r.length]
        if r.hi - r.lo > 1 or r.t1 - r.t0 == 1:  # decode rows: [b, H, 1, Dh]
            o = F.scaled_dot_product_attention(
                rows[r.t0 : r.t1], k, v, attn_mask=r.mask, scale=scale, enable_gqa=gqa
            )
            outs.append(o.reshape(r.t1 - r.t0, -1))  # [b, H * Dv]
        else:  # one row's new tokens: [1, H, s, Dh]
            o = F.scaled_dot_product_attention(
                q[:, :, r.t0 : r.t1],
                k,
                v,
                attn_mask=r.mask,
                is_causal=r.causal,
                scale=scale,
                enable_gqa=gqa,
            )
            outs.append(o[0].transpose(0, 1).reshape(r.t1 - r.t0, -1))  # [s, H * Dv]
    o = outs[0] if len(outs) == 1 else torch.cat(outs)
    return o[None]


class Attention:
    """Grouped-query attention with the options the standard families use.

    qk_norm: None, "head" (Qwen3: RMSNorm over each head's Dh) or "full"
    (OLMoE: RMSNorm over the whole projection before splitting heads).
    """

    def __init__(
        self,
        w: Weights,
        prefix: str,
        n_heads: int,
        n_kv: int,
        head_dim: int,
        theta: float,
        eps: float,
        qk_norm: str | None = None,
        clip_qkv: float | None = None,
    ):
        def proj(n):  # biases wherever the checkpoint has them (qkv_bias, attention_bias)
            bias = f"{prefix}.{n}.bias"
            return w.linear(f"{prefix}.{n}.weight", bias if w.has(bias) else None)

        self.q, self.k, self.v, self.o = (
            proj("q_proj"),
            proj("k_proj"),
            proj("v_proj"),
            proj("o_proj"),
        )
        self.n_heads, self.n_kv, self.head_dim, self.theta, self.eps = (
            n_heads,
            n_kv,
            head_dim,
            theta,
            eps,
        )
        self.qk_norm, self.clip = qk_norm, clip_qkv
        if qk_norm:
            self.q_norm = w.tensor(f"{prefix}.q_norm.weight")
            self.k_norm = w.tensor(f"{prefix}.k_norm.weight")

    @classmethod
    def for_layer(cls, w: Weights, args, i: int, **kw) -> Attention:
        """The standard families' attention of layer i, from their args."""
        return cls(
            w,
            f"model.layers.{i}.self_attn",
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
            args.rope_theta,
            args.rms_norm_eps,
            **kw,
        )

    def __call__(self, x, positions, mask, cache: KVCache, layer: int) -> torch.Tensor:
        bsz, s, _ = x.shape
        q, k, v = self.q(x).to(x.dtype), self.k(x).to(x.dtype), self.v(x).to(x.dtype)
        if self.qk_norm == "full":
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        if self.clip is not None:  # OLMoE's clip_qkv
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(bsz, s, self.n_heads, self.head_dim)
        k = k.view(bsz, s, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, S, Dh]
        v = v.view(bsz, s, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = 1.0 / math.sqrt(self.head_dim)
        if isinstance(mask, Runs):  # a packed pass
            cache.store(layer, k, v)
            o = attend_runs(q, cache.k[layer], cache.v[layer], mask, scale)
        else:
            k_all, v_all = cache.update(layer, k, v)
            o = attend(q, k_all, v_all, mask, scale)
        return self.o(o).to(x.dtype)


class MLP:
    """Dense SwiGLU MLP from resident weights (shared experts, dense layers)."""

    def __init__(self, w: Weights, prefix: str):
        self.gate = w.linear(f"{prefix}.gate_proj.weight")
        self.up = w.linear(f"{prefix}.up_proj.weight")
        self.down = w.linear(f"{prefix}.down_proj.weight")

    def __call__(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x)).to(x.dtype)


class CausalLM(ABC):
    """Embedding -> decoder layers -> norm -> lm_head; families supply the layers.

    `args` has num_hidden_layers, rms_norm_eps and kv_dims(); subclasses implement make_layer.
    """

    args: object
    replay = None  # a RoutingReplay (edgemoe/replay.py) its MoE layers route by, or None

    def __init__(self, args, weights: Weights, executor: ExpertExecutor):
        self.args, self.weights, self.executor = args, weights, executor
        self.dtype = weights.dtype
        self.embed = weights.tensor("model.embed_tokens.weight")
        self.layers = [self.make_layer(i) for i in range(args.num_hidden_layers)]
        moes = [layer for layer in self.layers if isinstance(layer.mlp, RoutedMoE)]
        for a, b in zip(moes, moes[1:]):
            a.mlp.next = b.mlp  # a MoE layer predicts the next one's experts (prefetch hints)
            if hasattr(b, "ln2"):  # and refines the guess on its output (RoutedMoE.refine)
                a.mlp.next_norm = (b.ln2, b.eps)
        self.chain = FusedChain.of(self)
        self.norm = weights.tensor("model.norm.weight")
        if weights.has("lm_head.weight"):
            self.lm_head = weights.linear("lm_head.weight")
        else:  # tied embeddings
            self.lm_head = DenseLinear(self.embed)

    @abstractmethod
    def make_layer(self, i: int):
        """Decoder layer i: (x, positions, mask, cache, i) -> x."""

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        h, dk, dv = self.args.kv_dims()
        return KVCache(self.args.num_hidden_layers, slots, max_len, h, dk, dv, self.dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        valid: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, S] -> final hidden states [B, S, D].

        Args:
            valid: [B, S] real tokens, each row's first n_b (right padding); default all.
            slots: [B] the cache slot of each row; default 0..B-1. Each slot advances by n_b.
                Or a kvcache.Packed layout: tokens [1, T] are its rows' tokens back to back.
        """
        if valid is None:
            valid = torch.ones(tokens.shape, dtype=torch.bool)
        positions, mask = cache.begin(valid, slots)
        if self.replay is not None:  # recorded routing replaces the routers' (edgemoe/replay.py)
            self.replay.begin(cache.token_slots(), positions, cache.keep)
        x = self.embed[tokens].to(self.dtype)  # [B, S, D]
        if self.chain is not None and self.chain.applies(x, cache):
            x = self.chain(x, cache)  # one token through every layer in kernel calls
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, positions, mask, cache, i)
        cache.commit()
        return rms_norm(x, self.norm, self.args.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> float32 [..., V]."""
        return self.lm_head(hidden).float()


# decode steps predict; a prompt's tokens route to most experts of a layer anyway, and reading
# them ahead would only evict what the prompt's own layers need
PREDICT_TOKENS = 16


class RoutedMoE:
    """A sparse MoE block: float32 router -> routing rule -> executor (+ shared expert).

    Args:
        route: (logits [T, E]) -> (ids [T, K], weights [T, K]).
        shared: optional dense MLP added to every token (Qwen2-MoE, DeepSeek).
        shared_gate: optional [1, D] weight; the shared output is scaled by sigmoid(x @ g.T).
    """

    def __init__(
        self,
        router: torch.Tensor,
        route,
        executor: ExpertExecutor,
        layer: int,
        shared: MLP | None = None,
        shared_gate: torch.Tensor | None = None,
    ):
        self.router, self.route, self.executor, self.layer = router, route, executor, layer
        self.shared, self.shared_gate = shared, shared_gate
        self.next: RoutedMoE | None = None  # the next MoE layer, whose experts this one predicts
        self.next_norm: tuple[torch.Tensor, float] | None = None  # its layer's MoE norm, eps
        self.predict = True
        self.replay = None  # a RoutingReplay, and this layer's index among the MoE layers
        self.moe_index = 0

    def __call__(
        self,
        x: torch.Tensor,
        keep: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        routed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, S, D]; keep: flat indices of the real tokens (None: all), pads get zeros;
        logits: the router's [T, E], routed: (ids, weights) [T, K] where the caller computed
        them (fused.py)."""
        b, s, d = x.shape
        flat = x.reshape(-1, d)  # [B*S, D]
        if keep is not None:
            flat = flat[keep]  # [T, D]
        if routed is not None:
            ids, w = routed
        else:
            if logits is None:
                logits = flat.float() @ self.router.float().T  # [T, E]
            if self.replay is not None:
                ids, w = self.replay.route(self.moe_index, logits)
            else:
                ids, w = self.route(logits)  # [T, K]
        handle = self.executor.begin(self.layer, flat, ids, w)  # reads fly from here on
        if self.next is not None and self.predict and flat.shape[0] <= PREDICT_TOKENS:
            # the next layer's router on this layer's input guesses its experts (Fate): their
            # reads start now, behind this layer's, instead of after it
            self._hint(flat.float())
        y = None
        if self.shared is not None:
            y = self.shared(flat)
            if self.shared_gate is not None:
                y = torch.sigmoid(flat.float() @ self.shared_gate.float().T).to(y.dtype) * y
        out = self.executor.finish(handle)  # [T, D]
        if y is not None:
            out = out + y
        if keep is not None:
            full = torch.zeros(b * s, d, dtype=out.dtype)
            full[keep] = out
            out = full
        return out.reshape(b, s, d)

    def guess(self, x: torch.Tensor) -> torch.Tensor:
        """The experts this layer's router picks for hidden states x [T, D] float32: [T, K]."""
        return self.route(x @ self.router.float().T)[0]

    def _hint(self, x: torch.Tensor) -> None:
        """Hint the executor with the next MoE layers' guesses from hidden states x."""

        def later():
            m = self.next.next
            while m is not None:
                yield m.layer, m.guess(x)
                m = m.next

        self.executor.hint(self.next.layer, self.next.guess(x), later)

    def refine(self, h: torch.Tensor) -> None:
        """h [B, S, D]: the residual stream this layer's block produced, the next layer's
        input. Through the next MoE layer's norm and router it guesses that layer's experts
        better than this layer's input did (it lacks only the attention in between: on the
        bench model 77% against 61%), where the executor wants the second guess (a read
        ahead re-aims; moe/local.py)."""
        if self.next is None or not self.predict or not self.executor.refines:
            return
        flat = h.reshape(-1, h.shape[-1])
        if self.next_norm is None or flat.shape[0] > PREDICT_TOKENS:
            return
        self._hint(rms_norm(flat, *self.next_norm).float())


class DecoderLayer:
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)); one token of one sequence
    takes the fused kernels where the layer is the standard kind (edgemoe/fused.py)."""

    def __init__(self, w: Weights, i: int, attn, mlp, eps: float):
        self.attn, self.mlp, self.eps = attn, mlp, eps
        self.ln1 = w.tensor(f"model.layers.{i}.input_layernorm.weight")
        self.ln2 = w.tensor(f"model.layers.{i}.post_attention_layernorm.weight")
        self.fused = None
        if type(attn) is Attention:
            moe = mlp if type(mlp) is RoutedMoE else None
            self.fused = FusedLayer.of(self, moe, rope_cos_sin)

    def __call__(self, x, positions, mask, cache, i):
        if self.fused is not None and self.fused.applies(x, cache):
            return self.fused(x, cache, i)
        h = x + self.attn(rms_norm(x, self.ln1, self.eps), positions, mask, cache, i)
        out = h + self.mlp(rms_norm(h, self.ln2, self.eps), cache.keep)
        if isinstance(self.mlp, RoutedMoE):
            self.mlp.refine(out)
        return out
