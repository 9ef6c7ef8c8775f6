"""The decode-speed bound: bytes that must move per token over the bandwidths that move them.

    t(token) = (resident + KV + cached expert bytes touched) / memory bandwidth
             + missed expert bytes / flash bandwidth
    bound    = 1 / t(token)

The flash bandwidth is the profile's random-read rate (its slowest read size), or its
sequential rate (32 MiB reads into huge pages) when one expert is a read of 4 MiB or more: an
expert's levels lie back to back on disk, so a miss is one large read, which the disk serves
at its sequential rate (measured here: a 33 MiB INT8 expert at 1.7 GB/s against 1.27 GB/s for
256 KiB random reads; with the random rate a measured speed came out above the "bound").
`edgemoe bench` measures that rate as such reads are made, reads of the file's largest expert
at random places over the whole file (bench/runners.py fresh_bound): sequential 32 MiB reads
of one region ran 4-25% faster than those in the same minute.

Before a run the expected hits and misses per step come from the cache size
and the file's routing trace, replayed through the runtime's cache protocol
(edgemoe/routing.py). A file with no trace falls back to routing with no
locality: uniform over a layer's experts, where an LRU cache of C expert
slots over N experts hits with probability C / N. After a run the measured
bytes read replace the guess. Compute is not in the bound: it is the ceiling
that I/O alone allows, and a measured speed above it means the bound is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgemoe.budget import Plan
from edgemoe.routing import Expected


@dataclass(frozen=True)
class Bound:
    tokens_per_s: float
    memory_bytes: float  # per token, from memory
    flash_bytes: float  # per token, from flash
    hit_rate: float

    def as_dict(self) -> dict:
        return {
            "bound_tok_s": self.tokens_per_s,
            "memory_bytes_per_token": self.memory_bytes,
            "flash_bytes_per_token": self.flash_bytes,
            "hit_rate": self.hit_rate,
        }


def expected_bound(
    plan: Plan,
    *,
    moe_layers: int,
    experts_per_layer: int,
    top_k: int,
    kv_bytes_per_token: float,
    memory_bandwidth: float,
    flash_rand_read: float,
    batch: int = 1,
    lookup_only: int = 0,
    uses: Expected | None = None,
    flash_seq_read: float | None = None,
) -> Bound:
    """The bound for one decode step of `batch` sequences, before any run.

    lookup_only: resident bytes a step does not read whole (the embedding table: one row per token).
    uses: expert hits and misses per step from the file's routing trace (uniform routing if None).
    """
    if uses is None:
        n = moe_layers * experts_per_layer
        hit = min(1.0, plan.expert_slots / n) if n else 1.0
        touched = moe_layers * min(
            experts_per_layer, top_k * batch
        )  # distinct experts a step needs
        uses = Expected(touched * hit, touched * (1 - hit), 0, 0)
    expert = plan.largest_expert
    mem = plan.resident - lookup_only + kv_bytes_per_token + uses.hits * expert
    flash = uses.misses * expert
    rate = flash_rate(flash_rand_read, flash_seq_read, expert)
    return _bound(mem, flash, memory_bandwidth, rate, uses.hit_rate, batch)


def measured_bound(
    plan: Plan,
    *,
    moe_layers: int,
    top_k: int,
    kv_bytes_per_token: float,
    hit_rate: float,
    flash_bytes_per_step: float,
    memory_bandwidth: float,
    flash_rand_read: float,
    batch: int = 1,
    lookup_only: int = 0,
    flash_seq_read: float | None = None,
) -> Bound:
    """The bound for a finished run: its measured hit rate and bytes read per decode step."""
    touched = moe_layers * top_k * batch
    mem = (
        plan.resident - lookup_only + kv_bytes_per_token + touched * hit_rate * plan.largest_expert
    )
    rate = flash_rate(flash_rand_read, flash_seq_read, plan.largest_expert)
    return _bound(mem, flash_bytes_per_step, memory_bandwidth, rate, hit_rate, batch)


def rerated(
    memory_bytes: float,
    flash_bytes: float,
    *,
    memory_bandwidth: float,
    flash_rand_read: float,
    flash_seq_read: float | None,
    read_bytes: int,
    batch: int = 1,
) -> float:
    """A finished run's bound (its bytes per step from memory and from flash, as its summary
    gives them) on other rates: tokens/s."""
    rate = flash_rate(flash_rand_read, flash_seq_read, read_bytes)
    return _bound(memory_bytes, flash_bytes, memory_bandwidth, rate, 0.0, batch).tokens_per_s


SEQUENTIAL_READ = 4 << 20  # reads this large are served at the profile's flash_seq_read


def flash_rate(flash_rand_read: float, flash_seq_read: float | None, read_bytes: int) -> float:
    """The flash bandwidth for reads of read_bytes (see the module doc)."""
    if flash_seq_read and read_bytes >= SEQUENTIAL_READ:
        return max(flash_rand_read, flash_seq_read)
    return flash_rand_read


def _bound(mem, flash, mem_bw, flash_bw, hit, batch) -> Bound:
    t = mem / mem_bw + flash / flash_bw
    return Bound(batch / t if t > 0 else float("inf"), mem, flash, hit)
