"""Resident weights: the non-expert tensors of a .emoe, prepared for compute.

Embeddings, attention, norms, routers and shared experts are decoded once at
load time into the form the kernels use (edgemoe.kernels.kernel_for), and
held for the whole run. Routed experts never come through here: they are the
executor's business.
"""

from __future__ import annotations

import os

import torch

from edgemoe.kernels import BiasLinear, DenseLinear, Linear, kernel_for
from formats.errors import MissingTensor
from formats.names import is_router
from formats.reader import EmoeReader


class ResidentWeights:
    """Weights protocol (edgemoe.models.base.Weights) over an open EmoeReader.

    Args:
        reader: the open file.
        dtype: compute dtype (float32 or bfloat16).
        fused: use fused quantized kernels (False: reference dequantized weights).
    """

    def __init__(self, reader: EmoeReader, dtype: torch.dtype, fused: bool = True):
        self.reader, self.dtype, self.fused = reader, dtype, fused
        self.nbytes = 0
        self._dense: dict[str, torch.Tensor] = {}

    def has(self, name: str) -> bool:
        return name in self.reader.tensors

    def _segments(self, name: str) -> list:
        t = self.reader.tensors.get(name)
        if t is None:
            raise MissingTensor(
                f"{self.reader.path}: the model needs tensor {name!r}, which the file lacks",
                "re-convert the checkpoint with `edgemoe convert`",
            )
        chunks = {ci: self.reader.read_chunk(ci) for ci, _, _ in t.parts}
        return [memoryview(chunks[ci])[o : o + n] for ci, o, n in t.parts]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._dense:
            t = self.reader.tensors.get(name)
            if t is None:
                self._segments(name)  # raises MissingTensor
            # norms, biases and routers stay float32: routing decisions are precision-sensitive
            dt = torch.float32 if len(t.shape) == 1 or is_router(name) else self.dtype
            arr = t.codec.decode(self._segments(name), t.shape, t.params)
            self._dense[name] = torch.from_numpy(arr).to(dt)
            self.nbytes += self._dense[name].numel() * self._dense[name].element_size()
        return self._dense[name]

    def linear(self, name: str, bias: str | None = None) -> Linear:
        t = self.reader.tensors.get(name)
        if t is None:
            self._segments(name)
        if name in self._dense:  # shared with an embedding (tied weights)
            lin: Linear = DenseLinear(self._dense[name])
        else:
            kernel = kernel_for(t.codec)
            lin = kernel.build(t.shape, t.params, self._segments(name), self.dtype, self.fused)
            self.nbytes += lin.nbytes
        if bias is not None:
            lin = BiasLinear(lin, self.tensor(bias))
        return lin

    def drop_page_cache(self) -> None:
        """Evict the file's pages read while loading: the page cache would count against a budget."""
        fd = os.open(self.reader.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
