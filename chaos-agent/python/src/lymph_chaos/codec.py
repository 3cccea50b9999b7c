"""msgpack as lymph 0.15 writes and reads it, in pure Python: the client's only serialisation.

Why not the ``msgpack`` distribution: lymph 0.15 needs the ``msgpack`` *module* from ``msgpack-python`` 0.5.x (it
passes ``encoding='utf-8'``, which msgpack 1.0 removed), and pip does not know that ``msgpack-python`` provides the
module that ``msgpack`` ≥ 1.0 also provides. A client that declared ``msgpack`` would have pip install msgpack 1.x
over lymph's, and every lymph service in that environment would fail its requests. The messages the client
exchanges are a few hundred bytes, so a small codec costs nothing measurable and makes that conflict impossible.

What it covers — the whole msgpack format (https://github.com/msgpack/msgpack/blob/master/spec.md), packed the way
``msgpack.packb(obj, use_bin_type=True)`` packs (byte for byte, the smallest encoding of each value) and unpacked the
way ``msgpack.unpackb(data, raw=False, strict_map_key=False)`` unpacks (except that ext values, timestamps included,
stay :class:`ExtType` and array map keys become tuples):

=================  ==========================================================================================
Python             msgpack
=================  ==========================================================================================
``None``           nil
``bool``           false / true
``int``            positive/negative fixint, uint 8–64, int 8–64 (outside −2⁶³ … 2⁶⁴−1: :class:`PackError`)
``float``          float 64 (float 32 is read as well)
``str``            fixstr, str 8/16/32 (UTF-8; read: invalid UTF-8 is an :class:`UnpackError`)
``bytes``          bin 8/16/32 (``bytearray`` and ``memoryview`` are packed as bin too)
``list``/``tuple`` fixarray, array 16/32 (read as ``list``)
``dict``           fixmap, map 16/32 (read as ``dict``; array keys become tuples so that they hash)
:class:`ExtType`   fixext 1/2/4/8/16, ext 8/16/32 (read as :class:`ExtType`, timestamps included)
=================  ==========================================================================================

Anything else is a :class:`PackError` (lymph's own ``__type__`` tags for datetimes, decimals etc. are not needed by
the Chaos API, which speaks plain values).
"""

from __future__ import annotations

import struct
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

__all__ = ["ExtType", "PackError", "UnpackError", "pack", "unpack"]

#: Containers nested deeper than this are refused when reading (a hostile peer cannot exhaust the stack).
MAX_DEPTH = 200

_UINT64_MAX = (1 << 64) - 1
_INT64_MIN = -(1 << 63)


class ExtType(NamedTuple):
    """A msgpack extension value: ``code`` (−128 … 127) and raw ``data``."""

    code: int
    data: bytes


class PackError(TypeError):
    """A value msgpack cannot represent (an unsupported type, or an integer out of range)."""


class UnpackError(ValueError):
    """Bytes that are not exactly one well-formed msgpack value."""


def pack(obj: Any) -> bytes:
    """``obj`` as msgpack bytes, str as str and bytes as bin (``msgpack.packb(obj, use_bin_type=True)``).

    Raises:
        PackError: ``obj`` holds a value msgpack cannot represent.
    """
    out = bytearray()
    _pack_into(out, obj, 0)
    return bytes(out)


def unpack(data: Union[bytes, bytearray, memoryview]) -> Any:
    """The single msgpack value in ``data`` (``msgpack.unpackb(data, raw=False, strict_map_key=False)``).

    Raises:
        UnpackError: ``data`` is truncated, has bytes after the value, uses the reserved type byte ``0xc1``, holds a
            str that is not UTF-8, nests deeper than :data:`MAX_DEPTH`, or a map key that cannot be hashed.
    """
    raw = bytes(data)
    value, end = _Reader(raw).read(0, 0)
    if end != len(raw):
        raise UnpackError(f"{len(raw) - end} bytes after the msgpack value")
    return value


# ---------------------------------------------------------------------------------------------------------------
# packing


def _pack_into(out: bytearray, obj: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise PackError(f"containers nested deeper than {MAX_DEPTH}")
    if obj is None:
        out.append(0xC0)
    elif obj is True:
        out.append(0xC3)
    elif obj is False:
        out.append(0xC2)
    elif isinstance(obj, int):
        _pack_int(out, obj)
    elif isinstance(obj, float):
        out.append(0xCB)
        out += struct.pack(">d", obj)
    elif isinstance(obj, str):
        _pack_with_length(out, obj.encode("utf-8"), fix=(0xA0, 31), sizes=(0xD9, 0xDA, 0xDB), what="str")
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _pack_with_length(out, bytes(obj), fix=None, sizes=(0xC4, 0xC5, 0xC6), what="bin")
    elif isinstance(obj, ExtType):
        _pack_ext(out, obj)
    elif isinstance(obj, (list, tuple)):
        _pack_header(out, len(obj), fix=(0x90, 15), sizes=(None, 0xDC, 0xDD), what="array")
        for item in obj:
            _pack_into(out, item, depth + 1)
    elif isinstance(obj, dict):
        _pack_header(out, len(obj), fix=(0x80, 15), sizes=(None, 0xDE, 0xDF), what="map")
        for key, value in obj.items():
            _pack_into(out, key, depth + 1)
            _pack_into(out, value, depth + 1)
    else:
        raise PackError(f"cannot pack {type(obj).__name__} as msgpack")


def _pack_int(out: bytearray, n: int) -> None:
    if 0 <= n <= 0x7F:
        out.append(n)
    elif -32 <= n < 0:
        out.append(n & 0xFF)
    elif n > 0:
        for limit, marker, fmt in ((0xFF, 0xCC, ">B"), (0xFFFF, 0xCD, ">H"), (0xFFFF_FFFF, 0xCE, ">I")):
            if n <= limit:
                out.append(marker)
                out += struct.pack(fmt, n)
                return
        if n > _UINT64_MAX:
            raise PackError(f"integer {n} does not fit msgpack's 64 bits")
        out.append(0xCF)
        out += struct.pack(">Q", n)
    else:
        for limit, marker, fmt in ((-0x80, 0xD0, ">b"), (-0x8000, 0xD1, ">h"), (-0x8000_0000, 0xD2, ">i")):
            if n >= limit:
                out.append(marker)
                out += struct.pack(fmt, n)
                return
        if n < _INT64_MIN:
            raise PackError(f"integer {n} does not fit msgpack's 64 bits")
        out.append(0xD3)
        out += struct.pack(">q", n)


def _pack_header(
    out: bytearray, length: int, *, fix: Optional[Tuple[int, int]], sizes: Tuple[Optional[int], int, int], what: str
) -> None:
    """The type byte and length of a str, bin, array or map of ``length`` items (smallest form first)."""
    if fix is not None and length <= fix[1]:
        out.append(fix[0] | length)
        return
    size8, size16, size32 = sizes
    if size8 is not None and length <= 0xFF:
        out.append(size8)
        out.append(length)
    elif length <= 0xFFFF:
        out.append(size16)
        out += struct.pack(">H", length)
    elif length <= 0xFFFF_FFFF:
        out.append(size32)
        out += struct.pack(">I", length)
    else:
        raise PackError(f"{what} of {length} items is too long for msgpack")


def _pack_with_length(
    out: bytearray, payload: bytes, *, fix: Optional[Tuple[int, int]], sizes: Tuple[int, int, int], what: str
) -> None:
    _pack_header(out, len(payload), fix=fix, sizes=sizes, what=what)
    out += payload


_FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def _pack_ext(out: bytearray, ext: ExtType) -> None:
    code, data = ext
    if not isinstance(code, int) or not -128 <= code <= 127:
        raise PackError(f"ext type code {code!r} is not in -128..127")
    if not isinstance(data, bytes):
        raise PackError(f"ext data must be bytes, not {type(data).__name__}")
    marker = _FIXEXT.get(len(data))
    if marker is not None:
        out.append(marker)
    else:
        _pack_header(out, len(data), fix=None, sizes=(0xC7, 0xC8, 0xC9), what="ext")
    out += struct.pack(">b", code)
    out += data


# ---------------------------------------------------------------------------------------------------------------
# unpacking

# Fixed-size scalars: type byte → (struct format, size).
_SCALARS: Dict[int, Tuple[str, int]] = {
    0xCA: (">f", 4),
    0xCB: (">d", 8),
    0xCC: (">B", 1),
    0xCD: (">H", 2),
    0xCE: (">I", 4),
    0xCF: (">Q", 8),
    0xD0: (">b", 1),
    0xD1: (">h", 2),
    0xD2: (">i", 4),
    0xD3: (">q", 8),
}
# Length-prefixed values: type byte → (kind, struct format of the length, its size).
_SIZED: Dict[int, Tuple[str, str, int]] = {
    0xC4: ("bin", ">B", 1),
    0xC5: ("bin", ">H", 2),
    0xC6: ("bin", ">I", 4),
    0xC7: ("ext", ">B", 1),
    0xC8: ("ext", ">H", 2),
    0xC9: ("ext", ">I", 4),
    0xD9: ("str", ">B", 1),
    0xDA: ("str", ">H", 2),
    0xDB: ("str", ">I", 4),
    0xDC: ("array", ">H", 2),
    0xDD: ("array", ">I", 4),
    0xDE: ("map", ">H", 2),
    0xDF: ("map", ">I", 4),
}
_FIXEXT_SIZES = {marker: size for size, marker in _FIXEXT.items()}


class _Reader:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def take(self, pos: int, size: int) -> bytes:
        end = pos + size
        if end > len(self.data):
            raise UnpackError(f"truncated msgpack: {size} bytes needed at offset {pos}, {len(self.data) - pos} left")
        return self.data[pos:end]

    def read(self, pos: int, depth: int) -> Tuple[Any, int]:
        """The value starting at ``pos`` and the offset after it."""
        if depth > MAX_DEPTH:
            raise UnpackError(f"msgpack nested deeper than {MAX_DEPTH}")
        if pos >= len(self.data):
            raise UnpackError(f"truncated msgpack: a value needed at offset {pos}")
        marker = self.data[pos]
        pos += 1
        if marker <= 0x7F:
            return marker, pos
        if marker >= 0xE0:
            return marker - 0x100, pos
        if 0x80 <= marker <= 0x8F:
            return self.read_map(pos, marker & 0x0F, depth)
        if 0x90 <= marker <= 0x9F:
            return self.read_array(pos, marker & 0x0F, depth)
        if 0xA0 <= marker <= 0xBF:
            return self.read_str(pos, marker & 0x1F)
        if marker == 0xC0:
            return None, pos
        if marker == 0xC2:
            return False, pos
        if marker == 0xC3:
            return True, pos
        scalar = _SCALARS.get(marker)
        if scalar is not None:
            fmt, size = scalar
            return struct.unpack(fmt, self.take(pos, size))[0], pos + size
        fixext = _FIXEXT_SIZES.get(marker)
        if fixext is not None:
            return self.read_ext(pos, fixext)
        sized = _SIZED.get(marker)
        if sized is None:  # 0xc1, "never used"
            raise UnpackError(f"reserved msgpack type byte 0x{marker:02x} at offset {pos - 1}")
        kind, fmt, size = sized
        length = struct.unpack(fmt, self.take(pos, size))[0]
        pos += size
        if kind == "str":
            return self.read_str(pos, length)
        if kind == "bin":
            return self.take(pos, length), pos + length
        if kind == "ext":
            return self.read_ext(pos, length)
        if kind == "array":
            return self.read_array(pos, length, depth)
        return self.read_map(pos, length, depth)

    def read_str(self, pos: int, length: int) -> Tuple[str, int]:
        raw = self.take(pos, length)
        try:
            return raw.decode("utf-8"), pos + length
        except UnicodeDecodeError as err:
            raise UnpackError(f"msgpack str at offset {pos} is not UTF-8: {err}") from None

    def read_ext(self, pos: int, length: int) -> Tuple[ExtType, int]:
        code = struct.unpack(">b", self.take(pos, 1))[0]
        return ExtType(code, self.take(pos + 1, length)), pos + 1 + length

    def read_array(self, pos: int, length: int, depth: int) -> Tuple[List[Any], int]:
        items: List[Any] = []
        for _ in range(length):
            item, pos = self.read(pos, depth + 1)
            items.append(item)
        return items, pos

    def read_map(self, pos: int, length: int, depth: int) -> Tuple[Dict[Any, Any], int]:
        result: Dict[Any, Any] = {}
        for _ in range(length):
            key, pos = self.read(pos, depth + 1)
            value, pos = self.read(pos, depth + 1)
            try:
                result[_hashable(key)] = value
            except TypeError:
                raise UnpackError(f"msgpack map key {key!r} cannot be a Python dict key") from None
        return result, pos


def _hashable(key: Any) -> Any:
    """Array keys as tuples, so that they hash; map keys stay unhashable."""
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key
