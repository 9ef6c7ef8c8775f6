"""A Hugging Face checkpoint folder as a CheckpointSource.

Reads config.json, the safetensors shards (through model.safetensors.index.json
when the checkpoint is sharded), tokenizer.json, the chat template
(chat_template.jinja or tokenizer_config.json) and generation_config.json.
Tensors are memory-mapped by safetensors and copied out one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from formats.convert.source import CheckpointSource, TensorInfo
from formats.errors import CheckpointError, MissingTensor

INDEX = "model.safetensors.index.json"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: cannot read JSON ({e})", f"restore {path.name} from the model's source"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object", f"restore {path.name} from the model's source"
        )
    return data


class HFSource(CheckpointSource):
    """A folder with config.json and *.safetensors.

    Raises:
        CheckpointError: no config.json, no shards, or an unreadable shard.
        MissingTensor: the index names a shard or tensor that is not there.
    """

    kind = "safetensors"

    def __init__(self, folder: str | Path):
        from safetensors import safe_open  # torch-backed: bf16 has no numpy dtype

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise CheckpointError(f"{self.folder}: no config.json")
        self.config = _read_json(self.folder / "config.json")
        gen = self.folder / "generation_config.json"
        self.generation_config = _read_json(gen) if gen.is_file() else None
        tok = self.folder / "tokenizer.json"
        self.tokenizer_json = tok.read_bytes() if tok.is_file() else None
        self.chat_template = self._chat_template()

        index = self.folder / INDEX
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
        if not shards:
            raise CheckpointError(f"{self.folder}: no *.safetensors files")
        self._handles = {}
        self._where: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        for shard in shards:
            path = self.folder / shard
            if not path.is_file():
                raise MissingTensor(
                    f"{index.name} names shard {shard}, which is not in {self.folder}"
                )
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(
                    f"{path}: not a readable safetensors file ({e})", f"download {shard} again"
                ) from None
            self._handles[shard] = h
            for name in h.keys():
                sl = h.get_slice(name)
                self._infos[name] = TensorInfo(name, tuple(sl.get_shape()), str(sl.get_dtype()))
                self._where[name] = shard
        if weight_map is not None:
            for name, shard in weight_map.items():
                if self._where.get(name) != shard:
                    raise MissingTensor(
                        f"tensor {name!r} is listed in {INDEX} under {shard} but is not in it"
                    )

    def _chat_template(self) -> str | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        cfg = self.folder / "tokenizer_config.json"
        if cfg.is_file():
            tpl = _read_json(cfg).get("chat_template")
            if isinstance(tpl, str):
                return tpl
        return None

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def load(self, name: str) -> np.ndarray:
        shard = self._where.get(name)
        if shard is None:
            raise MissingTensor(f"tensor {name!r} is not in the checkpoint {self.folder}")
        t = self._handles[shard].get_tensor(name)
        return np.ascontiguousarray(t.float().numpy())

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        shard = self._where.get(name)
        if shard is None:
            raise MissingTensor(f"tensor {name!r} is not in the checkpoint {self.folder}")
        t = self._handles[shard].get_slice(name)[start:stop]
        return np.ascontiguousarray(t.float().numpy())

    def close(self) -> None:
        self._handles.clear()
