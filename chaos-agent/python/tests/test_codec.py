"""The pure-Python msgpack codec: byte-exact against fixed vectors, against the ``msgpack`` module where one is
installed (lymph's msgpack-python 0.5 in the lymph venv), and strict with malformed input."""

from __future__ import annotations

import importlib.util
import math
import random
import struct
from typing import Any, List, Tuple

import pytest

from lymph_chaos.codec import MAX_DEPTH, ExtType, PackError, UnpackError, pack, unpack


def uint(n: int) -> bytes:
    """positive fixint, uint 8 or uint 16."""
    if n < 0x80:
        return bytes([n])
    return b"\xcc" + bytes([n]) if n <= 0xFF else b"\xcd" + n.to_bytes(2, "big")


# (value, msgpack bytes): the smallest encoding of each value at every format boundary. The bytes are what
# `msgpack.packb(value, use_bin_type=True)` of msgpack 1.2.4 returned (ExtType as msgpack.ExtType), checked by hand
# against the format spec (https://github.com/msgpack/msgpack/blob/master/spec.md).
VECTORS: List[Tuple[Any, bytes]] = [
    (None, b"\xc0"),
    (False, b"\xc2"),
    (True, b"\xc3"),
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\xcc\x80"),
    (255, b"\xcc\xff"),
    (256, b"\xcd\x01\x00"),
    (65535, b"\xcd\xff\xff"),
    (65536, b"\xce\x00\x01\x00\x00"),
    (2**32 - 1, b"\xce\xff\xff\xff\xff"),
    (2**32, b"\xcf\x00\x00\x00\x01\x00\x00\x00\x00"),
    (2**64 - 1, b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff"),
    (-1, b"\xff"),
    (-32, b"\xe0"),
    (-33, b"\xd0\xdf"),
    (-128, b"\xd0\x80"),
    (-129, b"\xd1\xff\x7f"),
    (-32768, b"\xd1\x80\x00"),
    (-32769, b"\xd2\xff\xff\x7f\xff"),
    (-(2**31), b"\xd2\x80\x00\x00\x00"),
    (-(2**31) - 1, b"\xd3\xff\xff\xff\xff\x7f\xff\xff\xff"),
    (-(2**63), b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00"),
    (1.5, b"\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00"),
    (-0.25, b"\xcb\xbf\xd0\x00\x00\x00\x00\x00\x00"),
    ("", b"\xa0"),
    ("é", b"\xa2\xc3\xa9"),
    ("a" * 31, b"\xbf" + b"a" * 31),
    ("a" * 32, b"\xd9\x20" + b"a" * 32),
    ("a" * 255, b"\xd9\xff" + b"a" * 255),
    ("a" * 256, b"\xda\x01\x00" + b"a" * 256),
    ("a" * 65536, b"\xdb\x00\x01\x00\x00" + b"a" * 65536),
    (b"", b"\xc4\x00"),
    (b"\x00\xff", b"\xc4\x02\x00\xff"),
    (b"x" * 256, b"\xc5\x01\x00" + b"x" * 256),
    (b"x" * 65536, b"\xc6\x00\x01\x00\x00" + b"x" * 65536),
    ([], b"\x90"),
    ([1] * 15, b"\x9f" + b"\x01" * 15),
    ([1] * 16, b"\xdc\x00\x10" + b"\x01" * 16),
    ([None] * 65536, b"\xdd\x00\x01\x00\x00" + b"\xc0" * 65536),
    ({}, b"\x80"),
    ({"a": [1, {"b": None}]}, b"\x81\xa1a\x92\x01\x81\xa1b\xc0"),
    ({i: i for i in range(15)}, b"\x8f" + b"".join(bytes([i, i]) for i in range(15))),
    ({i: i for i in range(16)}, b"\xde\x00\x10" + b"".join(bytes([i, i]) for i in range(16))),
    ({i: None for i in range(65536)}, b"\xdf\x00\x01\x00\x00" + b"".join(uint(i) + b"\xc0" for i in range(65536))),
    (ExtType(5, b"x"), b"\xd4\x05x"),
    (ExtType(-1, b"\x00\x00\x00\x01"), b"\xd6\xff\x00\x00\x00\x01"),  # a timestamp 32 stays an ExtType
    (ExtType(101, b"ab"), b"\xd5\x65ab"),  # lymph's "embedded msgpack" ext code
    (ExtType(1, b"12345678"), b"\xd7\x0112345678"),
    (ExtType(1, b"0123456789abcdef"), b"\xd8\x010123456789abcdef"),
    (ExtType(-128, b""), b"\xc7\x00\x80"),
    (ExtType(127, b"abc"), b"\xc7\x03\x7fabc"),
    (ExtType(2, b"z" * 256), b"\xc8\x01\x00\x02" + b"z" * 256),
    (ExtType(3, b"z" * 65536), b"\xc9\x00\x01\x00\x00\x03" + b"z" * 65536),
]


def ids(vectors: List[Tuple[Any, bytes]]) -> List[str]:
    return [f"{type(v).__name__}-{len(b)}B" for v, b in vectors]


@pytest.mark.parametrize("value,encoded", VECTORS, ids=ids(VECTORS))
def test_vectors_pack_and_unpack_byte_exact(value: Any, encoded: bytes) -> None:
    assert pack(value) == encoded
    assert unpack(encoded) == value
    assert type(unpack(encoded)) is type(value)


def test_lymph_frames_captured_from_real_peers() -> None:
    # Headers and bodies lymph 0.15 and its CLI put on the wire (captured with pyzmq, see rpc.py's tests).
    assert unpack(b"\x82\xa7version\xc0\xa8trace_id\xd9 59b3aa2d3a9c4122a63ff494ff7f7594") == {
        "version": None,
        "trace_id": "59b3aa2d3a9c4122a63ff494ff7f7594",
    }
    assert pack({"trace_id": "abc", "version": None}) == b"\x82\xa8trace_id\xa3abc\xa7version\xc0"
    assert unpack(b"\x82\xa3got\x82\xa1a\x01\xa2dt\xc0\xa7subject\xa9Raw.hello") == {
        "got": {"a": 1, "dt": None},
        "subject": "Raw.hello",
    }


def test_other_python_values() -> None:
    assert pack((1, "a")) == pack([1, "a"]) and unpack(pack((1, "a"))) == [1, "a"]
    assert pack(bytearray(b"ab")) == pack(memoryview(b"ab")) == b"\xc4\x02ab"
    assert unpack(b"\xca\x3f\xc0\x00\x00") == 1.5  # float 32 is read too
    assert math.isnan(unpack(pack(float("nan"))))
    assert unpack(pack(float("inf"))) == float("inf")
    assert unpack(b"\x81\x92\x01\x02\xa1x") == {(1, 2): "x"}  # an array key becomes a tuple
    assert unpack(bytearray(b"\x01")) == 1


@pytest.mark.parametrize(
    "value",
    [2**64, -(2**63) - 1, {1, 2}, object(), 1j, ExtType(128, b""), ExtType(1, "not bytes")],  # type: ignore[arg-type]
)
def test_values_msgpack_cannot_hold(value: Any) -> None:
    with pytest.raises(PackError):
        pack(value)


def test_nesting_is_bounded_both_ways() -> None:
    deep: Any = None
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(PackError):
        pack(deep)
    assert unpack(b"\x91" * MAX_DEPTH + b"\xc0") is not None
    with pytest.raises(UnpackError, match="nested"):
        unpack(b"\x91" * (MAX_DEPTH + 1) + b"\xc0")


TRUNCATED = VECTORS[:40:3] + VECTORS[-10:]


@pytest.mark.parametrize("value,encoded", TRUNCATED, ids=ids(TRUNCATED))
def test_every_truncation_is_an_error(value: Any, encoded: bytes) -> None:
    for cut in range(len(encoded)) if len(encoded) < 64 else (0, 1, 2, 3, len(encoded) - 1):
        with pytest.raises(UnpackError):
            unpack(encoded[:cut])


@pytest.mark.parametrize(
    "data,message",
    [
        (b"\xc0\xc0", "after the msgpack value"),
        (b"\xc1", "reserved"),
        (b"\xa2\xc3\x28", "not UTF-8"),
        (b"\x81\x80\x01", "cannot be a Python dict key"),
        (b"\xdd\xff\xff\xff\xff", "truncated"),
        (b"\xc6\xff\xff\xff\xff\x00", "truncated"),
    ],
)
def test_malformed_input(data: bytes, message: str) -> None:
    with pytest.raises(UnpackError, match=message):
        unpack(data)
    assert issubclass(UnpackError, ValueError) and issubclass(PackError, TypeError)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack document without ext values (msgpack ≥ 1.0 reads ext −1 as its own Timestamp)."""
    kinds = ["none", "bool", "int", "float", "str", "bin"] + (["list", "dict"] * 2 if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        bits = rng.choice([5, 7, 8, 15, 16, 31, 32, 63])
        return rng.randint(-(2**bits), 2**bits)
    if kind == "float":
        return struct.unpack(">d", struct.pack(">d", rng.uniform(-1e300, 1e300)))[0]
    if kind == "str":
        return "".join(
            chr(rng.choice([0x41, 0xE9, 0x3B1, 0x1F600, rng.randint(0x20, 0xD7FF)]))
            for _ in range(rng.choice([0, 3, 31, 32, 256]))
        )
    if kind == "bin":
        return rng.randbytes(rng.choice([0, 1, 255, 256, 300])) if hasattr(rng, "randbytes") else b"\x00" * 3
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.choice([0, 2, 15, 16]))]
    return {
        rng.choice(["k", "key", "é", ""]) + str(i): random_value(rng, depth + 1)
        for i in range(rng.choice([0, 2, 15, 16]))
    }


@pytest.mark.skipif(
    importlib.util.find_spec("msgpack") is None,
    reason="no msgpack module here to compare with (the client does not install one)",
)
def test_agrees_with_the_installed_msgpack_module() -> None:
    """Whatever ``msgpack`` this environment has (lymph's 0.5.6 next to lymph, 1.x in the lint venv) packs what the
    codec packs and reads it back to the same values."""
    import msgpack

    rng = random.Random(20260)
    values = [v for v, _ in VECTORS if not isinstance(v, ExtType)] + [random_value(rng) for _ in range(100)]
    for value in values:
        ours = pack(value)
        assert ours == msgpack.packb(value, use_bin_type=True), value
        kwargs = {"raw": False}
        if tuple(getattr(msgpack, "version", (0,))) >= (1, 0, 0):
            kwargs["strict_map_key"] = False
        assert unpack(ours) == msgpack.unpackb(ours, **kwargs)
    for ext, encoded in [(v, b) for v, b in VECTORS if isinstance(v, ExtType) and v.code >= 0]:
        assert msgpack.packb(msgpack.ExtType(*ext), use_bin_type=True) == encoded
        assert tuple(msgpack.unpackb(encoded, raw=False)) == tuple(ext)
