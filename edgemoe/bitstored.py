"""Bit policies the file stores: EdgeMoE's calibrated level per expert, D²MoE's trained bit router.

Both are fitted offline (edgemoe/bitfit.py, `edgemoe calibrate --bits` and
`--bit-router`) and kept in the .emoe as msgpack blobs; this module reads them
back and answers `levels(layer, expert_ids, weights, hidden)` (edgemoe/bits.py)
with nothing but torch.

- "calibrated" (blob C.BLOB_BITS_TABLE): one level per (layer, expert), the
  lowest whose added loss on calibration text kept the total within a
  tolerance. A table lookup per layer: free at run time.
- "trained" (blob C.BLOB_BITS_ROUTER): per MoE layer a linear map from the
  layer's MoE input (its hidden state) and the pair's gate weight to level
  logits for each expert, `logits[t, k] = W[e] h[t] + g[e] w[t, k] + b[e]` with
  e = ids[t, k]; the level is the argmax (levels past an expert's top are
  never chosen). One [T, D] x [D, E * top] matmul per layer.

Shape legend: T tokens, K chosen experts, D hidden, E experts per layer, V levels (the
layer's highest top).
"""

from __future__ import annotations

import msgpack
import numpy as np
import torch

from formats import constants as C
from formats.errors import EmoeError
from formats.reader import EmoeReader

TABLE_BLOB = C.BLOB_BITS_TABLE
ROUTER_BLOB = C.BLOB_BITS_ROUTER
FORMAT = 1  # the blobs' own version


class NoBitTable(EmoeError):
    fix = "store one with `edgemoe calibrate --bits MODEL.emoe --text FILE`"


class NoBitRouter(EmoeError):
    fix = "train one with `edgemoe calibrate --bit-router MODEL.emoe --text FILE`"


class BadBitPolicy(EmoeError):
    fix = "run `edgemoe calibrate --bits` (or --bit-router) on the file again to rewrite it"


def top_levels(reader: EmoeReader):
    """(layer, expert) -> its highest stored level (as edgemoe.bits.top_levels, which this
    module cannot import: bits imports it to register its kinds)."""
    tops = {key: len(e.levels) for key, e in reader.experts.items()}
    return lambda layer, expert: tops[(layer, expert)]


def moe_layers(reader: EmoeReader) -> list[int]:
    return sorted({layer for layer, _ in reader.experts})


def experts_per_layer(reader: EmoeReader) -> int:
    return max(e for _, e in reader.experts) + 1


def _blob(reader: EmoeReader, name: str, missing: type[EmoeError], what: str) -> dict:
    if name not in reader.blobs:
        raise missing(f"{reader.path} holds no {what} (blob {name!r})")
    try:
        d = msgpack.unpackb(reader.read_chunk(reader.blobs[name]), raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for bad bytes
        raise BadBitPolicy(f"{reader.path}: blob {name!r} is not msgpack ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise BadBitPolicy(f"{reader.path}: blob {name!r} is not a version {FORMAT} map")
    return d


def _check_layers(reader: EmoeReader, d: dict, name: str) -> list[int]:
    layers = d.get("layers")
    if layers != moe_layers(reader):
        raise BadBitPolicy(
            f"{reader.path}: blob {name!r} covers layers {layers}, the file's MoE layers are "
            f"{moe_layers(reader)}"
        )
    return layers


# ---------------------------------------------------------------- calibrated (EdgeMoE)


def table_blob(table: dict[int, list[int]], info: dict) -> bytes:
    """The blob of a level table: layer -> [E] levels, plus how it was fitted (info)."""
    layers = sorted(table)
    return msgpack.packb(
        {"format": FORMAT, "layers": layers, "levels": [list(table[i]) for i in layers], **info},
        use_bin_type=True,
    )


def read_table(reader: EmoeReader) -> tuple[dict[int, list[int]], dict]:
    """(layer -> [E] levels, the fit's info) from the file; NoBitTable if it has none.

    Raises:
        NoBitTable: the file holds no table (run `edgemoe calibrate --bits`).
        BadBitPolicy: the table does not fit the file's experts or levels.
    """
    d = _blob(reader, TABLE_BLOB, NoBitTable, "calibrated bit table")
    layers = _check_layers(reader, d, TABLE_BLOB)
    rows, n, top = d.get("levels"), experts_per_layer(reader), top_levels(reader)
    if not (isinstance(rows, list) and len(rows) == len(layers)):
        raise BadBitPolicy(f"{reader.path}: blob {TABLE_BLOB!r} needs one row per layer")
    table = {}
    for layer, row in zip(layers, rows, strict=True):
        if not (isinstance(row, list) and len(row) == n):
            raise BadBitPolicy(f"{reader.path}: layer {layer}'s row does not hold {n} levels")
        for e, lv in enumerate(row):
            if not (isinstance(lv, int) and 1 <= lv <= top(layer, e)):
                raise BadBitPolicy(
                    f"{reader.path}: expert {e} of layer {layer} at level {lv!r}, it stores "
                    f"1..{top(layer, e)}"
                )
        table[layer] = row
    info = {k: v for k, v in d.items() if k not in ("format", "layers", "levels")}
    return table, info


class Calibrated:
    """Each expert at the level `edgemoe calibrate --bits` chose for it (EdgeMoE): the same
    for every token, whatever its gate weight."""

    def __init__(self, reader: EmoeReader):
        table, self.info = read_table(reader)
        self.table = {layer: torch.tensor(row, dtype=torch.int64) for layer, row in table.items()}
        self.name = "calibrated"

    def levels(self, layer, expert_ids, weights, hidden):
        return self.table[layer][expert_ids]  # [T, K]


# ---------------------------------------------------------------- trained (D²MoE)


class BitRouter(torch.nn.Module):
    """Per MoE layer, level logits of each (token, chosen expert) from the hidden state and the
    gate weight. Levels above an expert's top are masked out.

    Args:
        layers: the MoE layers' decoder indices.
        experts: E; hidden: D.
        tops: [L, E] the top level of each expert (V = its max).
    """

    def __init__(self, layers: list[int], experts: int, hidden: int, tops: torch.Tensor):
        super().__init__()
        self.layers, self.experts, self.hidden = list(layers), experts, hidden
        self.pos = {layer: i for i, layer in enumerate(self.layers)}
        self.tops = tops.to(torch.int64)  # [L, E]
        v = int(self.tops.max())
        n = len(self.layers)
        self.weight = torch.nn.Parameter(torch.zeros(n, experts * v, hidden))  # [L, E*V, D]
        self.gate = torch.nn.Parameter(torch.zeros(n, experts, v))  # [L, E, V]
        self.bias = torch.nn.Parameter(torch.zeros(n, experts, v))  # [L, E, V]
        with torch.no_grad():  # start at every expert's top level: the penalty pulls down
            levels = torch.arange(1, v + 1)
            self.bias.copy_(torch.where(levels <= self.tops[..., None], 2.0 * levels / v, -1e4))

    @property
    def top(self) -> int:
        return int(self.tops.max())

    def logits(self, layer: int, expert_ids: torch.Tensor, weights: torch.Tensor, hidden):
        """[T, K, V] level logits (level v + 1 at index v)."""
        i, v = self.pos[layer], self.top
        t, k = expert_ids.shape
        per = (hidden.float() @ self.weight[i].T).view(t, self.experts, v)  # [T, E, V]
        z = per.gather(1, expert_ids[..., None].expand(t, k, v))  # [T, K, V]
        return z + self.gate[i][expert_ids] * weights.float()[..., None] + self.bias[i][expert_ids]

    def levels(self, layer, expert_ids, weights, hidden):
        with torch.no_grad():
            return self.logits(layer, expert_ids, weights, hidden).argmax(-1) + 1  # [T, K]

    def blob(self, info: dict) -> bytes:
        def raw(p: torch.Tensor) -> bytes:
            return np.ascontiguousarray(p.detach().float().numpy(), dtype="<f4").tobytes()

        return msgpack.packb(
            {
                "format": FORMAT,
                "layers": self.layers,
                "experts": self.experts,
                "hidden": self.hidden,
                "levels": self.top,
                "weight": raw(self.weight),
                "gate": raw(self.gate),
                "bias": raw(self.bias),
                **info,
            },
            use_bin_type=True,
        )


def router_tops(reader: EmoeReader, layers: list[int], experts: int) -> torch.Tensor:
    """[L, E] top level of each expert (1 for an expert the file lacks)."""
    top = top_levels(reader)
    return torch.tensor(
        [
            [top(layer, e) if (layer, e) in reader.experts else 1 for e in range(experts)]
            for layer in layers
        ],
        dtype=torch.int64,
    )


def read_router(reader: EmoeReader) -> tuple[BitRouter, dict]:
    """(the file's bit router, the fit's info).

    Raises:
        NoBitRouter: the file holds none (run `edgemoe calibrate --bit-router`).
        BadBitPolicy: its shapes do not fit the file's model.
    """
    d = _blob(reader, ROUTER_BLOB, NoBitRouter, "trained bit router")
    layers = _check_layers(reader, d, ROUTER_BLOB)
    n, hidden = experts_per_layer(reader), reader.config.get("hidden_size")
    if d.get("experts") != n or d.get("hidden") != hidden:
        raise BadBitPolicy(
            f"{reader.path}: the bit router is for {d.get('experts')} experts of width "
            f"{d.get('hidden')}, the model has {n} of {hidden}"
        )
    r = BitRouter(layers, n, hidden, router_tops(reader, layers, n))
    if d.get("levels") != r.top:
        raise BadBitPolicy(
            f"{reader.path}: the bit router has {d.get('levels')} levels, not {r.top}"
        )
    with torch.no_grad():
        for key in ("weight", "gate", "bias"):
            p = getattr(r, key)
            raw = d.get(key)
            if not isinstance(raw, bytes) or len(raw) != 4 * p.numel():
                raise BadBitPolicy(f"{reader.path}: the bit router's {key} is not {p.numel()} f32")
            p.copy_(torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy()).view(p.shape))
    r.requires_grad_(False)
    info = {k: v for k, v in d.items() if k not in ("format", "layers", "weight", "gate", "bias")}
    return r, info


class Trained:
    """The level of each pair from the file's trained bit router (D²MoE's dual routing)."""

    def __init__(self, reader: EmoeReader):
        self.router, self.info = read_router(reader)
        self.name = "trained"

    def levels(self, layer, expert_ids, weights, hidden):
        return self.router.levels(layer, expert_ids, weights, hidden)


def calibrated(arg: str | None, reader: EmoeReader) -> Calibrated:
    if arg is not None:
        raise ValueError("calibrated takes no argument (its tolerance was fixed by calibrate)")
    return Calibrated(reader)


def trained(arg: str | None, reader: EmoeReader) -> Trained:
    if arg is not None:
        raise ValueError("trained takes no argument (its lambda was fixed by calibrate)")
    return Trained(reader)
