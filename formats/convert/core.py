"""Checkpoint -> .emoe, streaming, for every CheckpointSource.

The converter writes dense tensors first, then routed experts one (layer,
expert) at a time: at most one expert's three weights are in memory at once,
whatever the model's size. It refuses incomplete or inconsistent checkpoints
before writing anything, and writes through EmoeWriter, which leaves no file
behind on failure.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgpack

from formats import constants as C
from formats.codecs import codec_by_name, numel
from formats.codecs.base import encode_blocked
from formats.convert.families import Family, cfg_int, family_of, is_router
from formats.convert.source import CheckpointSource
from formats.errors import (
    CheckpointError,
    CodecError,
    EmoeError,
    MissingTensor,
    NotARegularFile,
    ShapeMismatch,
)
from formats.validate import check_checkpoint
from formats.writer import EmoeWriter, encode_expert

WRITER_NAME = "edgemoe 0.1.0"


@dataclass(frozen=True)
class CodecChoice:
    """A codec name plus options, parsed from a flag like "mwq:2,3,4" or "int4@64"."""

    name: str
    bits: tuple[int, ...] | None = None
    group: int | None = None

    @classmethod
    def parse(cls, text: str) -> CodecChoice:
        """Parse NAME[:B1,B2,...][@GROUP]; CodecError names a bad part."""
        rest, _, group = text.partition("@")
        name, _, bits = rest.partition(":")
        codec_by_name(name)  # refuses unknown names with the list of known ones
        try:
            b = tuple(int(x) for x in bits.split(",")) if bits else None
            g = int(group) if group else None
        except ValueError:
            raise CodecError(
                f"cannot parse codec choice {text!r}",
                "write it as NAME[:B1,B2,...][@GROUP], e.g. mwq:2,3,4@128",
            ) from None
        return cls(name, b, g)

    def params(self, shape) -> dict:
        options = {}
        if self.bits is not None:
            options["bits"] = list(self.bits)
        if self.group is not None:
            options["group"] = self.group
        codec = codec_by_name(self.name)
        if self.name == "mwq":
            # measured: choosing the clip for the whole chain makes the top level
            # ~RTN quality instead of 1.3-1.4x worse (formats/SPEC.md, notes)
            options["joint_clip"] = True
        params = codec.default_params(shape, **options)
        codec.check_params(shape, params)
        return params

    @property
    def codec_id(self) -> int:
        return int(codec_by_name(self.name).id)


@dataclass
class ConvertOptions:
    """How to store each kind of tensor.

    dense: embeddings, attention, shared experts (default int8: on the trained demo its
        held-out perplexity is within 0.2% of f32 dense, docs/BENCHMARKS.md "Dense weights
        INT8", and it halves the resident bytes, so small budgets run);
    experts: routed experts (default mwq 2->3->4, bit-nested);
    1-D tensors and routers are always f32.
    """

    dense: str = "int8"
    experts: str = "mwq:2,3,4"
    compress: bool = True
    progress: bool = True
    jobs: int = 1  # processes encoding experts; each holds a few experts as float32


F32 = CodecChoice("f32")


def plan_experts(source: CheckpointSource, fam: Family) -> dict[tuple[int, int], dict[str, str]]:
    """Every routed expert the config promises, checked against the checkpoint.

    Raises:
        MissingTensor: an expert tensor is absent.
        ShapeMismatch: an expert tensor has the wrong shape.
        CheckpointError: the checkpoint has experts the config does not.
    """
    cfg = source.config
    infos = source.tensors()
    hidden = cfg_int(cfg, "hidden_size")
    width, n_exp = fam.expert_width(cfg), fam.num_experts(cfg)
    want = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
    layers = fam.moe_layers(cfg)
    plan: dict[tuple[int, int], dict[str, str]] = {}
    for layer in layers:
        for e in range(n_exp):
            roles = {}
            for role in C.EXPERT_ROLES:
                name = fam.expert_name(layer, e, role)
                info = infos.get(name)
                if info is None:
                    raise MissingTensor(f"expert {e} of layer {layer}: tensor {name!r} is missing")
                if tuple(info.shape) != want[role]:
                    raise ShapeMismatch(
                        f"{name}: shape {list(info.shape)}, config.json implies {list(want[role])}"
                    )
                roles[role] = name
            plan[(layer, e)] = roles
    for name in infos:
        hit = fam.classify(name)
        if hit and (hit[0], hit[1]) not in plan:
            raise CheckpointError(
                f"{name}: expert {hit[1]} of layer {hit[0]} is not in config.json's {len(layers)} MoE layers x {n_exp} experts",
                "the checkpoint and its config.json disagree; use the model's own config.json",
            )
    return plan


def _required_dense(cfg: dict) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.get("tie_word_embeddings", False):
        names.append("lm_head.weight")
    return names


def _header_estimate(source: CheckpointSource, metadata: dict, levels: int) -> int:
    meta = len(msgpack.packb(metadata, use_bin_type=True))
    per_tensor = sum(len(n) + 64 + 24 * levels for n in source.tensors())
    return meta + per_tensor + 64 * 1024


def convert(
    source: CheckpointSource, out_path: str | os.PathLike, options: ConvertOptions | None = None
) -> Path:
    """Convert one checkpoint into a .emoe file.

    Args:
        source: the checkpoint (HFSource, GGUFSource...).
        out_path: destination; written atomically.
        options: codec choices (see ConvertOptions).
    Returns:
        The path written.
    Raises:
        UnsupportedArchitecture, MissingTensor, ShapeMismatch, CheckpointError, CodecError,
        BadConfig, ExpertTableMismatch, BadTokenizer, BadChatTemplate (formats.validate).
    """
    options = options or ConvertOptions()
    cfg = dict(source.config)
    fam = family_of(cfg)
    dense_choice = CodecChoice.parse(options.dense)
    expert_choice = CodecChoice.parse(options.experts)
    infos = source.tensors()
    for name in _required_dense(cfg):
        if name not in infos:
            raise MissingTensor(f"tensor {name!r} is missing from the checkpoint")
    plan = plan_experts(source, fam)
    # everything the runtime will read, checked before a byte is written: a checkpoint
    # that converts is one that runs
    check_checkpoint(source, plan)
    expert_names = {n for roles in plan.values() for n in roles.values()}
    dense_names = [n for n in infos if n not in expert_names]

    metadata = {
        C.M_FAMILY: fam.model_type,
        C.M_CONFIG: cfg,
        C.M_SOURCE: source.kind,
        C.M_WRITER: WRITER_NAME,
    }
    if source.generation_config:
        metadata[C.M_GENERATION_CONFIG] = source.generation_config
    if source.chat_template:
        metadata[C.M_CHAT_TEMPLATE] = source.chat_template
    try:
        probe = next(iter(plan.values()))
        levels = len(expert_choice.params(infos[probe["gate"]].shape).get("bits", [0]))
    except StopIteration:
        levels = 1
    except CodecError as e:
        raise CodecError(
            f"routed experts: {e.what}", "choose another --experts codec, e.g. bf16"
        ) from None

    total = sum(numel(i.shape) * 4 for i in infos.values())
    bar = _progress(total, f"convert {Path(out_path).name}", options.progress)
    with EmoeWriter(
        out_path,
        metadata,
        header_reserve=_header_estimate(source, metadata, levels),
        compress=options.compress,
    ) as w:
        if source.tokenizer_json:
            w.add_blob(C.BLOB_TOKENIZER, source.tokenizer_json)
        for name in dense_names:
            info = infos[name]
            shape = tuple(info.shape)
            choice = F32 if (len(shape) < 2 or is_router(name)) else dense_choice
            try:
                params = choice.params(shape)
            except CodecError:
                choice, params = (
                    CodecChoice("bf16"),
                    {},
                )  # e.g. int8 on an odd width: keep it exact-ish
            # by rows: a 2 GB embedding never sits in memory as float32
            segments = encode_blocked(
                codec_by_name(choice.name),
                shape,
                params,
                lambda a, b, n=name: source.load_rows(n, a, b),
            )
            w.add_encoded(name, shape, choice.codec_id, params, segments, src_dtype=info.dtype)
            del segments
            bar.update(numel(shape) * 4)

        def inputs(roles: dict[str, str]) -> dict[str, tuple]:
            tensors = {}
            for role, name in roles.items():
                arr = source.load(name)
                try:
                    params = expert_choice.params(arr.shape)
                except CodecError as err:
                    raise CodecError(
                        f"{name}: {err.what}", "choose another --experts codec, e.g. bf16"
                    ) from None
                tensors[role] = (name, arr, expert_choice.codec_id, params, infos[name].dtype)
                bar.update(arr.size * 4)
            return tensors

        if options.jobs <= 1:
            for (layer, e), roles in plan.items():
                w.add_expert(layer, e, inputs(roles))
        else:
            _encode_in_parallel(w, plan, inputs, options.jobs)
    bar.close()
    return Path(out_path)


def _encode_in_parallel(w: EmoeWriter, plan: dict, inputs, jobs: int) -> None:
    """Experts encoded by `jobs` worker processes, written in plan order as they finish.

    This process loads each expert and ships it to a worker; at most jobs + 1 experts are
    in flight, so memory grows with jobs (each worker is ~100 MB here), not with the model. Spawned workers: a fork would
    copy whatever the parent holds (and torch's thread pools, if it is loaded).
    """
    ctx = multiprocessing.get_context("spawn")
    pending: deque = deque()
    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        try:
            for key, roles in plan.items():
                pending.append((key, pool.submit(encode_expert, inputs(roles))))
                while len(pending) > jobs or (pending and pending[0][1].done()):
                    (layer, e), fut = pending.popleft()
                    w.add_encoded_expert(layer, e, fut.result())
            while pending:
                (layer, e), fut = pending.popleft()
                w.add_encoded_expert(layer, e, fut.result())
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _die_with_parent(parent: int) -> None:
    """Workers exit when the converter dies (an OOM kill, a SIGKILL): otherwise they block
    forever writing a result nobody reads. Linux only; elsewhere a no-op."""
    try:
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before this worker got here
        os._exit(1)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=None,
    )


def open_source(path: str | os.PathLike) -> CheckpointSource:
    """A CheckpointSource for a Hugging Face folder or a .gguf file."""
    p = Path(path)
    if p.is_dir():
        from formats.convert.hf import HFSource

        return HFSource(p)
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from formats.convert.gguf import GGUFSource

            return GGUFSource(p)
        raise CheckpointError(
            f"{p}: neither a model folder nor a GGUF file (starts with {magic!r})"
        )
    if p.exists():  # a FIFO or a device: opening or reading it could block
        raise NotARegularFile(
            f"{p} is neither a model folder nor a regular file",
            "point `edgemoe convert` at a model folder or a .gguf file",
        )
    raise CheckpointError(f"{p}: no such file or folder")


__all__ = ["CodecChoice", "ConvertOptions", "EmoeError", "convert", "open_source", "plan_experts"]
