"""What a converter reads from: a checkpoint seen as Hugging Face names.

Every input format (a safetensors folder, a GGUF file) is wrapped in a
CheckpointSource that presents the model the way transformers would save it:
an HF config.json dict, HF tensor names and shapes, and float32 arrays loaded
one tensor at a time. The converter core (formats.convert.core) only ever
sees this interface, so safetensors and GGUF inputs of the same weights give
the same .emoe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, before it is loaded.

    Attributes:
        name: Hugging Face name, e.g. "model.layers.0.mlp.experts.3.up_proj.weight".
        shape: HF shape, [out_features, in_features] for linear weights.
        dtype: the stored type as the source names it ("F32", "BF16", "Q4_K"...).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str


class CheckpointSource(ABC):
    """Base class: a model checkpoint presented with HF names.

    Subclasses set the attributes in __init__ and implement tensors/load/close.
    Loading is lazy: load() materialises exactly one tensor.
    """

    kind: str = "?"  # "safetensors" or "gguf"
    config: dict  # HF config.json, always with "model_type"
    generation_config: dict | None = None
    tokenizer_json: bytes | None = None  # HF tokenizers' tokenizer.json
    chat_template: str | None = None

    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """All tensors by HF name, in a stable order."""

    @abstractmethod
    def load(self, name: str) -> np.ndarray:
        """One tensor as a C-contiguous float32 array of its HF shape.

        Raises:
            MissingTensor: the name is not in the checkpoint.
        """

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32; sources that can slice lazily override this."""
        return self.load(name)[start:stop]

    def close(self) -> None:  # noqa: B027 (optional hook: sources with open files override it)
        """Release files; a no-op for sources that hold none."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
