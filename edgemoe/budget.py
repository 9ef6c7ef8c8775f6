"""The memory planner: split a budget into floor, resident weights, KV cache,
I/O buffers, workspace and the expert cache.

The budget is everything the process uses, as a phone's memory killer sees
it. The floor is measured, not assumed: the process's resident set after its
imports, file-backed library pages included (a bare `import torch` fills
~200 MB of a fresh cgroup), so the plan holds even when the libraries are
not already in the page cache. If the budget cannot hold the floor, the
resident weights, the KV cache, the I/O buffers, the workspace and the
largest expert, the planner refuses before anything is loaded and says the
smallest budget that works.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import psutil
import torch

from edgemoe.kernels import kernel_for
from edgemoe.units import Bytes
from formats.errors import EmoeError
from formats.reader import EmoeReader

# Python heap, allocator slack and torch's per-op scratch not covered by the workspace term.
MARGIN = Bytes.parse("24MiB")


class BudgetTooSmall(EmoeError):
    fix = "raise mem"
    param = "mem"


@dataclass(frozen=True)
class Plan:
    budget: Bytes | None
    floor: Bytes
    resident: Bytes
    kv_cache: Bytes
    io_buffers: Bytes
    workspace: Bytes
    expert_cache: Bytes
    largest_expert: Bytes
    all_experts: Bytes

    @property
    def fixed(self) -> Bytes:
        return (
            self.floor + self.resident + self.kv_cache + self.io_buffers + self.workspace + MARGIN
        )

    @property
    def minimum(self) -> Bytes:
        """The smallest budget that runs: everything fixed plus one expert slot."""
        return self.fixed + self.largest_expert

    @property
    def expert_slots(self) -> float:
        return self.expert_cache / max(1, self.largest_expert)

    def as_dict(self) -> dict:
        d = {k: int(v) if isinstance(v, int) else v for k, v in asdict(self).items()}
        d.update(minimum=int(self.minimum), expert_slots=round(self.expert_slots, 2))
        return d


def process_floor() -> Bytes:
    """This process's resident set now (anonymous + file-backed pages)."""
    return Bytes(psutil.Process().memory_info().rss)


def expert_nbytes(
    reader: EmoeReader, layer: int, expert: int, level: int, dtype: torch.dtype, fused: bool = True
) -> int:
    e = reader.expert(layer, expert)
    return sum(
        kernel_for(t.codec).nbytes(t.shape, t.params, level, dtype, fused)
        for t in (reader.tensors[n] for n in e.tensors.values())
    )


def resident_nbytes(reader: EmoeReader, dtype: torch.dtype, fused: bool = True) -> Bytes:
    expert_names = {n for e in reader.experts.values() for n in e.tensors.values()}
    total = 0
    for name, t in reader.tensors.items():
        if name in expert_names:
            continue
        # embeddings are looked up, not multiplied, and MLA's kv_b is split and absorbed
        # into the query and output (models/deepseek_v2.py): both dense in the compute dtype
        dense = name.endswith(("embed_tokens.weight", "kv_b_proj.weight"))
        if len(t.shape) == 2:
            kernel = kernel_for(t.codec)
            total += kernel.nbytes(t.shape, t.params, t.levels, dtype, fused and not dense)
        else:  # decoded whole (ResidentWeights.tensor): 1-D norms and biases in float32
            item = 4 if len(t.shape) == 1 else torch.empty((), dtype=dtype).element_size()
            total += item * math.prod(int(d) for d in t.shape)
    return Bytes(total)


def as_flag_value(n: Bytes | int) -> str:
    """n rounded up to a whole MiB, as one shell word that parses back to at least n."""
    mib = 1024 * 1024
    return f"{-(-int(n) // mib)}MiB"


def plan(
    facts,
    mem: Bytes | None,
    *,
    ctx: int,
    batch: int,
    level: int | None = None,
    threads: int = 2,
    prefill_chunk: int = 512,
    floor: Bytes | None = None,
    slotless: bool = True,
) -> Plan:
    """Split `mem` (None: unlimited, every expert cached) for one file's ModelFacts.

    slotless: whether a read may find no slot and go without one (moe/schedule.py): only
        when the cache's room is held, by hits waiting on their upgrades (a bit policy that
        mixes levels) or by prefetches. With one level and no prefetch, every later wave
        evicts what this layer released, so in place no read goes without a slot and the
        I/O term is zero: the room is the cache's.

    Raises:
        BudgetTooSmall: naming the smallest budget that works (rounded up, so it does).
    """
    cfg, r = facts.reader.config, facts.reader
    floor = floor if floor is not None else process_floor()
    resident = Bytes(facts.resident_bytes)
    kv = Bytes(facts.kv_bytes(batch, ctx))
    sizes = [facts.expert_nbytes(e.layer, level or len(e.levels)) for e in r.experts.values()]
    largest = Bytes(max(sizes, default=0))
    # per reader thread: its aligned read buffer and the payloads copied out of it (the expert
    # prepared from them fills a reserved cache slot, counted in the expert cache). Experts
    # computed in place are read straight into their slot's slab: a thread then holds at most
    # one slab of its own, for an expert read without a slot (no room that is not held)
    borrow = all(
        facts.borrows(e.layer, e.expert, level or len(e.levels)) for e in r.experts.values()
    )
    d, vocab = cfg["hidden_size"], cfg["vocab_size"]
    n_heads = cfg.get("num_attention_heads", 1)
    width = max(cfg.get("intermediate_size", 0) or 0, cfg.get("moe_intermediate_size", 0) or 0)
    per_thread = facts.largest_span() if borrow else (facts.largest_span() + 4096) * 2
    if not borrow:
        # building one expert's kernels on a reader thread: unpacked codes, the int32 copies
        # torch's int4 packer takes, float32 decodes (Kernel.build_scratch; measured 78 MiB for
        # a 5632x2048 mwq 2-3-4 expert at level 3 on int4 parts, none computed as stored)
        per_thread += facts.build_scratch
    # one expert computed without a slot (moe/schedule.py: its room held by hits waiting on
    # their upgrades, or by prefetches), one at a time; in place, it is a thread's slab above
    io = Bytes(
        0 if borrow and not slotless else threads * per_thread + (0 if borrow else int(largest))
    )
    tokens = batch * min(ctx, prefill_chunk)
    # activations of one prefill chunk (hidden, q/k/v, MLP width, attention scores) and the logits
    workspace = Bytes(
        4 * (tokens * (12 * d + 4 * width) + batch * n_heads * min(ctx, prefill_chunk) * ctx)
        + 4 * batch * vocab * 2
    )
    all_experts = Bytes(sum(sizes))
    fixed = floor + resident + kv + io + workspace + MARGIN
    if mem is None:
        cache = all_experts
    else:
        cache = Bytes(max(0, int(mem) - int(fixed)))
        if cache < largest:
            need = as_flag_value(fixed + largest)
            raise BudgetTooSmall(
                f"a budget of {mem} cannot run this model: the process floor {floor}, resident weights "
                f"{resident}, KV cache {kv} ({batch} x {ctx} tokens), I/O buffers {io} and workspace "
                f"{workspace + MARGIN} need {fixed}, plus {largest} for one expert; the smallest budget "
                f"that works is {need}",
                f"pass mem={need} or more, or a shorter ctx or smaller batch",
            )
        cache = Bytes(min(cache, all_experts))
    return Plan(mem, floor, resident, kv, io, workspace, cache, largest, all_experts)
