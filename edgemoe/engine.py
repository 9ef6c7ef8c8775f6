"""The Python API: `edgemoe.load(path, mem=...)` and generation on it. The CLI is built on this.

m = edgemoe.load("model.emoe", mem="4GB")
print(m.generate("The capital of France is", max_tokens=32))
for piece in m.stream("Once upon a time"):
    print(piece, end="", flush=True)
print(m.summary())
"""

from __future__ import annotations

import dataclasses
import resource
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgemoe import budget
from edgemoe.cache import ExpertCache
from edgemoe.models import build_model, family_module
from edgemoe.moe.local import LocalExecutor
from edgemoe.prepare import prepare_expert
from edgemoe.sampling import Sampling, sample
from edgemoe.store import ExpertStore
from edgemoe.tokenizer import Tokenizer
from edgemoe.units import Bytes
from edgemoe.weights import ResidentWeights
from formats.errors import EmoeError
from formats.reader import EmoeReader

DEMO = Path(__file__).parent / "demo" / "demo.emoe"
PREFILL_CHUNK = 512


class BadRequest(EmoeError):
    fix = "see `edgemoe run --help`"


@dataclass
class RunStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    extra: dict = field(default_factory=dict)


def _dtype(name: str, reader: EmoeReader) -> torch.dtype:
    if (
        name == "auto"
    ):  # full precision files compute in f32, quantized ones in bf16 (the fused kernels' dtype)
        full = all(t.codec.name == "f32" for t in reader.tensors.values())
        return torch.float32 if full else torch.bfloat16
    try:
        return {
            "f32": torch.float32,
            "float32": torch.float32,
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
        }[name]
    except KeyError:
        raise BadRequest(f"unknown dtype {name!r}", "use --dtype auto, f32 or bf16") from None


class EdgeModel:
    """A .emoe loaded inside a memory budget.

    Args:
        path: the .emoe (default: the bundled demo model).
        mem: the budget ("4GB", Bytes, None for unlimited: every expert cached).
        ctx: the longest context (prompt + new tokens) to plan the KV cache for.
        batch: the most prompts generated together.
        dtype: "auto", "f32" or "bf16".
        level: the expert precision level to compute at (default: the highest stored).
        threads: I/O threads.
        expert_cache: fix the expert cache's size instead of planning it from `mem`
            (in-process studies and tests, where the process floor keeps growing).
        device: emulate a device profile (devices/profiles/): its usable memory is the
            default budget, expert reads are throttled to its flash bandwidth and
            compute is slowed by its compute factor.
    Raises:
        EmoeError (and subclasses): a bad file, an unknown family, a budget too small.
    """

    def __init__(
        self,
        path=None,
        mem=None,
        *,
        ctx: int | None = None,
        batch: int = 1,
        dtype: str = "auto",
        level: int | None = None,
        threads: int = 2,
        fused: bool = True,
        expert_cache=None,
        device: str | None = None,
    ):
        floor = budget.process_floor()
        self.device, throttle, self.slowdown = None, None, None
        if device is not None:
            from devices.emulate import ComputeSlowdown, TokenBucket
            from devices.profile import load_profile

            self.device = load_profile(device)
            mem = self.device.usable_memory if mem is None else mem
            throttle = TokenBucket(self.device.flash_rand_read).take
            self.slowdown = ComputeSlowdown(self.device.compute_factor)
        self.path = Path(path) if path else DEMO
        self.reader = r = EmoeReader(self.path)
        mod = family_module(r.family)
        args = mod.ModelArgs.from_dict(r.config)
        max_pos = getattr(args, "max_position_embeddings", 4096)
        self.ctx = ctx or min(max_pos, 2048)
        if self.ctx > max_pos:
            raise BadRequest(
                f"--ctx {self.ctx} exceeds the model's {max_pos} positions",
                f"use --ctx {max_pos} or less",
            )
        if batch < 1:
            raise BadRequest(f"--batch {batch}", "use a batch of at least 1")
        self.batch = batch
        self.dtype = _dtype(dtype, r)
        levels = min((len(e.levels) for e in r.experts.values()), default=1)
        if level is not None and not 1 <= level <= levels:
            raise BadRequest(
                f"--level {level}: this file stores levels 1..{levels}", f"use --level 1..{levels}"
            )
        self.level = level or levels
        kv_dims = mod.Model.kv_dims(types.SimpleNamespace(args=args))
        try:
            self.mem = None if mem is None else Bytes.parse(mem)
        except ValueError as e:
            raise BadRequest(f"--mem: {e}", "pass --mem like 4GB, 512MiB or 0.5G") from None
        self.plan = budget.plan(
            r,
            self.mem,
            ctx=self.ctx,
            batch=batch,
            dtype=self.dtype,
            kv_dims=kv_dims,
            level=self.level,
            threads=threads,
            fused=fused,
            prefill_chunk=PREFILL_CHUNK,
            floor=floor,
        )
        self._tokenizer: Tokenizer | None = None
        self.store = ExpertStore(r, threads=threads, throttle=throttle)
        if expert_cache is not None:
            self.plan = dataclasses.replace(self.plan, expert_cache=Bytes.parse(expert_cache))
        self.cache = ExpertCache(self.plan.expert_cache)
        sizes: dict[int, int] = {}

        def expert_size(layer: int) -> int:
            if layer not in sizes:
                e = next(e for e in r.experts.values() if e.layer == layer)
                sizes[layer] = budget.expert_nbytes(
                    r, layer, e.expert, self.level, self.dtype, fused
                )
            return sizes[layer]

        def prep(layer, expert, payloads):
            return prepare_expert(r, r.expert(layer, expert), payloads, self.dtype, fused)  # noqa: E731

        self.executor = LocalExecutor(
            self.store, self.cache, prep, lambda layer, e: self.level, expert_size
        )
        self.weights = ResidentWeights(r, self.dtype, fused)
        self.model = build_model(r.family, r.config, self.weights, self.executor)
        self.weights.drop_page_cache()
        self.stats = RunStats()

    @property
    def tokenizer(self) -> Tokenizer:
        """The file's tokenizer (loaded on first use: token-id callers never need it)."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.reader)
        return self._tokenizer

    # ---- prompts
    def _ids(self, prompt, chat: bool) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.tokenizer.chat(prompt)
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("the prompt is empty", "give a non-empty --prompt")
        if chat:
            return self.tokenizer.chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def _forward(self, tokens, cache, valid=None):
        """One forward pass; under device emulation its compute (not its I/O wait) is stretched."""
        if self.slowdown is None:
            return self.model.forward(tokens, cache, valid)
        t0, io0 = time.perf_counter(), self.executor.io_wait_s
        h = self.model.forward(tokens, cache, valid)
        self.slowdown.after(time.perf_counter() - t0 - (self.executor.io_wait_s - io0))
        return h

    # ---- generation
    def stream_batch(
        self,
        prompts: list,
        max_tokens: int = 128,
        sampling: Sampling | None = None,
        stop: tuple[str, ...] = (),
        chat: bool = False,
    ) -> Iterator[list[str]]:
        """Yield, after every step, the new text of each sequence since the last yield."""
        s = sampling or Sampling()
        ids = [self._ids(p, chat) for p in prompts]
        if len(ids) > self.batch:
            raise BadRequest(
                f"{len(ids)} prompts but the budget was planned for a batch of {self.batch}",
                f"pass --batch {len(ids)}",
            )
        longest = max(len(x) for x in ids)
        if longest + max_tokens > self.ctx:
            raise BadRequest(
                f"prompt ({longest} tokens) + --max-tokens {max_tokens} exceed the context of {self.ctx}",
                "shorten the prompt, lower --max-tokens or raise --ctx",
            )
        b = len(ids)
        gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        tokens = torch.zeros(b, longest, dtype=torch.int64)
        valid = torch.zeros(b, longest, dtype=torch.bool)
        for i, x in enumerate(ids):
            tokens[i, longest - len(x) :] = torch.tensor(x)
            valid[i, longest - len(x) :] = True
        cache = self.model.new_cache(b, longest + max_tokens)
        st = self.stats = RunStats(prompt_tokens=sum(map(len, ids)))
        t0 = time.perf_counter()
        with torch.inference_mode():
            for a in range(0, longest, PREFILL_CHUNK):
                h = self._forward(
                    tokens[:, a : a + PREFILL_CHUNK], cache, valid[:, a : a + PREFILL_CHUNK]
                )
            logits = self.model.logits(h[:, -1])
            st.prefill_s = time.perf_counter() - t0
            out: list[list[int]] = [[] for _ in range(b)]
            shown = [""] * b
            done = [False] * b
            t1 = time.perf_counter()
            read0, hits0, miss0 = self.store.bytes_read, self.cache.hits, self.cache.misses
            for step in range(max_tokens):
                nxt = sample(logits, s, gen)
                if step == 0:
                    st.ttft_s = time.perf_counter() - t0
                pieces = []
                for i in range(b):
                    if done[i]:
                        pieces.append("")
                        continue
                    t = int(nxt[i])
                    if t in self.tokenizer.eos_ids:
                        done[i] = True
                        pieces.append("")
                        continue
                    out[i].append(t)
                    st.new_tokens += 1
                    text = self.tokenizer.decode(out[i])
                    cut = min((text.find(x) for x in stop if x and x in text), default=-1)
                    if cut >= 0:
                        text, done[i] = text[:cut], True
                    elif text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
                        pieces.append("")
                        continue
                    pieces.append(text[len(shown[i]) :])
                    shown[i] = text
                yield pieces
                if all(done) or step == max_tokens - 1:
                    break
                h = self._forward(nxt[:, None], cache)
                logits = self.model.logits(h[:, -1])
            st.decode_s = time.perf_counter() - t1
            st.extra = {
                "decode_read": int(self.store.bytes_read - read0),
                "decode_hits": self.cache.hits - hits0,
                "decode_misses": self.cache.misses - miss0,
                "batch": b,
                "ctx_used": cache.length,
            }

    def stream(self, prompt, **kw) -> Iterator[str]:
        """New text of one prompt, piece by piece."""
        for pieces in self.stream_batch([prompt], **kw):
            if pieces[0]:
                yield pieces[0]

    def generate(
        self, prompt, max_tokens: int = 128, sampling: Sampling | None = None, stop=(), chat=False
    ):
        """The completion of one prompt (str), or of each of a list of prompts (list[str])."""
        many = isinstance(prompt, list) and not (prompt and isinstance(prompt[0], dict))
        prompts = prompt if many else [prompt]
        texts = [""] * len(prompts)
        for pieces in self.stream_batch(prompts, max_tokens, sampling, tuple(stop), chat):
            texts = [t + p for t, p in zip(texts, pieces)]
        return texts if many else texts[0]

    # ---- reporting
    def summary(self) -> dict:
        st, p = self.stats, self.plan
        decode_tokens = max(0, st.new_tokens - 1)
        peak = Bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {
            "model": str(self.path),
            "family": self.reader.family,
            "dtype": str(self.dtype).replace("torch.", ""),
            "level": self.level,
            "prompt_tokens": st.prompt_tokens,
            "new_tokens": st.new_tokens,
            "prefill_tok_s": st.prompt_tokens / st.prefill_s if st.prefill_s else 0.0,
            "decode_tok_s": decode_tokens / st.decode_s if st.decode_s and decode_tokens else 0.0,
            "ttft_s": st.ttft_s,
            "hit_rate": self.cache.hit_rate,
            "expert_reads": self.executor.expert_reads,
            "bytes_read": int(self.store.bytes_read),
            "o_direct": self.store.direct,
            "peak_rss": int(peak),
            "budget": None if self.mem is None else int(self.mem),
            "floor": int(p.floor),
            "expert_cache": int(p.expert_cache),
            "expert_slots": round(p.expert_slots, 1),
            "all_experts": int(p.all_experts),
            "device": self.device.name if self.device else None,
            "bound_tok_s": self._bound(),
            "plan": p.as_dict(),
        }

    def _bound(self) -> float | None:
        """The decode bound for this run's measured misses, on the emulated device (None without one)."""
        st, steps = self.stats, max(0, self.stats.new_tokens - 1)
        if self.device is None or not steps or not st.extra:
            return None
        from edgemoe.bound import measured_bound
        from edgemoe.planning import model_facts

        b = st.extra["batch"]
        facts = model_facts(self.reader, self.dtype, b, st.extra["ctx_used"])
        steps = max(1, steps // b)
        uses = st.extra["decode_hits"] + st.extra["decode_misses"]
        return measured_bound(
            self.plan,
            moe_layers=facts["moe_layers"],
            top_k=facts["top_k"],
            kv_bytes_per_token=facts["kv_bytes_per_token"],
            hit_rate=st.extra["decode_hits"] / uses if uses else 1.0,
            flash_bytes_per_step=st.extra["decode_read"] / steps,
            memory_bandwidth=self.device.memory_bandwidth,
            flash_rand_read=self.device.flash_rand_read,
            batch=b,
            lookup_only=facts["lookup_only"],
        ).tokens_per_s

    def summary_line(self) -> str:
        s = self.summary()
        budget_s = "unlimited" if s["budget"] is None else str(Bytes(s["budget"]))
        vs = f" (bound {s['bound_tok_s']:.0f} on {s['device']})" if s["bound_tok_s"] else ""
        return (
            f"prefill {s['prefill_tok_s']:.1f} tok/s | decode {s['decode_tok_s']:.1f} tok/s{vs} | "
            f"TTFT {s['ttft_s']:.2f} s | expert hits {100 * s['hit_rate']:.0f}% | "
            f"read {Bytes(s['bytes_read'])} from flash | peak {Bytes(s['peak_rss'])} of {budget_s} "
            f"(floor {Bytes(s['floor'])}, expert cache {Bytes(s['expert_cache'])} = {s['expert_slots']} experts)"
        )

    def close(self) -> None:
        self.store.close()
        self.reader.close()


def load(path=None, mem=None, **kw) -> EdgeModel:
    """Open a .emoe inside a memory budget (see EdgeModel)."""
    return EdgeModel(path, mem, **kw)


__all__ = ["EdgeModel", "Sampling", "load"]
