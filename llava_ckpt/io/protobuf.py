"""The few bits of the protobuf wire format that .ckpt and strategy files need, without importing MindSpore
(its generated classes pull in the whole framework: about 1 s and 500 MB)."""
from __future__ import annotations


def varint(value: int) -> bytes:
    """Base-128 varint; negative int32/int64 become ten-byte two's complement, as protobuf writes them."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def int_field(field: int, value: int) -> bytes:
    return key(field, 0) + varint(value)


def bytes_field(field: int, payload: bytes) -> bytes:
    return key(field, 2) + varint(len(payload)) + payload


def ints_field(field: int, values) -> bytes:
    """A proto2 repeated scalar without [packed=true]: one key per element, as SerializeToString writes it."""
    return b"".join(int_field(field, v) for v in values)


def read_varint(buf, pos: int, end: int) -> tuple:
    """(value, next position); ValueError if it runs past `end` or is too long."""
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("malformed or truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(buf, start: int = 0, end: int | None = None):
    """Yield (field number, wire type, value) of one message in buf[start:end]: an int for varint and fixed
    fields, a (start, stop) span for length-delimited ones (so an mmap'd tensor is never copied).
    ValueError on anything malformed or running past `end`."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        tag, pos = read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = read_varint(buf, pos, end)
        elif wire == 2:
            length, pos = read_varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("truncated: a field runs past the end of its message")
            value, pos = (pos, pos + length), pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise ValueError("truncated: a field runs past the end of its message")
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value
