"""The batch-1 decode fast path: one token through the decoder layers in kernel calls.

A decode step of one sequence on the bench model spent ~10 ms of its ~45 ms between
kernels (norms, rotary, the KV store, attention, the router, a kernel call and a thread
wake-up per matrix and per expert). `FusedLayer` makes a layer's attention half one call
(csrc/q8.c `layer1_attn`: norm, q/k/v on one quantization of the input, rotary, the KV
store, attention, o, the residual, the second norm, the router's logits and softmax
top-k) and its routed experts another (`q8_moe1`, from moe/local.py when the token's
experts are in memory). `FusedChain` runs a whole step's layers in one call
(`decode_chain`) while every chosen expert is cached, and hands a layer that must read
one to the executor. Routing policy, the cache, reads and prefetch stay in Python: the
executor decides, the kernels compute.

It applies where the step is one token of one sequence and the layer is the standard
one: GQA attention without qk-norm, clipping or biases, INT8 q/k/v/o on the Q8 kernel,
head_dim a multiple of 8, computing in float32 or bfloat16 (bfloat16 values are rounded
where torch rounds them on the path it replaces, models/base.py); anything else takes that
path. EDGEMOE_FUSED=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os

import torch

from edgemoe import fastkernels, trace
from edgemoe.kernels import on_q8_kernel
from edgemoe.moe.router import softmax_topk


class _Layer1(ctypes.Structure):  # csrc/q8.c Layer1
    _fields_ = [
        *[(n, ctypes.c_int64) for n in ("D", "H", "Hkv", "Dh", "E")],
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        *[(n, ctypes.c_void_p) for n in ("ln1", "ln2", "wq", "wk", "wv", "wo")],
        *[(n, ctypes.c_void_p) for n in ("sq", "sk", "sv", "so", "router")],
        ("rnd", ctypes.c_int),
        ("topk", ctypes.c_int),
        ("norm", ctypes.c_int),
    ]


def enabled() -> bool:
    return os.environ.get("EDGEMOE_FUSED", "1") != "0" and fastkernels.available()


@functools.lru_cache(maxsize=256)  # every layer of a step shares its position's table
def _table(rope, pos: int, dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One position's rotary table as Attention computes it, float32 [dim] each."""
    cos, sin = rope(torch.tensor([[pos]]), dim, theta, dtype)
    return cos.reshape(-1).float().contiguous(), sin.reshape(-1).float().contiguous()


class FusedLayer:
    """The fast path of one DecoderLayer (None from `of` where it does not apply).

    The layer's attention must be models/base.py's Attention (the caller checks, so this
    module needs nothing of models/), `moe` its RoutedMoE or None (a dense MLP), `rope` the
    function Attention's rotary table comes from: (positions, dim, theta, dtype) -> cos, sin.
    """

    @classmethod
    def of(cls, layer, moe, rope) -> FusedLayer | None:
        a = layer.attn
        if not enabled():
            return None
        if (
            a.qk_norm
            or a.clip is not None
            or not all(on_q8_kernel(p) for p in (a.q, a.k, a.v, a.o))
        ):
            return None
        dtype = a.q.dtype
        d = a.q.in_features
        if dtype not in (torch.float32, torch.bfloat16) or a.head_dim % 8 or d % 32:
            return None
        if (a.o.in_features % 32) or a.n_heads % a.n_kv:
            return None
        return cls(layer, moe, rope)

    def __init__(self, layer, moe, rope):
        a = layer.attn
        self.layer, self.moe, self.dtype = layer, moe, a.q.dtype

        self._rope = rope
        self.d, self.head_dim, self.theta = a.q.in_features, a.head_dim, a.theta
        # the kernel reads these through raw pointers: this object keeps them alive
        self._keep = [layer.ln1.float().contiguous(), layer.ln2.float().contiguous()]
        router = None
        if moe is not None:
            router = moe.router.float().contiguous()
            self._keep.append(router)
        self.e = router.shape[0] if router is not None else 0
        s = _Layer1(
            D=self.d, H=a.n_heads, Hkv=a.n_kv, Dh=a.head_dim, E=self.e, eps=layer.eps,
            scale=1.0 / math.sqrt(a.head_dim), rnd=int(self.dtype == torch.bfloat16),
        )  # fmt: skip
        s.ln1, s.ln2 = self._keep[0].data_ptr(), self._keep[1].data_ptr()
        s.wq, s.wk, s.wv, s.wo = (p.q.data_ptr() for p in (a.q, a.k, a.v, a.o))
        s.sq, s.sk, s.sv, s.so = (p.scales.data_ptr() for p in (a.q, a.k, a.v, a.o))
        s.router = router.data_ptr() if router is not None else None
        # softmax top-k routing (Mixtral, Qwen-MoE, OLMoE) runs in the kernel; other rules here
        route = moe.route if moe is not None else None
        if isinstance(route, functools.partial) and route.func is softmax_topk and not route.args:
            s.topk, s.norm = int(route.keywords["k"]), int(bool(route.keywords["normalize"]))
        self.args = s
        self._ref = ctypes.byref(s)
        # the call's outputs, reused: each is consumed before the layer's next call
        self.xr = torch.empty(self.d, dtype=torch.float32)
        self.xn = torch.empty(1, self.d, dtype=torch.float32)
        self.logits = torch.empty(1, max(self.e, 1), dtype=torch.float32)
        self.ids = torch.empty(1, max(s.topk, 1), dtype=torch.int64)
        self.w = torch.empty(1, max(s.topk, 1), dtype=torch.float32)
        self._ptrs = [t.data_ptr() for t in (self.xr, self.xn, self.logits, self.ids, self.w)]

    def applies(self, x: torch.Tensor, cache) -> bool:
        """One token of one sequence, its cache the plain kind in the model's dtype."""
        return (
            x.shape[0] * x.shape[1] == 1
            and getattr(cache, "one", None) is not None
            and getattr(cache, "dtype", None) == self.dtype
            and cache.keep is None
        )

    def __call__(self, x: torch.Tensor, cache, layer: int) -> torch.Tensor:
        slot, pos = cache.one
        self.xr.copy_(x.view(-1))  # the residual, updated in place by the kernel
        cos, sin = _table(self._rope, pos, self.head_dim, self.theta, self.dtype)
        kc, vc = cache.k[layer], cache.v[layer]  # [N, Hkv, max_len, Dh]: this slot's rows
        at = slot * kc.stride(0) * kc.element_size()
        with trace.span(f"attn L{layer}", "attn"):
            rc = fastkernels.library().layer1_attn(
                self._ref, *self._ptrs, cos.data_ptr(), sin.data_ptr(), kc.data_ptr() + at,
                vc.data_ptr() + at, kc.shape[2], pos, self.args.rnd, torch.get_num_threads(),
            )  # fmt: skip
        fastkernels._check(rc)
        h = self.xr.to(self.dtype).view(1, 1, self.d)
        # the MoE input stays float32 (bfloat16 values): the expert kernels take it as it is
        xn = self.xn.view(1, 1, self.d)
        if self.moe is None:
            return h + self.layer.mlp(xn.to(self.dtype), None)
        routed = (self.ids, self.w) if self.args.topk and self.moe.replay is None else None
        out = h + self.moe(xn, None, logits=self.logits, routed=routed).to(self.dtype)
        self.moe.refine(out)
        return out


class _Chain1(ctypes.Structure):  # csrc/q8.c Chain1
    _fields_ = [
        ("L", _Layer1),
        ("kc", ctypes.c_void_p),
        ("vc", ctypes.c_void_p),
        ("I", ctypes.c_int64),
        *[(n, ctypes.c_void_p) for n in ("wg", "wu", "wd", "sg", "su", "sd")],
    ]


class FusedChain:
    """A decode step's layers in one kernel call while the token's experts are cached
    (csrc/q8.c `decode_chain`): per-layer Python cost ~0.3 ms of a ~35 ms step on the bench
    model. The executor gives each layer's table of cached Q8 experts (rebuilt when the
    cache changes) and is told the hits afterwards; a layer whose expert is not cached
    stops the call after its attention half and is served by the executor as usual (reads,
    the cache), then the call goes on from the next layer.

    Applies to one token of one sequence where every layer is fused with softmax top-k
    routing, the executor offers the tables (moe/local.py) and nothing wants the per-layer
    path: a bit policy, prefetch hints, a routing replay or a trace."""

    @classmethod
    def of(cls, model) -> FusedChain | None:
        fused = [getattr(layer, "fused", None) for layer in model.layers]
        if not enabled() or not fused or not hasattr(model.executor, "q8_tables"):
            return None
        if any(f is None or f.moe is None or not 0 < f.args.topk <= 64 for f in fused):
            return None
        return cls(model, fused)

    def __init__(self, model, fused: list[FusedLayer]):
        self.model, self.fused, self.executor = model, fused, model.executor
        self.n, self.k, self.e = len(fused), fused[0].args.topk, fused[0].e
        self.dtype, self.d = fused[0].dtype, fused[0].d
        self.layers = [f.moe.layer for f in fused]
        self.chain = (_Chain1 * self.n)()
        for c, f in zip(self.chain, fused):
            c.L = f.args
        self.ids = torch.empty(self.n, self.k, dtype=torch.int64)
        self.w = torch.empty(self.n, self.k, dtype=torch.float32)
        self.xr = torch.empty(self.d, dtype=torch.float32)
        self.xn = torch.empty(1, self.d, dtype=torch.float32)
        self.logits = torch.empty(1, self.e, dtype=torch.float32)
        self._tables: list = []  # the ctypes arrays the chain points into (kept alive here)
        self._version = None
        self._size = ctypes.sizeof(_Chain1)

    def applies(self, x: torch.Tensor, cache) -> bool:
        return (
            self.fused[0].applies(x, cache)  # one token of one sequence, the plain cache
            and self.model.replay is None
            and (
                # a layer it hands back hints (models/base.py)
                getattr(self.executor, "ahead", False)
                or not any(f.moe.predict and f.moe.next is not None for f in self.fused)
            )
            and self.executor.chain_ready()
        )

    def _refresh(self) -> None:
        """Point each layer at its cached experts (after any change to the cache)."""
        cache = self.executor.cache
        if self._version == cache.version:
            return
        self._tables = []
        for c, layer in zip(self.chain, self.layers):
            width, tables = self.executor.q8_tables(layer, self.e)
            arrays = [(ctypes.c_void_p * self.e)(*t) for t in tables]
            self._tables.append(arrays)
            c.I = width
            c.wg, c.wu, c.wd, c.sg, c.su, c.sd = (ctypes.addressof(a) for a in arrays)
        self._version = cache.version

    def __call__(self, x: torch.Tensor, cache) -> torch.Tensor:
        slot, pos = cache.one
        f0 = self.fused[0]
        cos, sin = _table(f0._rope, pos, f0.head_dim, f0.theta, self.dtype)
        for c, layer in zip(self.chain, range(self.n)):
            kc, vc = cache.k[layer], cache.v[layer]
            at = slot * kc.stride(0) * kc.element_size()
            c.kc, c.vc = kc.data_ptr() + at, vc.data_ptr() + at
        max_len = cache.k[0].shape[2]
        self.xr.copy_(x.view(-1))
        lib = fastkernels.library()
        rnd, threads = f0.args.rnd, torch.get_num_threads()
        start = 0
        while True:
            self._refresh()
            done = ctypes.c_int(0)
            t0 = trace.now()
            rc = lib.decode_chain(
                ctypes.addressof(self.chain) + start * self._size, self.n - start,
                self.xr.data_ptr(), self.xn.data_ptr(), self.logits.data_ptr(),
                self.ids.data_ptr() + start * self.k * 8, self.w.data_ptr() + start * self.k * 4,
                cos.data_ptr(), sin.data_ptr(), max_len, pos, rnd, threads, ctypes.byref(done),
            )  # fmt: skip
            fastkernels._check(rc)
            end = start + done.value
            if t0 is not None:  # the layers it ran whole, and the attention half of the next
                trace.complete(f"chain L{start}-L{end}", "chain", t0, layers=done.value)
            ids = self.ids.tolist()
            for i in range(start, end):
                self.executor.account_hits(self.layers[i], ids[i])
            if end == self.n:
                break
            # this layer's experts are not all cached: the executor serves it as usual
            f = self.fused[end]
            h = self.xr.to(self.dtype)
            routed = (self.ids[end : end + 1], self.w[end : end + 1])
            out = f.moe(self.xn.view(1, 1, self.d), None, logits=self.logits, routed=routed)
            self.xr.copy_(h + out.reshape(-1).to(self.dtype))
            f.moe.refine(self.xr.view(1, 1, self.d))
            start = end + 1
            if start == self.n:
                break
        return self.xr.to(self.dtype).view(1, 1, self.d)
