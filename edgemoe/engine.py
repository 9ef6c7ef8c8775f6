"""The Python API: `edgemoe.load(path, mem=...)` and generation on it. The CLI is built on this.

m = edgemoe.load("model.emoe", mem="4GB")
print(m.generate("The capital of France is", max_tokens=32))
for piece in m.stream("Once upon a time"):
    print(piece, end="", flush=True)
c = m.complete([[1, 2, 3]], max_tokens=8, logprobs=2)[0]   # token ids in, ids and logprobs out
print(c.token_ids, c.logprobs, c.finish_reason, m.summary_line(c.stats))

An EdgeModel is the loaded model (weights, plan, executor, KV slots); a
generation's numbers live in the records and stats it returns (generate.py),
never on the model, so generations in several threads do not mix them up:
their forward passes take turns and each holds its own KV cache slots.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgemoe import budget, memcap, trace
from edgemoe.bits import BitPolicy, Fixed
from edgemoe.bits import make as bit_policy
from edgemoe.cache import DEFAULT_POLICY, POLICIES
from edgemoe.demo import DEMO
from edgemoe.facts import ModelFacts, resolve_dtype
from edgemoe.generate import Record, Request, SeqStats, stream
from edgemoe.kvcache import KVCache
from edgemoe.models import build_model, parse_args
from edgemoe.moe.api import ExecutorContext
from edgemoe.moe.executor import ExecutorStats, ExpertExecutor
from edgemoe.moe.schedule import UpgradeCost
from edgemoe.sampling import Sampling
from edgemoe.store import HUGE_SLABS_BELOW, ExpertStore, huge_slabs
from edgemoe.tokenizer import Tokenizer
from edgemoe.units import Bytes
from edgemoe.weights import ResidentWeights
from formats.constants import align_up
from formats.errors import EmoeError
from formats.reader import EmoeReader

__all__ = ["DEMO", "BadRequest", "Completion", "EdgeModel", "RunStats", "Sampling", "load"]


class BadRequest(EmoeError):
    """A bad argument to the Python API; `param` names it (the CLI maps it to its flag)."""

    fix = "see help(edgemoe.load)"

    def __init__(self, what: str, fix: str | None = None, param: str | None = None):
        super().__init__(what, fix)
        self.param = param


@dataclass
class RunStats:
    """One call's figures (a batch of sequences generated together)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    batch: int = 0
    ctx_used: int = 0
    executor: ExecutorStats = field(default_factory=ExecutorStats)  # the whole call
    decode_executor: ExecutorStats = field(default_factory=ExecutorStats)  # its decode steps


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None
    finish_reason: str
    stats: SeqStats


ExecutorFactory = Callable[[ExecutorContext], ExpertExecutor]


PREFETCH = ("off", "idle", "eager")

# The expert cache's slabs are made at load, in huge pages, when it holds HUGE_SLABS_BELOW to
# this share of the experts (EdgeModel._arena)
ARENA_BELOW = 0.5


class EdgeModel:
    """A .emoe loaded inside a memory budget.

    Args:
        path: the .emoe (default: the bundled demo model).
        mem: the budget ("4GB", Bytes, None for unlimited: every expert cached).
        ctx: the longest context (prompt + new tokens) to plan the KV cache for
            (default: the model's positions, at most 2048).
        batch: the most sequences generated at once (KV cache slots).
        dtype: "auto", "f32" or "bf16".
        level: the expert precision level to compute at (default: the highest stored); the
            same as bits="fixed:L".
        bits: a bit policy spec (edgemoe/bits.py: "fixed:L", "gate", "gate:q=0.7", ...): the
            level of each (token, chosen expert) pair; summary() reports the average bits per
            expert weight actually computed.
        threads: I/O threads.
        expert_cache: size the expert cache ("3MiB", or "33%" of all experts) instead of
            giving it all the room `mem` leaves (never more than that room): shows paging on
            any machine, and serves in-process studies, where the process floor keeps growing.
        device: emulate a device profile (devices/profiles/): its usable memory is the
            default budget, expert reads are throttled to its flash bandwidth and
            compute is slowed by its compute factor.
        executor: a factory given an ExecutorContext (reader, plan, store...) returning the
            ExpertExecutor to use (default: ExecutorContext.local, this machine's flash).
        policy: the expert cache's eviction policy ("lfu", "lru": edgemoe.cache.POLICIES).
        prefetch: each MoE layer predicts the next one's experts with that layer's router and
            hints the executor. "off" (False, the default) predicts nothing. "idle" reads the
            likeliest uncached one into room of its own while the disk would idle, and drops
            it unused (moe/local.py); where the cache holds every expert it is off. Measured on
            the bench model at the 50% cap it guessed 61-66% right but decoded 2% slower than
            off (6.87 against 7.00 tok/s, 5 repeats paired): its windows are the ~3 ms between
            a layer's last read and the next one's, and its room costs the cache one slot.
            "eager" (True) reads every predicted expert into the cache at once: measured, it
            read 1.5-2.4x the bytes for no speed-up (-23% at the 50% cap; on the demo it cost
            20% of decode speed).
        bound_device: a device profile (a name or a .profile path) the summary's decode bound
            is computed on, for the bytes the run moved, without emulating that device (the
            emulated device's by default).
        engine: "naive" runs the engine as it was before the fast path (LRU, no prefetch,
            experts copied out of the read buffer, every read's CRC checked), for comparison.
        replay: a .emoe whose recorded routing trace replaces this model's routers (a model
            with as many experts per layer and the same top-k; edgemoe/replay.py): a bench
            model then reads and hits as the trained model's real routing makes it.
    Raises:
        EmoeError (and subclasses): a bad file, an unknown family, a budget too small;
        BadRequest names the parameter (`err.param`).
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
        executor: ExecutorFactory | None = None,
        policy: str = DEFAULT_POLICY,
        prefetch: bool | str = "off",
        engine: str = "fast",
        bits: str | None = None,
        bound_device: str | None = None,
        replay=None,
    ):
        t_load = time.perf_counter()
        floor = budget.process_floor()
        self.device, throttle, self.slowdown = None, None, None
        # the device the summary's decode bound is computed for: the emulated one, or a profile
        # of this machine (`edgemoe profile`) when nothing is emulated
        self.bound_device = None
        if bound_device is not None:
            from devices.profile import load_profile

            self.bound_device = load_profile(bound_device)
        if device is not None:
            from devices.emulate import ComputeSlowdown, TokenBucket
            from devices.profile import load_profile

            self.device = load_profile(device)
            self.bound_device = self.bound_device or self.device
            mem = self.device.usable_memory if mem is None else mem
            throttle = TokenBucket(self.device.flash_rand_read).take
            self.slowdown = ComputeSlowdown(self.device.compute_factor)
        self.path = Path(path) if path else DEMO
        self.reader = r = EmoeReader(self.path, check_model=True)
        try:
            # D²MoE's budget rule (a policy that cuts experts to lower levels) frees the top
            # levels' bytes, which an expert computing on its read buffer cannot give back
            cuts = getattr(POLICIES.get(policy), "downgrade_first", False)
            self.facts = f = ModelFacts(
                r, parse_args(r.family, r.config), resolve_dtype(dtype, r), fused, not cuts
            )
        except EmoeError as e:
            if getattr(e, "param", None) == "dtype":
                raise BadRequest(str(e), param="dtype") from None
            raise
        self.dtype = f.dtype
        self.ctx = ctx if ctx is not None else min(f.max_positions, 2048)
        if not 1 <= self.ctx <= f.max_positions:
            raise BadRequest(
                f"ctx={self.ctx} is outside this model's 1..{f.max_positions} positions",
                f"use ctx={min(f.max_positions, 2048)} or less",
                "ctx",
            )
        if batch < 1:
            raise BadRequest(f"batch={batch}", "use a batch of at least 1", "batch")
        self.batch = batch
        if level is not None and not 1 <= level <= f.levels:
            raise BadRequest(
                f"level={level}: this file stores levels 1..{f.levels}",
                f"use level=1..{f.levels}",
                "level",
            )
        self.level = level or f.levels
        self.bits = self._bit_policy(bits, level)
        self.bits_name = self.bits.name if self.bits is not None else f"fixed:{self.level}"
        try:
            self.mem = None if mem is None else Bytes.parse(mem)
        except ValueError as e:
            raise BadRequest(
                f"mem={mem!r}: {e}", "pass mem like '4GB', '512MiB' or '0.5G'", "mem"
            ) from None
        if engine not in ("fast", "naive"):
            raise BadRequest(f"engine={engine!r}", "use engine='fast' or 'naive'", "engine")
        naive = engine == "naive"
        mixes = self.bits is not None and not isinstance(self.bits, Fixed)  # upgrades hold hits
        mode = {False: "off", True: "eager"}.get(prefetch, prefetch)
        if mode not in PREFETCH:
            raise BadRequest(
                f"prefetch={prefetch!r}", f"use one of {', '.join(PREFETCH)}", "prefetch"
            )
        if naive:
            policy, mode = "lru", "off"

        self.plan = budget.plan(
            f,
            self.mem,
            ctx=self.ctx,
            batch=batch,
            level=self.level,
            threads=threads,
            floor=floor,
            slotless=naive or mode == "eager" or mixes,
        )
        if expert_cache is not None:
            self.plan = dataclasses.replace(
                self.plan, expert_cache=self._cache_size(expert_cache, self.plan)
            )
        # read ahead where the cache cannot hold every expert, at one level (a policy that
        # mixes levels reads upgrades the read ahead could not take); its slab is the room
        # of an expert the cache gives up for it (ExpertCache.set_aside), none of its own
        ahead = mode == "idle" and not mixes and self.plan.expert_cache < self.plan.all_experts
        self.prefetch = "idle" if ahead else "eager" if mode == "eager" else "off"
        if policy not in POLICIES:
            raise BadRequest(
                f"policy={policy!r} is not a cache policy",
                f"use one of {sorted(POLICIES)}",
                "policy",
            )
        self._tokenizer: Tokenizer | None = None
        self.store = ExpertStore(r, threads=threads, throttle=throttle, check_every_read=naive)
        all_experts = self.plan.all_experts
        arena = self._arena(naive or mixes)
        self.store.huge_slabs = huge_slabs(
            self.plan.expert_cache / all_experts if all_experts else 1.0, arena is not None
        )
        self.arena_slabs = 0 if arena is None else arena[0]
        if arena is not None:
            self.store.reserve_slabs(*arena)
        context = ExecutorContext(
            r,
            self.plan,
            self.store,
            self.dtype,
            lambda layer, e: self.level,
            lambda layer: f.expert_nbytes(layer, self.level),
            fused,
            None if naive else f.borrows,
            policy,
            self.bits,
            lambda layer, level: f.expert_nbytes(layer, level),
            worth=self._upgrade_cost(),
        )
        self.executor = (executor or ExecutorContext.local)(context)
        self.weights = ResidentWeights(r, self.dtype, fused)
        self.model = build_model(r.family, f.args, self.weights, self.executor)
        if ahead and hasattr(self.executor, "ahead"):
            self.executor.ahead = True
        elif ahead:
            self.prefetch = "off"  # an executor of its own: hints it cannot read ahead
        for layer in self.model.layers:
            if hasattr(layer.mlp, "predict"):
                layer.mlp.predict = self.prefetch != "off"
        if replay is not None:
            self._replay(replay, r.config)
        self.weights.drop_page_cache()
        self._lock = threading.Lock()  # one forward pass at a time
        self.load_s = time.perf_counter() - t_load
        self._kv: KVCache | None = None
        self._free_slots = list(range(batch))

    def _replay(self, path, config: dict) -> None:
        from edgemoe.models.base import RoutedMoE
        from edgemoe.replay import RoutingReplay

        moes = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, RoutedMoE)]
        experts = len(self.reader.experts) // max(1, len(moes))
        rp = RoutingReplay.open(path, experts, int(config.get("num_experts_per_tok", 0)))
        self.model.replay = rp
        for i, moe in enumerate(moes):
            moe.replay, moe.moe_index = rp, i

    def _upgrade_cost(self) -> UpgradeCost | None:
        """Under device emulation, skip upgrades whose read would outlast the compute they serve
        (the device's flash speed and per-level expert times); else None: every upgrade."""
        if self.device is None:
            return None
        from edgemoe.planning import expert_ms

        r = self.reader
        width, hidden = r.tensors[next(iter(r.experts.values())).tensors["gate"]].shape

        def read_bytes(key, have: int, level: int) -> int:
            e = r.expert(*key)
            return sum(r.chunks[ci].length for ci in e.levels[have:level])

        ms = expert_ms(self.device.compute_factor, int(hidden), int(width))
        return UpgradeCost(read_bytes, float(self.device.flash_rand_read), ms)

    def _bit_policy(self, spec: str | None, level: int | None) -> BitPolicy | None:
        """The policy a spec names; None for one level everywhere (the executor's level(),
        which costs nothing per layer)."""
        if spec is None:
            return None
        if level is not None:
            raise BadRequest(
                f"level={level} and bits={spec!r} both given",
                f"use bits='fixed:{level}' or level={level} alone",
                "bits",
            )
        try:
            return bit_policy(spec, self.reader)
        except ValueError as e:
            raise BadRequest(str(e), "use bits='fixed:L' or 'gate:q=0.5'", "bits") from None

    def _arena(self, varied: bool) -> tuple[int, int] | None:
        """(slabs, bytes each) of the expert cache to make at load (store.reserve_slabs), or
        None: where the expert cache holds HUGE_SLABS_BELOW to ARENA_BELOW of the experts
        and every expert is read in place into a slab of one size (one level, not naive).
        EDGEMOE_ARENA=0 or 1 decides instead (1: whatever the share).

        Measured on the bench model (cold, in a cgroup equal to the cap, 4 repeats paired):
        at the 50% cap (the cache holds 32% of the experts) decode 7.40 against 6.85 tok/s
        and prefill 74.0 against 66.9, for a load of 0.45-2.4 s against 0.33-0.76 (2 MiB
        pages this VM must fault from its host). At the 25% cap (6%), where slabs are in
        huge pages already and each is read about 3 times a token: 3.71 against 3.69 and
        66.5 against 67.4 (3 repeats), so the load is not paid there."""
        env = os.environ.get("EDGEMOE_ARENA")
        p, f, r = self.plan, self.facts, self.reader
        if env == "0" or varied or p.expert_cache >= p.all_experts:
            return None
        share = p.expert_cache / p.all_experts
        if env != "1" and not HUGE_SLABS_BELOW <= share < ARENA_BELOW:
            return None  # below, slabs are in huge pages anyway, and each is read often
        fixed = self.bits.level if isinstance(self.bits, Fixed) else None
        level = fixed or self.level  # the level every read is at
        spans, sizes = set(), set()
        for e in r.experts.values():
            if not f.borrows(e.layer, e.expert, level):
                return None
            spans.add(align_up(r.expert_span(e.layer, e.expert, level)[1]))  # a read's slab
            sizes.add(f.expert_nbytes(e.layer, level))
        if len(spans) != 1:
            return None
        return min(len(r.experts), int(p.expert_cache // max(sizes))), spans.pop()

    def _cache_size(self, size, p: budget.Plan) -> Bytes:
        """The expert cache `size` asks for, within plan p's room."""
        try:
            if isinstance(size, str) and size.strip().endswith("%"):
                want = Bytes(int(p.all_experts * float(size.strip()[:-1]) / 100))
            else:
                want = Bytes.parse(size)
        except ValueError as e:
            raise BadRequest(
                f"expert_cache={size!r}: {e}",
                "pass a size like '3MiB' or a share like '33%'",
                "expert_cache",
            ) from None
        if want < p.largest_expert:
            raise BadRequest(
                f"expert_cache={size!r} is {want}, less than one expert ({p.largest_expert})",
                f"pass expert_cache={budget.as_flag_value(p.largest_expert)} or more",
                "expert_cache",
            )
        return want if self.mem is None else Bytes(min(want, p.expert_cache))

    @property
    def tokenizer(self) -> Tokenizer:
        """The file's tokenizer (loaded on first use: token-id callers never need it)."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.reader)
        return self._tokenizer

    # ---- what generate.py steps on
    def forward(self, tokens, cache, valid=None, slots=None) -> torch.Tensor:
        """One forward pass (passes from several threads take turns); under device
        emulation its compute, not its I/O wait, is stretched."""
        with (
            self._lock,
            torch.inference_mode(),
            trace.span("forward", "step", tokens=tokens.numel()),
        ):
            if self.slowdown is None:
                return self.model.forward(tokens, cache, valid, slots)
            t0, io0 = time.perf_counter(), self.executor.stats().io_wait_s
            h = self.model.forward(tokens, cache, valid, slots)
            io = self.executor.stats().io_wait_s - io0
            self.slowdown.after(time.perf_counter() - t0 - io)
            return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.logits(hidden)

    def executor_stats(self) -> ExecutorStats:
        return self.executor.stats()

    def kv_cache(self) -> KVCache:
        """The KV cache the plan counted: `batch` slots of `ctx` positions (made on first use)."""
        with self._lock:
            if self._kv is None:
                self._kv = self.model.new_cache(self.batch, self.ctx)
            return self._kv

    def take_slots(self, n: int) -> list[int]:
        """Reserve n KV slots for sequences; give them back with free_slots."""
        with self._lock:
            if n > len(self._free_slots):
                raise BadRequest(
                    f"{n} sequences at once, but {len(self._free_slots)} of the {self.batch} this "
                    "model was loaded for are free",
                    f"load with batch={self.batch - len(self._free_slots) + n} or more",
                    "batch",
                )
            taken, self._free_slots = self._free_slots[:n], self._free_slots[n:]
            return taken

    def free_slots(self, slots: list[int]) -> None:
        with self._lock:
            self._free_slots += slots

    # ---- prompts
    def encode(self, prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt: text, token ids (list of int) or chat messages (list of dict)."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = self.facts.args.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise BadRequest(
                    f"prompt token id {bad[0]} is outside the vocabulary 0..{vocab - 1}",
                    "pass token ids this model's tokenizer makes",
                    "prompt",
                )
            return list(prompt)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.tokenizer.chat(prompt)
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("the prompt is empty", "give a non-empty prompt", "prompt")
        if chat:
            return self.tokenizer.chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def _requests(self, prompts, max_tokens, sampling, stop, chat, logprobs) -> list[Request]:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(
                f"max_tokens={max_tokens!r}", "ask for at least 1 new token", "max_tokens"
            )
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= 20):
            raise BadRequest(f"logprobs={logprobs!r}", "use None or 0..20", "logprobs")
        s = sampling or Sampling()
        reqs = []
        for p in prompts:
            ids = self.encode(p, chat)
            if len(ids) + max_tokens > self.ctx:
                raise BadRequest(
                    f"prompt ({len(ids)} tokens) + max_tokens={max_tokens} exceed the context of {self.ctx}",
                    "shorten the prompt, lower max_tokens or load with a larger ctx",
                    "max_tokens",
                )
            reqs.append(Request(tuple(ids), max_tokens, s, tuple(stop), logprobs))
        return reqs

    # ---- generation
    def records(
        self,
        prompts: list,
        max_tokens: int = 128,
        sampling: Sampling | None = None,
        stop=(),
        chat: bool = False,
        logprobs: int | None = None,
        stats: RunStats | None = None,
    ) -> Iterator[list[Record]]:
        """Generate several prompts together; yield each step's records (generate.Record).

        stats: a RunStats to fill in with this call's figures.
        """
        if not prompts:
            raise BadRequest("no prompts", "give at least one prompt", "prompt")
        reqs = self._requests(prompts, max_tokens, sampling, stop, chat, logprobs)
        st = stats if stats is not None else RunStats()
        st.prompt_tokens, st.batch = sum(len(r.ids) for r in reqs), len(reqs)
        cache = self.kv_cache()
        slots = self.take_slots(len(reqs))
        e0 = self.executor.stats()
        t0 = time.perf_counter()
        d0 = None
        try:
            for step, recs in enumerate(stream(self, cache, reqs, slots, self.tokenizer)):
                if step == 0:
                    st.prefill_s = st.ttft_s = time.perf_counter() - t0
                    d0, t1 = self.executor.stats(), time.perf_counter()
                st.new_tokens += sum(r.token is not None for r in recs)
                yield recs
        finally:
            self.free_slots(slots)
            if d0 is not None:
                st.decode_s = time.perf_counter() - t1
                st.decode_executor = self.executor.stats() - d0
            st.executor = self.executor.stats() - e0
            st.ctx_used = max((int(cache.lengths[s]) for s in slots), default=0)

    def stream_batch(
        self,
        prompts: list,
        max_tokens: int = 128,
        sampling=None,
        stop=(),
        chat=False,
        stats: RunStats | None = None,
    ) -> Iterator[list[str]]:
        """Yield, after every step, the new text of each prompt since the last yield."""
        index: dict[int, int] = {}
        for recs in self.records(prompts, max_tokens, sampling, stop, chat, None, stats):
            pieces = [""] * len(prompts)
            for r in recs:
                i = index.setdefault(id(r.seq), len(index))
                pieces[i] += r.text
            yield pieces

    def stream(self, prompt, **kw) -> Iterator[str]:
        """New text of one prompt, piece by piece."""
        for pieces in self.stream_batch([prompt], **kw):
            if pieces[0]:
                yield pieces[0]

    def complete(
        self,
        prompts: list,
        max_tokens: int = 128,
        sampling=None,
        stop=(),
        chat=False,
        logprobs: int | None = None,
        stats: RunStats | None = None,
    ) -> list[Completion]:
        """Each prompt's completion with its token ids, logprobs (if asked) and stats."""
        seqs: dict[int, object] = {}
        tops: dict[int, list] = {}
        for recs in self.records(prompts, max_tokens, sampling, stop, chat, logprobs, stats):
            for r in recs:
                seqs.setdefault(id(r.seq), r.seq)
                if r.top_logprobs is not None and r.token is not None:
                    tops.setdefault(id(r.seq), []).append(r.top_logprobs)
        out = []
        for key, s in seqs.items():
            out.append(
                Completion(
                    s.text,
                    list(s.out),
                    list(s.logprobs) if logprobs is not None else None,
                    tops.get(key) if logprobs else None,
                    s.finish_reason,
                    s.stats,
                )
            )
        return out

    def generate(
        self,
        prompt,
        max_tokens: int = 128,
        sampling: Sampling | None = None,
        stop=(),
        chat=False,
        stats: RunStats | None = None,
    ):
        """The completion of one prompt (str, token ids, or chat messages), or of each of a list
        of prompts (list[str] or list[list[int]])."""
        many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts = prompt if many else [prompt]
        texts = [
            c.text for c in self.complete(prompts, max_tokens, sampling, stop, chat, None, stats)
        ]
        return texts if many else texts[0]

    # ---- reporting
    def summary(self, stats: RunStats | None = None) -> dict:
        """A run's numbers (stats from records/stream_batch/complete), or, without stats, the
        model's totals since load (expert traffic, memory) with no per-run rates."""
        st, p = stats or RunStats(), self.plan
        ex = st.executor if stats is not None else self.executor.stats()
        decode_tokens = max(0, st.new_tokens - st.batch)
        rss = memcap.own_rss_peak()
        capped = memcap.own_peak()  # under a cap, what the cap counts (page cache included)
        return {
            "model": str(self.path),
            "family": self.reader.family,
            "dtype": str(self.dtype).replace("torch.", ""),
            "level": self.level,
            "bits_policy": self.bits_name,
            "average_bits": ex.average_bits,
            "prompt_tokens": st.prompt_tokens,
            "new_tokens": st.new_tokens,
            "prefill_tok_s": st.prompt_tokens / st.prefill_s if st.prefill_s else 0.0,
            "decode_tok_s": decode_tokens / st.decode_s if st.decode_s and decode_tokens else 0.0,
            "ttft_s": st.ttft_s,
            "load_s": self.load_s,
            "hit_rate": ex.hit_rate,
            "expert_reads": ex.reads,
            "bytes_read": ex.bytes_read,
            "io_wait_s": ex.io_wait_s,
            "prefetch": self.prefetch,
            "prefetch_issued": ex.prefetch_issued,
            "prefetch_used": ex.prefetch_used,
            "prefetch_bytes_wasted": ex.prefetch_bytes_wasted,
            "prediction_accuracy": ex.prediction_accuracy,
            "o_direct": self.store.direct,
            "peak_rss": int(rss),
            "peak": int(capped if capped is not None else rss),
            "peak_source": "cgroup" if capped is not None else "VmHWM",
            "budget": None if self.mem is None else int(self.mem),
            "floor": int(p.floor),
            "expert_cache": int(p.expert_cache),
            "expert_slots": round(p.expert_slots, 1),
            "arena_slabs": self.arena_slabs,
            "all_experts": int(p.all_experts),
            "device": self.device.name if self.device else None,
            **self._bound(st if stats is not None else None),
            "bound_device": self.bound_device.name if self.bound_device else None,
            "plan": p.as_dict(),
        }

    def _bound(self, st: RunStats | None) -> dict:
        """The decode bound for a run's measured misses, on the emulated device: its tokens/s
        and the bytes per decode step it moves from memory and from flash (None without a
        device; the bench re-rates them with the rates measured around the run)."""
        dev = self.bound_device
        keys = ("bound_tok_s", "bound_memory_bytes_per_step", "bound_flash_bytes_per_step")
        if dev is None or st is None or st.batch == 0 or st.new_tokens <= st.batch:
            return dict.fromkeys(keys)
        from edgemoe.bound import measured_bound

        f, d = self.facts, st.decode_executor
        steps = max(1, (st.new_tokens - st.batch) // st.batch)
        b = measured_bound(
            self.plan,
            moe_layers=len(f.moe_layers),
            top_k=f.top_k,
            kv_bytes_per_token=f.kv_bytes(st.batch, st.ctx_used),
            hit_rate=d.hit_rate,
            flash_bytes_per_step=d.bytes_read / steps,
            memory_bandwidth=dev.memory_bandwidth,
            flash_rand_read=dev.flash_rand_read,
            flash_seq_read=dev.flash_seq_read,
            batch=st.batch,
            lookup_only=f.lookup_only,
        )
        return dict(zip(keys, (b.tokens_per_s, b.memory_bytes, b.flash_bytes)))

    def summary_line(self, stats: RunStats | None = None) -> str:
        s = self.summary(stats)
        budget_s = "unlimited" if s["budget"] is None else str(Bytes(s["budget"]))
        on = self.bound_device.name if self.bound_device else s["device"]
        vs = f" (bound {s['bound_tok_s']:.0f} on {on})" if s["bound_tok_s"] else ""
        avg = s["average_bits"]
        bits = "" if avg is None else f"{avg:.2f} bits/weight ({s['bits_policy']}) | "
        return (
            f"prefill {s['prefill_tok_s']:.1f} tok/s | decode {s['decode_tok_s']:.1f} tok/s{vs} | "
            f"TTFT {s['ttft_s']:.2f} s (load {s['load_s']:.1f} s) | expert hits {100 * s['hit_rate']:.0f}% | {bits}"
            f"read {Bytes(s['bytes_read'])} from flash | peak {Bytes(s['peak'])} of {budget_s} "
            f"(floor {Bytes(s['floor'])}, expert cache {Bytes(s['expert_cache'])} = {s['expert_slots']} experts)"
        )

    def close(self) -> None:
        self.executor.close()
        self.store.close()
        self.reader.close()

    def __enter__(self) -> EdgeModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path=None, mem=None, **kw) -> EdgeModel:
    """Open a .emoe inside a memory budget (see EdgeModel)."""
    return EdgeModel(path, mem, **kw)
