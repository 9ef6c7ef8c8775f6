"""Routing replay: a trained model's recorded routing drives a bench model's expert choices.

Random bench weights route without locality, so a bench on them shows the cache, prefetch
and the bit policies at their worst. `edgemoe calibrate` records a trained model's routing
on real text in its .emoe (edgemoe/routing.py: [S segments, T tokens, L MoE layers, K]);
replayed onto a bench model with the same experts per layer and the same top-k, the bench
model's reads, hits and bytes follow real routing at the bench model's size.

Each KV slot replays one segment (slot % S) and each token the choices recorded at its
position (position % T); MoE layer i replays the trace's layer i % L. The combine weights
are the model's own router probabilities at the replayed experts, renormalised to sum 1.
The generated text means nothing: a replayed run is for speed, reads and hit rates, and
`edgemoe bench --replay` labels its rows so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgemoe.routing import RoutingTrace
from formats.errors import EmoeError
from formats.reader import EmoeReader


class BadReplay(EmoeError):
    fix = (
        "replay the routing of a model with as many experts per layer and the same top-k "
        "(`edgemoe calibrate MODEL --text FILE` records it)"
    )


class RoutingReplay:
    """Args:
    trace: the recorded routing.
    experts: the replaying model's experts per MoE layer.
    top_k: its experts per token.
    """

    def __init__(self, trace: RoutingTrace, experts: int, top_k: int, source: str = ""):
        s, t, n_layers, k = trace.ids.shape
        if k != top_k:
            raise BadReplay(f"{source}: the trace routes {k} experts a token, the model {top_k}")
        if trace.ids.size and int(trace.ids.max()) >= experts:
            raise BadReplay(
                f"{source}: the trace names expert {int(trace.ids.max())}, "
                f"the model's layers have {experts}"
            )
        self.ids = torch.from_numpy(trace.ids.astype(np.int64))  # [S, T, L, K]
        self.segments, self.tokens, self.layers = s, t, n_layers
        self.source = source
        self._at: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def open(cls, path, experts: int, top_k: int) -> RoutingReplay:
        """The routing trace of the .emoe at `path`."""
        with EmoeReader(Path(path)) as r:
            trace = RoutingTrace.load(r)
        if trace is None:
            raise BadReplay(f"{path}: the file holds no routing trace")
        return cls(trace, experts, top_k, str(path))

    def begin(self, slots: torch.Tensor, positions: torch.Tensor, keep) -> None:
        """A forward pass: each token's slot and position [B, S]; keep: the real tokens'
        flat indices (None: all), as the MoE layers see them."""
        seg = (slots.reshape(-1) % self.segments).to(torch.int64)
        pos = (positions.reshape(-1) % self.tokens).to(torch.int64)
        if keep is not None:
            seg, pos = seg[keep], pos[keep]
        self._at = (seg, pos)

    def route(self, moe_index: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The replayed ids [T, K] of this pass's tokens at one MoE layer, and their weights:
        the router's probabilities there, renormalised."""
        seg, pos = self._at
        ids = self.ids[seg, pos, moe_index % self.layers]  # [T, K]
        w = torch.softmax(logits.float(), dim=-1).gather(1, ids)
        return ids, w / w.sum(dim=-1, keepdim=True)
