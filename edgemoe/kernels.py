"""Linear layers over stored weights: one kernel per codec, plus a reference.

`kernel_for(codec)` gives the codec's Kernel, registered by codec id as
formats/ registers codecs. A Kernel turns one tensor's level segments (as
stored in a .emoe) into a callable `y = x @ W.T` that computes on the stored
codes where torch has a fused CPU kernel, says how many bytes that Linear will
hold without building it (the planner), and raises a built Linear to a higher
nested level in place:

    f32 / f16 / bf16      dense weight in the compute dtype       F.linear
    int8, one scale/row   int8 codes + per-row scales             _weight_int8pack_mm
    int4                  packed nibbles + group scale/offset     _weight_int4pack_mm_for_cpu
    mwq, base <= 4 bits   one int4 kernel per level, summed       (level 1: (q - z) s;
                                                                  level k: s_k (2b - 1) as code b + 7)
    bitplane, <= 4 parts  one int4 kernel per 4 planes, summed    (planes of bits lo..lo+3: (c - m) 2^lo s,
                                                                  plus (127.5 - z) s once)
    anything else         dequantized once to the compute dtype   F.linear

Dequantize-then-matmul per call is never used: a 5632x2048 INT8 matrix costs
~13 ms to dequantize here and ~0.4 ms to multiply fused. `reference_linear`
(dequantize with the codec's own decoder, then F.linear) is the oracle the
tests compare every kernel against.

Upgrading keeps what is built: mwq and bitplane append int4 parts for the new
levels' planes; their dequantized fallback keeps the decoder's state (mwq's
float32 weight, bitplane's codes) while a higher level remains, so an upgrade
continues from it. Either way upgrade(build(level k), levels k+1..j) computes
exactly what build(level j) does, bit for bit.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgemoe import fastkernels
from formats.codecs import Codec, get_codec, numel
from formats.codecs.bitplane import view as bitplane_view
from formats.codecs.mwq import add_plane, unpack_plane
from formats.constants import CodecId
from formats.errors import EmoeError

INT4_GROUPS = (32, 64, 128, 256)
# Each int4 part holds N*K/2 bytes: past 4 parts a bitplane weight would outweigh bf16.
# bitplane 2-4-8 on parts, one 1408x2048 expert in bf16, batch 1, levels 1/2/3: 2.1/4.4/6.5 ms
# and 4.4/8.8/13.2 MiB, against 3.6 ms and 16.5 MiB at every level dense (2 shared cores).
MAX_BITPLANE_PARTS = 4


class NotUpgradable(EmoeError):
    fix = "build the Linear again from all its level segments"


def _fields(codec, shape, params, segment, level: int) -> list[memoryview]:
    """Split level `level`'s segment (0-based) into its fields."""
    sizes = codec.level_fields(shape, params)[level]
    seg, out, pos = memoryview(segment), [], 0
    if len(seg) != sum(sizes):
        raise NotUpgradable(
            f"{codec.name}: level {level + 1} segment has {len(seg)} bytes, expected {sum(sizes)}"
        )
    for n in sizes:
        out.append(seg[pos : pos + n])
        pos += n
    return out


def _f16(buf, rows: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(buf, dtype="<f2").astype(np.float32).reshape(rows, -1))


def _item(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Linear(ABC):
    """y = x @ W.T for x [..., K]; `nbytes` is the memory its weights hold, `level` the
    stored precision level it computes at (1-based)."""

    out_features: int
    in_features: int
    nbytes: int
    level: int = 1

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class DenseLinear(Linear):
    """A dense weight in the compute dtype.

    `state` holds what a nested codec's upgrade continues from (numpy arrays,
    counted in nbytes unless they share the weight's memory); None at the top level.
    """

    def __init__(
        self,
        w: torch.Tensor,
        bias: torch.Tensor | None = None,
        state: dict | None = None,
        level: int = 1,
    ):
        self.w, self.bias, self.state, self.level = w.contiguous(), bias, state, level
        self.out_features, self.in_features = self.w.shape
        own = self.w.numel() * self.w.element_size()
        if bias is not None:
            own += bias.numel() * bias.element_size()
        for a in (state or {}).values():  # float32 state may be the weight itself
            if a.ctypes.data != self.w.data_ptr():
                own += a.nbytes
        self.nbytes = own

    def __call__(self, x):
        return F.linear(x.to(self.w.dtype), self.w, self.bias)


class Int8Linear(Linear):
    """Per-output-row symmetric INT8 codes [N, K] and f32 row scales [N].

    Computed by the AVX2 Q8 kernel (edgemoe/fastkernels.py: activations quantized to INT8 in
    blocks of 32, as llama.cpp's Q8_0 matmul does) where it is available and K % 32 == 0, else
    by torch's _weight_int8pack_mm (exact int8 x bf16), which takes the same codes as they are.
    """

    def __init__(
        self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, borrowed: bool = False
    ):
        self.q, self.scales, self.dtype = q.contiguous(), scales.float().contiguous(), dtype
        self.out_features, self.in_features = q.shape
        # borrowed codes are views into a read buffer the caller accounts for
        self.nbytes = (0 if borrowed else q.numel()) + self.scales.numel() * 4
        self.fast = self.in_features % fastkernels.QK == 0 and fastkernels.available()

    def __call__(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.fast:
            y = fastkernels.q8_linear(x2, self.q, self.scales).to(self.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(
                x2.to(self.dtype), self.q, self.scales.to(self.dtype)
            )
        return y.reshape(*lead, self.out_features)


def on_q8_kernel(lin: Linear) -> bool:
    """Whether a Linear is plain INT8 computed by the Q8 kernel (fused calls take its codes)."""
    return type(lin) is Int8Linear and lin.fast


class Int4Linear(Linear):
    """Group-wise INT4 w = (q - 8) * scale + zero, torch's CPU int4 layout.

    Several levels (mwq, bitplane) are several such matrices summed: `parts`
    holds (packed, scale_and_zeros) pairs, lowest level first; `append` adds a
    level's parts in place.
    """

    def __init__(
        self,
        parts: list[tuple[torch.Tensor, torch.Tensor]],
        group: int,
        shape,
        dtype: torch.dtype,
        level: int = 1,
    ):
        self.parts, self.group, self.dtype, self.level = [], group, dtype, 0
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.nbytes = 0
        self.append(parts, level)

    def append(self, parts: list[tuple[torch.Tensor, torch.Tensor]], levels: int = 1) -> None:
        self.parts += parts
        self.nbytes += sum(
            p.numel() * p.element_size() + sz.numel() * sz.element_size() for p, sz in parts
        )
        self.level += levels
        # parts in use at each level (None: levels appended together, not computable alone)
        self.ends = [*getattr(self, "ends", []), *[None] * (levels - 1), len(self.parts)]

    def at(self, level: int) -> Int4Linear | None:
        """A Linear computing level `level` <= self.level from a prefix of these parts (shared,
        its nbytes 0), or None if that level's parts are not known apart."""
        if level >= self.level:
            return self
        n = self.ends[level - 1]
        if n is None:
            return None
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.parts, view.ends, view.level, view.nbytes = self.parts[:n], self.ends[:level], level, 0
        return view

    def truncate(self, level: int) -> bool:
        """Drop the parts above `level` in place (a downgrade: their bytes are freed); False
        if that level's parts are not known apart."""
        if level >= self.level:
            return True
        n = self.ends[level - 1]
        if n is None:
            return False
        dropped, self.parts = self.parts[n:], self.parts[:n]
        self.nbytes -= sum(
            p.numel() * p.element_size() + z.numel() * z.element_size() for p, z in dropped
        )
        self.ends, self.level = self.ends[:level], level
        return True

    def __call__(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        y = None
        for packed, sz in self.parts:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group, sz)
            y = part if y is None else y + part
        return y.reshape(*lead, self.out_features)


class MwqLinear(Int4Linear):
    """An mwq weight computed as the file stores it (fastkernels.mwq_linear; AVX2, or AVX-512
    VNNI where the CPU has it):
    one part per level, (its bit planes, its f16 scales): level 1 the b1 code planes with s1
    and z1, each further level its sign plane and scale. A level holds and reads its own bits
    and nothing is unpacked or repacked (torch's int4 path costs 4 bits and a repack per level).
    Int4Linear's level protocol (append, at, truncate) applies as it is."""

    fast = True  # activations rounded to INT8 per 32, as the Q8 kernel does

    def __init__(self, parts, group: int, shape, dtype: torch.dtype, b1: int, level: int = 1):
        self.b1 = b1
        super().__init__(parts, group, shape, dtype, level)

    def __call__(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = fastkernels.mwq_linear(x2, self.parts, self.b1, self.group, self.out_features)
        return y.to(self.dtype).reshape(*lead, self.out_features)


def _mwq_native_ok(shape, params: dict) -> bool:
    """The shapes the stored-planes mwq kernel takes, on a CPU that runs it."""
    if len(shape) != 2:
        return False
    cols, group = int(shape[1]), params.get("group", 0)
    return cols % 64 == 0 and group % 64 == 0 and cols % group == 0 and fastkernels.mwq_available()


def _mwq_level_bytes(codec, shape, params: dict, levels: int) -> int:
    """Stored bytes of an mwq weight's first `levels` levels: what MwqLinear holds."""
    return sum(sum(f) for f in codec.level_fields(shape, params)[:levels])


def _mwq_part(segment, planes_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A level's segment as (its planes, its scales as int16 f16 bits), views of the segment's
    memory, never copied (the store's payloads are private copies of its read buffer; the
    views keep them alive and only read them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only bytes: never written
        raw = torch.frombuffer(segment, dtype=torch.uint8)
    return raw[:planes_bytes], raw[planes_bytes:].view(torch.int16)


class BiasLinear(Linear):
    """A Linear plus a float bias (qkv biases over quantized weights)."""

    def __init__(self, inner: Linear, bias: torch.Tensor):
        self.inner, self.bias = inner, bias
        self.out_features, self.in_features = inner.out_features, inner.in_features
        self.nbytes = inner.nbytes + bias.numel() * bias.element_size()
        self.level = inner.level

    def __call__(self, x):
        y = self.inner(x)
        return y + self.bias.to(y.dtype)


def _pack_int4(q: np.ndarray) -> torch.Tensor:
    """q uint8 [N, K] in 0..15 -> torch's packed CPU int4 layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.from_numpy(q.astype(np.int32)), 1
    )


def _int4_part(
    q: np.ndarray, scale: torch.Tensor, zero: torch.Tensor, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """q uint8 [N, K] in 0..15, scale/zero float32 [N, G] -> (packed, scale_and_zeros [G, N, 2])."""
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return _pack_int4(q), sz


def _int4_part_nbytes(rows: int, cols: int, group: int, item: int) -> int:
    return rows * cols // 2 + 2 * rows * (cols // group) * item


def _int4_ok(shape, params: dict) -> bool:
    """The shapes and groups _weight_int4pack_mm_for_cpu takes."""
    if len(shape) != 2:
        return False
    rows, cols, group = int(shape[0]), int(shape[1]), params.get("group")
    return group in INT4_GROUPS and cols % group == 0 and rows % 16 == 0 and cols % 64 == 0


def reference_weight(
    codec_id: int, shape, params: dict, segments: Sequence, dtype=torch.float32
) -> torch.Tensor:
    """The weight as the codec's own decoder gives it (the oracle)."""
    codec = get_codec(codec_id)
    return torch.from_numpy(codec.decode(list(segments), shape, params)).to(dtype)


def reference_linear(codec_id, shape, params, segments, dtype=torch.float32) -> DenseLinear:
    return DenseLinear(reference_weight(codec_id, shape, params, segments, dtype))


class Kernel:
    """How one codec's tensors become Linears. The base is the dequantized reference.

    Subclasses override `_fused_ok`, `_build_fused` and `_fused_nbytes` for a
    fused path, and `upgrade` where the codec nests. One instance per codec.
    """

    borrows = False  # whether _build_fused can compute on borrowed stored bytes in place

    def can_borrow(self, shape: Sequence[int], params: dict) -> bool:
        """Whether build(..., borrow=True) computes this tensor on its stored bytes in place."""
        return self.borrows and self._fused_ok(shape, params)

    def borrowed_bytes(self, shape: Sequence[int], params: dict, levels: int = 1) -> int:
        """Bytes of nbytes(..., levels) a borrowing build leaves to the lender (0: it never
        borrows)."""
        return 0

    def __init__(self, codec: type[Codec]):
        self.codec = codec

    def build_scratch(self, shape: Sequence[int], params: dict, fused: bool = True) -> int:
        """The most memory build() allocates beyond what its Linear keeps (the planner counts it
        once per reader thread): the dequantized path's float32 decode and its dtype copy, or
        torch's int4 packer's unpacked codes and int32 copies (measured: 7.1 bytes a weight of
        a 5632x2048 mwq matrix). 8 bytes a weight unless a kernel knows better."""
        return 8 * numel(shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.codec.name})"

    def build(
        self,
        shape: Sequence[int],
        params: dict,
        segments: Sequence,
        dtype: torch.dtype = torch.bfloat16,
        fused: bool = True,
        borrow: bool = False,
    ) -> Linear:
        """A Linear over a tensor's first len(segments) levels, fused where torch allows.

        Args:
            shape, params: the tensor's header entry (a 2-D weight [N, K]).
            segments: its level segments 1..L (raw bytes), L = the level to compute at.
            dtype: compute dtype of activations and dense weights.
            fused: False forces the dequantized path (tests, debugging).
            borrow: the segments' memory outlives the Linear and is the caller's: a kernel
                that can compute on the stored bytes in place keeps views of them (no copy)
                and leaves their bytes out of its nbytes.
        Returns:
            A Linear with level L whose nbytes equals nbytes(shape, params, L, dtype, fused)
            (less the borrowed bytes).
        Raises:
            ValueError: the shape is not 2-D.
            CodecError: a segment has the wrong length or there are too many.
        """
        _check_2d(self.codec, shape)
        if fused and self._fused_ok(shape, params):
            if borrow and self.can_borrow(shape, params):
                return self._build_fused(shape, params, segments, dtype, borrow=True)
            return self._build_fused(shape, params, segments, dtype)
        return self._build_dense(shape, params, segments, dtype)

    def nbytes(
        self,
        shape: Sequence[int],
        params: dict,
        levels: int,
        dtype: torch.dtype = torch.bfloat16,
        fused: bool = True,
    ) -> int:
        """Bytes build(shape, params, the first `levels` segments, dtype, fused) holds, computed
        without building it (the planner).

        Raises:
            ValueError: the shape is not 2-D.
        """
        _check_2d(self.codec, shape)
        if fused and self._fused_ok(shape, params):
            return self._fused_nbytes(shape, params, levels, dtype)
        return self._dense_nbytes(shape, params, levels, dtype)

    def upgrade(
        self,
        linear: Linear,
        shape: Sequence[int],
        params: dict,
        new_segments: Sequence,
        dtype: torch.dtype = torch.bfloat16,
    ) -> Linear:
        """Raise a Linear this kernel built at level k to level k + len(new_segments), in place.

        Args:
            linear: what build (or an earlier upgrade) returned for this tensor.
            shape, params: the tensor's header entry, as given to build.
            new_segments: the segments of levels k+1 .. k+j.
            dtype: the compute dtype given to build.
        Returns:
            `linear` itself, now at level k + j, computing what build at that level computes.
        Raises:
            NotUpgradable: the codec has one level, the levels run past the last one, or the
                Linear was not built by this kernel.
        """
        if self.codec.nested:
            raise NotUpgradable(f"{self.codec.name}: this kernel has no in-place upgrade")
        raise NotUpgradable(
            f"{self.codec.name} stores one precision level; a {self.codec.name} weight has "
            "nothing to upgrade to"
        )

    # the dequantized path, shared by every kernel
    def _fused_ok(self, shape, params) -> bool:
        return False

    def _build_fused(self, shape, params, segments, dtype) -> Linear:
        return self._build_dense(shape, params, segments, dtype)  # no fused path of its own

    def _fused_nbytes(self, shape, params, levels, dtype) -> int:
        return self._dense_nbytes(shape, params, levels, dtype)

    def _build_dense(self, shape, params, segments, dtype) -> Linear:
        return DenseLinear(
            reference_weight(self.codec.id, shape, params, segments, dtype), level=len(segments)
        )

    def _dense_nbytes(self, shape, params, levels, dtype) -> int:
        return numel(shape) * _item(dtype)


def _check_2d(codec: type[Codec], shape) -> None:
    if len(shape) != 2:
        raise ValueError(f"{codec.name}: a Linear needs a 2-D weight, got shape {list(shape)}")


_KERNELS: dict[int, Kernel] = {}


def register_kernel(*codec_ids: CodecId):
    """Class decorator: one instance of the kernel per codec id it serves."""

    def deco(cls: type[Kernel]) -> type[Kernel]:
        for cid in codec_ids:
            if int(cid) in _KERNELS:
                raise ValueError(f"kernel for codec id {int(cid)} registered twice")
            _KERNELS[int(cid)] = cls(get_codec(cid))
        return cls

    return deco


def kernel_for(codec: int | type[Codec]) -> Kernel:
    """The Kernel of a codec, given its id (int or CodecId) or its class.

    A registered codec without a fused kernel gets the dequantized reference kernel.

    Raises:
        UnknownCodec: no codec has that id.
    """
    c = codec if isinstance(codec, type) and issubclass(codec, Codec) else get_codec(codec)
    k = _KERNELS.get(int(c.id))
    if k is None:
        k = _KERNELS[int(c.id)] = Kernel(c)
    return k


@register_kernel(CodecId.F32, CodecId.F16, CodecId.BF16)
class DenseKernel(Kernel):
    """Raw floats: the weight itself, in the compute dtype."""


@register_kernel(CodecId.INT8)
class Int8Kernel(Kernel):
    borrows = True  # the stored codes are the kernel's layout: computed on in place

    def borrowed_bytes(self, shape, params, levels=1):
        return numel(shape)

    def _fused_ok(self, shape, params):
        return params.get("group") == int(shape[1])

    def _build_fused(self, shape, params, segments, dtype, borrow: bool = False):
        self.codec._check_segments(segments, shape, params)
        rows, cols = int(shape[0]), int(shape[1])
        codes, scales = _fields(self.codec, shape, params, segments[0], 0)
        if borrow:
            q = torch.frombuffer(codes, dtype=torch.int8).view(rows, cols)
        else:
            # torch's allocator (huge pages for 2 MiB and more: edgemoe/__init__.py)
            q = torch.empty(rows, cols, dtype=torch.int8)
            q.numpy()[:] = np.frombuffer(codes, dtype=np.int8).reshape(rows, cols)
        return Int8Linear(q, _f16(scales, rows).reshape(rows), dtype, borrowed=borrow)

    def _fused_nbytes(self, shape, params, levels, dtype):
        return numel(shape) + int(shape[0]) * 4  # f32 row scales


@register_kernel(CodecId.INT4)
class Int4Kernel(Kernel):
    def _fused_ok(self, shape, params):
        return _int4_ok(shape, params)

    def _build_fused(self, shape, params, segments, dtype):
        self.codec._check_segments(segments, shape, params)
        rows, cols = int(shape[0]), int(shape[1])
        nib, s, m = _fields(self.codec, shape, params, segments[0], 0)
        packed = np.frombuffer(nib, dtype=np.uint8).reshape(rows, cols // 2)
        q = np.empty((rows, cols), np.uint8)
        q[:, 0::2], q[:, 1::2] = packed & 0x0F, packed >> 4
        scale, offset = _f16(s, rows), _f16(m, rows)
        part = _int4_part(q, scale, offset + 8 * scale, dtype)
        return Int4Linear([part], params["group"], shape, dtype)

    def _fused_nbytes(self, shape, params, levels, dtype):
        return _int4_part_nbytes(int(shape[0]), int(shape[1]), params["group"], _item(dtype))


class _NestedKernel(Kernel, ABC):
    """Shared by the nested codecs: fused parts appended per level, or a dense weight that
    keeps the decoder's state while a higher level remains."""

    def _build_fused(self, shape, params, segments, dtype):
        self.codec._check_segments(segments, shape, params)
        parts = self._parts(shape, params, segments[0], 0, dtype)
        lin = Int4Linear(parts, params["group"], shape, dtype)
        for k in range(1, len(segments)):
            lin.append(self._parts(shape, params, segments[k], k, dtype, lin))
        return lin

    def _build_dense(self, shape, params, segments, dtype):
        self.codec._check_segments(segments, shape, params)
        state = self._state(shape, params, segments[0])
        for k in range(1, len(segments)):
            state = self._advance(shape, params, state, segments[k], k)
        return self._dense(shape, params, state, len(segments), dtype)

    def _dense(self, shape, params, state: dict, level: int, dtype) -> DenseLinear:
        w = torch.from_numpy(self._weight(shape, params, state, level)).to(dtype)
        keep = state if level < self.codec.num_levels(params) else None
        return DenseLinear(w, state=keep, level=level)

    def _dense_nbytes(self, shape, params, levels, dtype):
        n, item = numel(shape), _item(dtype)
        if levels >= self.codec.num_levels(params):
            return n * item
        return n * item + self._state_nbytes(shape, params, dtype)

    def upgrade(self, linear, shape, params, new_segments, dtype=torch.bfloat16):
        to = self._check_upgrade(linear, params, new_segments)
        k0 = linear.level
        for k, seg in enumerate(new_segments, start=k0):  # every size checked before any change
            _fields(self.codec, shape, params, seg, k)
        if isinstance(linear, Int4Linear):
            for k, seg in enumerate(new_segments, start=k0):
                linear.append(self._parts(shape, params, seg, k, dtype, linear))
            return linear
        if linear.state is None:
            raise NotUpgradable(
                f"{self.codec.name}: this dense Linear kept no decoder state to continue from"
            )
        state = linear.state
        for k, seg in enumerate(new_segments, start=k0):
            state = self._advance(shape, params, state, seg, k)
        fresh = self._dense(shape, params, state, to, dtype)
        linear.__dict__.update(fresh.__dict__)  # in place: the caller's cache holds `linear`
        return linear

    def _check_upgrade(self, linear: Linear, params: dict, new_segments) -> int:
        """The level after the upgrade; refuses a foreign Linear or levels past the last."""
        if not isinstance(linear, Int4Linear | DenseLinear):
            raise NotUpgradable(
                f"{self.codec.name}: cannot upgrade a {type(linear).__name__}; "
                "this kernel builds Int4Linear or DenseLinear"
            )
        top = self.codec.num_levels(params)
        to = linear.level + len(new_segments)
        if to > top:
            raise NotUpgradable(
                f"{self.codec.name}: level {linear.level} + {len(new_segments)} new levels "
                f"runs past the last level ({top})"
            )
        return to

    # per codec
    @abstractmethod
    def _parts(self, shape, params, segment, level: int, dtype, lin=None) -> list:
        """The int4 parts level `level` (0-based) adds to `lin` (None while building level 1)."""

    @abstractmethod
    def _state(self, shape, params, segment) -> dict: ...

    @abstractmethod
    def _advance(self, shape, params, state: dict, segment, level: int) -> dict: ...

    @abstractmethod
    def _weight(self, shape, params, state: dict, level: int) -> np.ndarray: ...

    @abstractmethod
    def _state_nbytes(self, shape, params, dtype) -> int: ...


@register_kernel(CodecId.MWQ)
class MwqKernel(_NestedKernel):
    """mwq: level 1 as one int4 part, each sign level as one more; dense state: the float32
    weight the decoder has reached (shared with the weight when dtype is float32)."""

    def _fused_ok(self, shape, params):
        return _mwq_native_ok(shape, params) or (_int4_ok(shape, params) and params["bits"][0] <= 4)

    def _fused_nbytes(self, shape, params, levels, dtype):
        if _mwq_native_ok(shape, params):
            return _mwq_level_bytes(self.codec, shape, params, levels)
        rows, cols = int(shape[0]), int(shape[1])
        return levels * _int4_part_nbytes(rows, cols, params["group"], _item(dtype))

    def build_scratch(self, shape, params, fused=True):
        if fused and _mwq_native_ok(shape, params):
            return 0  # its parts are views of the payloads: nothing decoded or repacked
        return super().build_scratch(shape, params, fused)

    def can_borrow(self, shape, params):
        return _mwq_native_ok(shape, params)  # computed on the stored planes as they are

    def borrowed_bytes(self, shape, params, levels=1):
        if not _mwq_native_ok(shape, params):
            return 0
        return _mwq_level_bytes(self.codec, shape, params, levels)

    def _build_fused(self, shape, params, segments, dtype, borrow=False):
        if not _mwq_native_ok(shape, params):
            return super()._build_fused(shape, params, segments, dtype)
        self.codec._check_segments(segments, shape, params)
        parts = self._parts(shape, params, segments[0], 0, dtype, native=True)
        lin = MwqLinear(parts, params["group"], shape, dtype, params["bits"][0])
        for k in range(1, len(segments)):
            lin.append(self._parts(shape, params, segments[k], k, dtype, lin))
        if borrow:  # views of a read buffer the caller accounts for; later levels count
            lin.nbytes = 0
        return lin

    def _parts(self, shape, params, segment, level, dtype, lin=None, native=False):
        rows, cols = int(shape[0]), int(shape[1])
        if native or isinstance(lin, MwqLinear):
            sizes = _fields(self.codec, shape, params, segment, level)  # checks the length
            planes = sum(len(f) for f in sizes[: params["bits"][0] if level == 0 else 1])
            return [_mwq_part(segment, planes)]
        n, fields = rows * cols, _fields(self.codec, shape, params, segment, level)
        if level == 0:
            b1 = params["bits"][0]
            q = np.zeros(n, np.uint8)
            for p in range(b1):
                q |= unpack_plane(fields[p], 0, n) << p
            s1, z1 = _f16(fields[b1], rows), _f16(fields[b1 + 1], rows)
            return [_int4_part(q.reshape(rows, cols), s1, (8 - z1) * s1, dtype)]
        plane, sk = fields
        b = unpack_plane(plane, 0, n).reshape(rows, cols)
        sk = _f16(sk, rows)
        # s_k (2b - 1) = ((b + 7) - 8) * 2 s_k + s_k: small terms, no bf16 cancellation
        return [_int4_part(b + 7, 2 * sk, sk, dtype)]

    def _state(self, shape, params, segment):
        return {"w": self.codec.decode([segment], shape, params)}

    def _advance(self, shape, params, state, segment, level):
        rows, cols, g = int(shape[0]), int(shape[1]), params["group"]
        plane, sk = _fields(self.codec, shape, params, segment, level)
        signs = unpack_plane(plane, 0, rows * cols).reshape(rows, cols // g, g)
        sk = np.frombuffer(sk, dtype="<f2").astype(np.float32).reshape(rows, cols // g)
        w = add_plane(state["w"].reshape(rows, cols // g, g), signs, sk)  # the decoder's step
        return {"w": w.reshape(rows, cols)}

    def _weight(self, shape, params, state, level):
        return state["w"]

    def _state_nbytes(self, shape, params, dtype):
        return 0 if dtype == torch.float32 else 4 * numel(shape)


def _bitplane_chunks(params) -> list[list[tuple[int, int]]]:
    """Per level, its int4 parts as (lowest code bit, number of bits), most significant first."""
    out, done = [], 0
    for r in params["bits"]:
        level, top = [], 8 - done  # this level's planes are code bits top-1 .. 8-r
        while top > 8 - r:
            nb = min(4, top - (8 - r))
            level.append((top - nb, nb))
            top -= nb
        out.append(level)
        done = r
    return out


@register_kernel(CodecId.BITPLANE)
class BitplaneKernel(_NestedKernel):
    """bitplane: the code bits a level adds, up to 4 per int4 part; dense state: the codes
    read so far with the scales and zero points."""

    def _fused_ok(self, shape, params):
        parts = sum(len(c) for c in _bitplane_chunks(params))
        return _int4_ok(shape, params) and parts <= MAX_BITPLANE_PARTS

    def _fused_nbytes(self, shape, params, levels, dtype):
        rows, cols = int(shape[0]), int(shape[1])
        parts = sum(len(c) for c in _bitplane_chunks(params)[:levels])
        return parts * _int4_part_nbytes(rows, cols, params["group"], _item(dtype))

    def _parts(self, shape, params, segment, level, dtype, lin=None):
        # W_r = (t d + (d-1)/2 - z) s = sum over parts of (c - m) 2^lo s + (127.5 - z) s, with
        # c a part's code bits lo..lo+nb-1 and m = (2^nb - 1)/2 their midpoint: no term
        # depends on r, so a level only appends parts. As int4 codes: q = c + 8 - 2^(nb-1),
        # scale 2^lo s, zero 2^lo s / 2 (+ (127.5 - z) s on the first part): small terms, no
        # bf16 cancellation. Later parts scale the first part's stored scale by 2^(lo - lo0)
        # (exact), so an upgrade needs no level-1 bytes.
        rows, cols = int(shape[0]), int(shape[1])
        n, fields = rows * cols, _fields(self.codec, shape, params, segment, level)
        chunks = _bitplane_chunks(params)
        parts, p = [], 0
        for lo, nb in chunks[level]:
            c = np.zeros(n, np.uint8)
            for _ in range(nb):  # planes run most significant first
                c = (c << 1) | unpack_plane(fields[p], 0, n)
                p += 1
            q = (c + (8 - (1 << (nb - 1)))).reshape(rows, cols)
            if level == 0 and not parts:
                s = _f16(fields[-2], rows)
                z = torch.from_numpy(np.frombuffer(fields[-1], dtype=np.uint8).astype(np.float32))
                scale = float(1 << lo) * s
                parts.append(
                    _int4_part(q, scale, scale / 2 + (127.5 - z.reshape(rows, -1)) * s, dtype)
                )
                continue
            first = (lin.parts[0] if lin is not None else parts[0])[1][..., 0]  # [G, N]
            scale = first * float(2.0 ** (lo - chunks[0][0][0]))
            parts.append((_pack_int4(q), torch.stack([scale, scale / 2], dim=-1).contiguous()))
        return parts

    def _state(self, shape, params, segment):
        rows, cols, g = int(shape[0]), int(shape[1]), params["group"]
        n, n_groups = rows * cols, rows * (cols // g)
        fields = _fields(self.codec, shape, params, segment, 0)
        r1 = params["bits"][0]
        t = np.zeros(n, dtype=np.uint8)
        for p in range(r1):
            t = (t << 1) | unpack_plane(fields[p], 0, n)
        s = np.frombuffer(fields[r1], dtype="<f2", count=n_groups).astype(np.float32)
        z = np.frombuffer(fields[r1 + 1], dtype=np.uint8, count=n_groups).astype(np.float32)
        return {"t": t, "s": s.reshape(rows, -1), "z": z.reshape(rows, -1)}

    def _advance(self, shape, params, state, segment, level):
        n = int(shape[0]) * int(shape[1])
        t = state["t"]
        for plane in _fields(self.codec, shape, params, segment, level):
            t = (t << 1) | unpack_plane(plane, 0, n)
        return {**state, "t": t}

    def _weight(self, shape, params, state, level):
        rows, cols, g = int(shape[0]), int(shape[1]), params["group"]
        r = params["bits"][level - 1]
        w = bitplane_view(state["t"].reshape(rows, cols // g, g), r, state["s"], state["z"])
        return w.reshape(rows, cols)

    def _state_nbytes(self, shape, params, dtype):
        rows, cols, g = int(shape[0]), int(shape[1]), params["group"]
        return rows * cols + 2 * 4 * rows * (cols // g)
