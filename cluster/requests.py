"""Per-request MoE² classes: each request's class follows its rows through every layer.

    classes = RequestClasses(model, executor)          # the coordinator makes one
    classes.complete(prompts, 16, classes=[rt, None, eco, rt])

A request's class (selection.RequestClass: latency and energy budgets) is bound
to the KV slot the engine gives its sequence (`take_slots`, in order); around
every forward pass the rows of the batch are mapped to their slots, so the
executor knows each row's class (`RemoteExecutor.rows`) and one batch mixes
classes. A request without a class gets the default one (`default`, None: every
choice). Only public methods of the loaded model are wrapped (take_slots,
forward), on this instance: the runtime is not changed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from cluster.selection import RequestClass
from cluster.types import ClusterError
from edgemoe.kvcache import Packed


class RequestClasses:
    """Args:
    model: the loaded model (edgemoe.load's EdgeModel) whose executor is `executor`.
    executor: a RemoteExecutor (anything with `rows(classes)`).
    """

    def __init__(self, model, executor):
        self.model, self.executor = model, executor
        self.default: RequestClass | None = None
        self._slot: dict[int, RequestClass | None] = {}
        self._tls = threading.local()  # the classes of this thread's next take_slots
        self._take, self._forward = model.take_slots, model.forward
        model.take_slots, model.forward = self._take_slots, self._forward_rows

    def _take_slots(self, n: int) -> list[int]:
        slots = self._take(n)
        want, self._tls.want = getattr(self._tls, "want", None), None
        for i, s in enumerate(slots):
            self._slot[s] = want[i] if want is not None else None
        return slots

    def row_classes(self, tokens, valid, slots) -> list | None:
        """Each row's class in a layer's batch of this pass (None: no slots given).

        tokens: [B, S]; valid: [B, S] bool or None; slots: [B] KV slots. The MoE layers see
        the rows of [B * S] that are valid, in order (the model's `keep`). A packed pass
        (edgemoe.kvcache.Packed: tokens [1, T], rows back to back) has no pads: row b's
        class for each of its counts[b] tokens.
        """
        if slots is None:
            return None
        if isinstance(slots, Packed):
            return [
                self._slot.get(x) or self.default
                for x, n in zip(slots.slots, slots.counts)
                for _ in range(n)
            ]
        b, s = tokens.shape
        per = [self._slot.get(int(x)) or self.default for x in slots.tolist()]  # [B]
        if valid is None or bool(valid.all()):
            return [c for c in per for _ in range(s)]
        keep = valid.reshape(-1).nonzero()[:, 0].tolist()  # flat indices into [B * S]
        return [per[i // s] for i in keep]

    def _forward_rows(self, tokens, cache, valid=None, slots=None):
        with self.executor.rows(self.row_classes(tokens, valid, slots)):
            return self._forward(tokens, cache, valid, slots)

    def complete(
        self,
        prompts: list,
        max_tokens: int = 128,
        sampling=None,
        classes: Sequence[RequestClass | None] | None = None,
        **kw,
    ) -> list:
        """`model.complete` with a class per prompt (None: the default class).

        Raises:
            ClusterError: classes and prompts differ in number, or a class is not a RequestClass.
        """
        if classes is not None:
            if len(classes) != len(prompts):
                raise ClusterError(
                    f"{len(classes)} request classes for {len(prompts)} prompts",
                    "give one class (or None) per prompt",
                )
            bad = [c for c in classes if c is not None and not isinstance(c, RequestClass)]
            if bad:
                raise ClusterError(
                    f"request class {bad[0]!r} is not a RequestClass",
                    "make it with cluster.selection.RequestClass(name, latency_s, energy_j)",
                )
        self._tls.want = list(classes) if classes is not None else None
        try:
            return self.model.complete(prompts, max_tokens, sampling, **kw)
        finally:
            self._tls.want = None
