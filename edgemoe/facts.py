"""What a model file implies, in one place: read once, passed down.

The compute dtype, the MoE shape, KV bytes per token, expert bytes per level,
resident bytes: the engine, the planner, the bound and `edgemoe plan` all
take these figures from one `ModelFacts`, so they cannot disagree. Geometry
comes from the family's parsed `ModelArgs` (its `kv_dims()`); this module
does not import model code, the caller parses the args.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from edgemoe.budget import expert_nbytes, resident_nbytes
from edgemoe.kvcache import kv_nbytes
from edgemoe.prepare import borrowed_bytes, can_borrow
from formats.constants import align_up
from formats.errors import EmoeError
from formats.reader import EmoeReader

DTYPES = {
    "f32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


class BadDtype(EmoeError):
    fix = "use dtype 'auto', 'f32' or 'bf16'"
    param = "dtype"


def resolve_dtype(name: str, reader: EmoeReader) -> torch.dtype:
    """ "auto": full precision files compute in f32, quantized ones in bf16 (the fused kernels')."""
    if name == "auto":
        full = all(t.codec.name == "f32" for t in reader.tensors.values())
        return torch.float32 if full else torch.bfloat16
    try:
        return DTYPES[name]
    except KeyError:
        raise BadDtype(f"unknown dtype {name!r}") from None


@dataclass(frozen=True)
class ModelFacts:
    """Figures of one .emoe at one compute dtype.

    Args:
        reader: the open file.
        args: the family's parsed ModelArgs (with kv_dims()).
        dtype: the compute dtype.
        fused: whether experts compute on fused quantized kernels (their bytes differ).
        borrow: whether experts may compute on their read buffers in place (False for a
            cache policy that cuts experts to lower levels: a borrowed buffer is freed whole).
    """

    reader: EmoeReader
    args: object
    dtype: torch.dtype
    fused: bool = True
    borrow: bool = True
    _sizes: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def family(self) -> str:
        return self.reader.family

    @property
    def n_layers(self) -> int:
        return self.args.num_hidden_layers

    @functools.cached_property
    def moe_layers(self) -> list[int]:
        return sorted({e.layer for e in self.reader.experts.values()})

    @property
    def experts_per_layer(self) -> int:
        return len(self.reader.experts) // max(1, len(self.moe_layers))

    @property
    def top_k(self) -> int:
        return self.reader.config["num_experts_per_tok"]

    @property
    def kv_dims(self) -> tuple[int, int, int]:
        return self.args.kv_dims()

    @property
    def max_positions(self) -> int:
        return getattr(self.args, "max_position_embeddings", 4096)

    @functools.cached_property
    def levels(self) -> int:
        """Levels every expert stores (the highest level a run can compute at)."""
        return min((len(e.levels) for e in self.reader.experts.values()), default=1)

    @property
    def item(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def kv_bytes(self, slots: int, ctx: int) -> int:
        """The KV cache of `slots` sequences of `ctx` positions."""
        h, dk, dv = self.kv_dims
        return kv_nbytes(self.n_layers, slots, ctx, h, dk, dv, self.item)

    @property
    def lookup_only(self) -> int:
        """Resident bytes a step does not read whole: the embedding table (one row a token)."""
        emb = self.reader.tensors["model.embed_tokens.weight"]
        return emb.shape[0] * emb.shape[1] * self.item

    def borrows(self, layer: int, expert: int, level: int) -> bool:
        """Whether this expert computes on its read buffer in place (prepare.can_borrow)."""
        if not self.borrow:
            return False
        return can_borrow(self.reader, self.reader.expert(layer, expert), level, self.fused)

    def expert_nbytes(self, layer: int, level: int) -> int:
        """Memory one prepared expert of `layer` at `level` holds (every expert of a layer
        alike): its kernels' tensors, or, computing in place, its read buffer (a slab of the
        read's aligned span, levels 1..level) and the kernels' own tensors."""
        key = (layer, level)
        if key not in self._sizes:
            e = next(e for e in self.reader.experts.values() if e.layer == layer)
            n = expert_nbytes(self.reader, layer, e.expert, level, self.dtype, self.fused)
            if self.borrows(layer, e.expert, level):  # the slab: the read's span of its levels
                span = align_up(self.reader.expert_span(layer, e.expert, level)[1])
                n += span - borrowed_bytes(self.reader, e, level)
            self._sizes[key] = n
        return self._sizes[key]

    @functools.cached_property
    def resident_bytes(self) -> int:
        return int(resident_nbytes(self.reader, self.dtype, self.fused))

    @functools.cached_property
    def _largest_span(self) -> int:
        return max(
            (
                align_up(self.reader.expert_span(e.layer, e.expert, len(e.levels))[1])
                for e in self.reader.experts.values()
            ),
            default=0,
        )

    @functools.cached_property
    def build_scratch(self) -> int:
        """The most memory a reader thread allocates while building one expert's kernels, beyond
        what the expert keeps (Kernel.build_scratch of the largest role, over the layers)."""
        from edgemoe.kernels import kernel_for
        from formats.constants import EXPERT_ROLES

        most, seen = 0, set()
        for e in self.reader.experts.values():
            if e.layer in seen:
                continue
            seen.add(e.layer)
            for role in EXPERT_ROLES:
                t = self.reader.tensors[e.tensors[role]]
                most = max(most, kernel_for(t.codec).build_scratch(t.shape, t.params, self.fused))
        return most

    def largest_span(self) -> int:
        """The longest on-disk read of one expert (all its levels): an owned read's slab."""
        return self._largest_span
