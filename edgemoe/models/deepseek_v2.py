"""DeepSeek-V2: multi-head latent attention (MLA), group-limited softmax routing, shared experts.

MLA compresses keys and values into one kv_lora_rank latent per token
(kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj gives per-head k_nope and
v) plus one rope key shared by all heads; queries come from q_proj, or from
the q LoRA q_a_proj -> q_a_layernorm -> q_b_proj. Only the qk_rope_head_dim
part of q and k is rotated. The cache holds what MLA was made for: per
token the normalised latent and the rotated rope key (kv_lora_rank +
qk_rope_head_dim numbers shared by all heads, 576 for V2/V3 against 40960
for V3's expanded keys and values), with kv_b_proj absorbed into the query
and the output instead of expanding every cached token at every step.

Layers before first_k_dense_replace are dense MLPs (model.layers.N.mlp.*);
the rest route to model.layers.N.mlp.experts.E.* with the router mlp.gate
and add mlp.shared_experts, a dense MLP every token goes through.
DeepSeek-V3 (deepseek_v3.py) is this model with another router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from edgemoe.kvcache import KVCache, Runs
from edgemoe.models.base import (
    MLP,
    CausalLM,
    DecoderLayer,
    RoutedMoE,
    Weights,
    apply_rope,
    from_dict,
    rms_norm,
    rope_cos_sin,
    rope_theta,
)
from edgemoe.moe.router import group_limited_softmax_topk

# q_a_layernorm and kv_a_layernorm are built without the config's eps, so they keep
# the RMSNorm default in transformers and in DeepSeek's own code
LATENT_NORM_EPS = 1e-6


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts_per_tok: int
    vocab_size: int
    intermediate_size: int
    # defaults are transformers' DeepseekV2Config defaults
    moe_intermediate_size: int = 1407
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # resolved yarn parameters, None for plain rope
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelArgs:
        """Args from a config dict (unknown keys dropped).

        Raises:
            ValueError: a setting transformers does not run for this family
                (rope scaling other than yarn, an unknown topk_method, mlp_bias).
        """
        args = from_dict(cls, cfg)
        args.rope_theta = rope_theta(cfg, args.rope_theta)
        if "q_lora_rank" in cfg:  # an explicit null means queries come from q_proj (V2-Lite)
            args.q_lora_rank = cfg["q_lora_rank"]
        args.rope_scaling = rope_scaling(cfg, args.max_position_embeddings)
        args.check()
        return args

    def check(self) -> None:
        # transformers' V2 router knows these two methods only and ignores scoring_func
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(
                f"deepseek_v2 topk_method {self.topk_method!r} is not supported; "
                "expected 'greedy' or 'group_limited_greedy'"
            )
        if self.mlp_bias:
            raise ValueError("deepseek_v2 with mlp_bias=true is not supported")

    def kv_dims(self) -> tuple[int, int, int]:
        """One shared "head" of latent + rope key per token, no separate values."""
        return 1, self.kv_lora_rank + self.qk_rope_head_dim, 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_sparse(self, i: int) -> bool:
        return (
            self.n_routed_experts > 0
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )


def rope_scaling(cfg: dict, max_position_embeddings: int) -> dict | None:
    """The rope scaling parameters of a config, None for plain rope.

    Reads transformers 5's rope_parameters, else the classic rope_scaling
    (DeepSeek's own config.json), and fills original_max_position_embeddings
    as transformers does.

    Raises:
        ValueError: a scaling type other than yarn.
    """
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict) or not (params.get("rope_type") or params.get("type")):
        params = cfg.get("rope_scaling")
    if not params:
        return None
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(
            f"rope scaling type {kind!r} is not supported for DeepSeek models; "
            "edgemoe runs plain rope and 'yarn'"
        )
    params = dict(params)
    if cfg.get("original_max_position_embeddings") is not None:  # transformers prefers it
        params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


def yarn(p: dict, dim: int, theta: float, max_pos: int) -> tuple[torch.Tensor, float, float]:
    """YaRN as transformers computes it (_compute_yarn_parameters, yarn_apply_mscale).

    Returns:
        inv_freq [dim/2] float32; the scale of cos/sin (attention_factor);
        the factor on the softmax scale (mscale(factor, mscale_all_dim) squared).
    """
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / orig

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = p.get("mscale"), p.get("mscale_all_dim")
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = mscale(m) / mscale(m_all) if m and m_all else mscale(1.0)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)  # [dim/2]
    inv_interpolation, inv_extrapolation = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    extrapolation = 1 - ramp  # written as transformers writes it, for identical bits
    inv_freq = inv_interpolation * (1 - extrapolation) + inv_extrapolation * extrapolation
    softmax_factor = mscale(m_all) ** 2 if m_all else 1.0
    return inv_freq, float(attention_factor), softmax_factor


class MLARope:
    """Rotary embedding of MLA's rope part and the attention softmax scale.

    interleave: the checkpoint's rope dims pair up as (x0, x1), (x2, x3)...
    (DeepSeek's layout). They are regrouped to rotate-half order, [evens, odds];
    that permutes q and k alike, so q.k is unchanged.
    in_f32: rotate in float32 (transformers' V2 rotates complex float32 numbers).
    """

    def __init__(self, args: ModelArgs, interleave: bool, in_f32: bool):
        self.dim, self.theta = args.qk_rope_head_dim, args.rope_theta
        self.interleave, self.in_f32 = interleave, in_f32
        self.inv_freq, self.cos_sin_scale = None, 1.0
        self.softmax_scale = args.qk_head_dim**-0.5
        if args.rope_scaling is not None:
            self.inv_freq, self.cos_sin_scale, f = yarn(
                args.rope_scaling, self.dim, self.theta, args.max_position_embeddings
            )
            self.softmax_scale *= f
        self._positions: torch.Tensor | None = None  # the tables are shared by every layer

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, H, S, R] -> rotated, same shape and dtype."""
        dt = torch.float32 if self.in_f32 else x.dtype
        if positions is not self._positions:
            self._cos_sin = rope_cos_sin(
                positions, self.dim, self.theta, dt, self.inv_freq, self.cos_sin_scale
            )
            self._positions = positions
        if self.interleave:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rope(x.to(dt), *self._cos_sin).to(x.dtype)


class MLAttention:
    """Multi-head latent attention over a cache of latents.

    kv_b_proj maps a latent c to each head's key part W_UK c and value W_UV c.
    Both are absorbed: q_nope . (W_UK c) = (W_UK^T q_nope) . c, so scores are
    taken against the cached latents directly, and sum_l p_l W_UV c_l =
    W_UV (sum_l p_l c_l), so values are mixed as latents and expanded once
    per query. Shape legend: B batch, S new tokens, L cached tokens, H heads,
    C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim, Dv v_head_dim.
    """

    def __init__(self, w: Weights, prefix: str, args: ModelArgs, rope: MLARope):
        def proj(n):  # biases wherever the checkpoint has them (attention_bias)
            bias = f"{prefix}.{n}.bias"
            return w.linear(f"{prefix}.{n}.weight", bias if w.has(bias) else None)

        if args.q_lora_rank is None:
            self.q = proj("q_proj")
        else:
            self.q_a, self.q_b = proj("q_a_proj"), proj("q_b_proj")
            self.q_norm = w.tensor(f"{prefix}.q_a_layernorm.weight")
        self.kv_a = proj("kv_a_proj_with_mqa")
        h, n, dv = args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim
        kv_b = w.tensor(f"{prefix}.kv_b_proj.weight").view(h, n + dv, args.kv_lora_rank)
        self.w_uk, self.w_uv = kv_b[:, :n], kv_b[:, n:]  # [H, N, C], [H, Dv, C]
        # a key bias shifts every score of a query alike (softmax ignores it); a value bias
        # adds to every output, as the weights sum to one
        bias = f"{prefix}.kv_b_proj.bias"
        self.v_bias = w.tensor(bias).view(h, n + dv)[:, None, n:] if w.has(bias) else None
        self.kv_norm = w.tensor(f"{prefix}.kv_a_layernorm.weight")
        self.o = proj("o_proj")
        self.args, self.rope = args, rope

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        if self.args.q_lora_rank is None:
            return self.q(x).to(x.dtype)
        c = rms_norm(self.q_a(x).to(x.dtype), self.q_norm, LATENT_NORM_EPS)  # [B, S, q_lora]
        return self.q_b(c).to(x.dtype)

    def __call__(self, x, positions, mask, cache: KVCache, layer: int) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; stores this step's latents and rope keys in the cache."""
        a, (bsz, s, _) = self.args, x.shape
        h, n, r, c = a.num_attention_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank
        q = self.project_q(x).view(bsz, s, h, n + r).transpose(1, 2)  # [B, H, S, N + R]
        latent, k_rope = self.kv_a(x).to(x.dtype).split([c, r], dim=-1)
        latent = rms_norm(latent, self.kv_norm, LATENT_NORM_EPS)  # [B, S, C]
        k_rope = self.rope(k_rope[:, None], positions)  # [B, 1, S, R], one rope key for all heads
        q_lat = torch.matmul(q[..., :n], self.w_uk)  # [B, H, S, C]
        q = torch.cat((q_lat, self.rope(q[..., n:], positions)), dim=-1)  # [B, H, S, C + R]
        new = torch.cat((latent[:, None], k_rope), dim=-1)  # [B, 1, S, C + R]
        if isinstance(mask, Runs):  # a packed pass (B = 1): each run over its slots' latents
            cache.store(layer, new, new[..., :0])
            lat, parts = cache.k[layer], []
            for run in mask:
                if run.hi - run.lo > 1 or run.t1 - run.t0 == 1:  # decode rows [b, H, 1, *]
                    qr = q[0, :, run.t0 : run.t1].transpose(0, 1)[:, :, None]
                else:
                    qr = q[:, :, run.t0 : run.t1]
                o = self._mix(qr, lat[run.lo : run.hi, 0, : run.length], run.bool_mask())
                parts.append(o.permute(2, 1, 0, 3) if o.shape[0] > 1 else o)  # [1, H, s, C]
            o = torch.cat(parts, dim=2).to(x.dtype)
        else:
            kv, _ = cache.update(layer, new, new[..., :0])
            o = self._mix(q, kv[:, 0], mask).to(x.dtype)
        o = torch.matmul(o, self.w_uv.transpose(1, 2))  # [B, H, S, Dv]
        if self.v_bias is not None:
            o = o + self.v_bias.to(x.dtype)  # [H, 1, Dv]
        return self.o(o.transpose(1, 2).reshape(bsz, s, -1)).to(x.dtype)

    def _mix(self, q, kv, mask) -> torch.Tensor:
        """q [B, H, S, C + R] against latents kv [B, L, C + R], mask [B, 1, S, L] or None ->
        float32 [B, H, S, C]."""
        # every head reads the same latents: one [B, L, C + R] matrix, no copy per head. Scores
        # and mixing run in float32: exacter, and faster on CPU than bf16 GEMMs with few rows
        bsz, h, s, _ = q.shape
        c, kv = self.args.kv_lora_rank, kv.float()
        scores = torch.bmm(q.reshape(bsz, h * s, -1).float(), kv.transpose(1, 2))
        scores = scores.view(bsz, h, s, -1) * self.rope.softmax_scale  # [B, H, S, L]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(-1)
        return torch.bmm(p.view(bsz, h * s, -1), kv[..., :c]).view(bsz, h, s, c)


class Model(CausalLM):
    """DeepSeek-V2 over resident weights and an expert executor."""

    # transformers' V2 has no rope_interleave flag: it always rotates interleaved pairs,
    # as complex float32 numbers
    rope_in_f32 = True

    def __init__(self, args: ModelArgs, weights: Weights, executor):
        self.rope = MLARope(args, self.rope_interleaved(args), self.rope_in_f32)
        super().__init__(args, weights, executor)

    def rope_interleaved(self, args: ModelArgs) -> bool:
        return True

    def router(self, i: int):
        """Layer i's routing rule: logits [T, E] -> (ids [T, K], weights [T, K])."""
        a = self.args
        # transformers' V2 never renormalises (norm_topk_prob is unused there)
        groups = (a.n_group, a.topk_group) if a.topk_method == "group_limited_greedy" else (1, 1)
        return partial(
            group_limited_softmax_topk,
            k=a.num_experts_per_tok,
            n_group=groups[0],
            topk_group=groups[1],
            scale=a.routed_scaling_factor,
        )

    def make_layer(self, i: int) -> DecoderLayer:
        a, w, p = self.args, self.weights, f"model.layers.{i}"
        attn = MLAttention(w, f"{p}.self_attn", a, self.rope)
        if a.is_sparse(i):
            shared = MLP(w, f"{p}.mlp.shared_experts") if a.n_shared_experts else None
            router = w.tensor(f"{p}.mlp.gate.weight")  # [E, D] float32
            mlp = RoutedMoE(router, self.router(i), self.executor, i, shared)
        else:
            mlp = MLP(w, f"{p}.mlp")
        return DecoderLayer(w, i, attn, mlp, a.rms_norm_eps)
