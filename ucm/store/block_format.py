"""On-disk format of one KV block: a small self-describing header, then raw bytes.

Why a custom format instead of ``torch.save``: a cache directory may be shared
by many hosts and written by anyone with access to it, so reading must never
execute code (pickle does) and must detect every file that is not exactly what
this engine would have written -- torn writes, bit flips, files from another
program, an older format, or a block of another layout -- so the caller can
treat it as a miss. Raw bytes also let us read straight into a preallocated
tensor with no intermediate copy.

Layout (all integers little-endian)::

    magic        8s   b"UCMKVBLK"
    version      u16  FORMAT_VERSION
    reserved     u16  0
    header_len   u32  bytes from the start of the file to the payload
    payload_len  u64
    header_crc   u32  CRC-32 (zlib's) of the fields above (except the CRCs) + variable part
    payload_crc  u32  CRC-32 (zlib's) of the payload
    variable:    u8 len + key bytes, u8 len + layout (ASCII),
                 u8 len + dtype name (ASCII), u8 ndim + ndim * u64 shape
    payload      payload_len raw bytes of the contiguous tensor

CRC32 rather than a cryptographic hash: it runs at several GB/s (faster than
the disk) and detects accidental damage; the directory's permissions, not the
checksum, are what keep out deliberate forgers.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

import torch

from ucm.store.checksum import crc32

MAGIC = b"UCMKVBLK"
FORMAT_VERSION = 1
# magic, version, reserved, header_len, payload_len
_PREFIX = struct.Struct("<8sHHIQ")
_CRCS = struct.Struct("<II")
FIXED_HEADER_BYTES = _PREFIX.size + _CRCS.size
# A sane header is a few hundred bytes; anything bigger is garbage we should not allocate for.
MAX_HEADER_BYTES = 64 * 1024

_DTYPE_NAMES = (
    "float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2",
    "int8", "uint8", "int16", "int32", "int64", "bool",
)
# Explicit allow-list: the dtype name in a header is looked up here, never
# resolved with getattr on arbitrary text.
DTYPES: Dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _DTYPE_NAMES if hasattr(torch, name)
}
_DTYPE_TO_NAME = {dtype: name for name, dtype in DTYPES.items()}


class BlockFormatError(ValueError):
    """A block file is not a valid block for the requested key and layout.

    ``reason`` is a short machine-readable tag (truncated, magic, version,
    header, key, layout, dtype, checksum, size) used for per-reason counters.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (a contiguous tensor is required).

    Viewing as uint8 first is what makes bfloat16 work: numpy has no bfloat16,
    but every dtype can be reinterpreted as bytes.
    """
    if not tensor.is_contiguous():
        raise ValueError("block tensors must be contiguous")
    flat = tensor.detach().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def encode_header(key: bytes, layout: str, tensor: torch.Tensor, payload_crc: int) -> bytes:
    """Serialize the header for ``tensor``; raises ValueError for unsupported input."""
    name = _DTYPE_TO_NAME.get(tensor.dtype)
    if name is None:
        raise ValueError(f"dtype {tensor.dtype} is not supported by the block format")
    layout_b = layout.encode("ascii")
    if len(key) > 255 or len(layout_b) > 255 or tensor.dim() > 255:
        raise ValueError("key, layout or ndim too long for the block header")
    var = b"".join(
        [
            bytes([len(key)]), key,
            bytes([len(layout_b)]), layout_b,
            bytes([len(name)]), name.encode("ascii"),
            bytes([tensor.dim()]), struct.pack(f"<{tensor.dim()}Q", *tensor.shape),
        ]
    )
    header_len = FIXED_HEADER_BYTES + len(var)
    payload_len = tensor.numel() * tensor.element_size()
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, header_len, payload_len)
    header_crc = crc32(var, crc32(prefix))
    return prefix + _CRCS.pack(header_crc, payload_crc) + var


def write_block(f: BinaryIO, key: bytes, layout: str, tensor: torch.Tensor) -> int:
    """Write header + payload to an open binary file; returns bytes written."""
    payload = tensor_bytes(tensor)
    header = encode_header(key, layout, tensor, crc32(payload))
    _write_all(f, header)
    _write_all(f, payload)
    return len(header) + len(payload)


def _write_all(f: BinaryIO, data: memoryview | bytes) -> None:
    """Unbuffered writes may be short; loop so a block is never silently cut."""
    view = memoryview(data).cast("B")
    while len(view):
        n = f.write(view)
        if n is None or n <= 0:
            raise OSError(f"write returned {n}")
        view = view[n:]


def _read_exact(f: BinaryIO, view: memoryview) -> int:
    """Fill ``view``; returns bytes read (less than its length only at EOF)."""
    total = 0
    while total < len(view):
        n = f.readinto(view[total:])
        if not n:
            break
        total += n
    return total


def _parse_var(var: bytes) -> Tuple[bytes, str, str, List[int]]:
    """Split the variable header part; raises BlockFormatError on malformed input."""
    pos = 0
    fields: List[bytes] = []
    try:
        for _ in range(3):
            n = var[pos]
            fields.append(var[pos + 1 : pos + 1 + n])
            pos += 1 + n
        ndim = var[pos]
        shape = list(struct.unpack_from(f"<{ndim}Q", var, pos + 1))
        pos += 1 + 8 * ndim
    except (IndexError, struct.error) as exc:
        raise BlockFormatError("header", f"malformed header: {exc}") from exc
    if pos != len(var):
        raise BlockFormatError("header", "header has trailing bytes")
    try:
        return fields[0], fields[1].decode("ascii"), fields[2].decode("ascii"), shape
    except UnicodeDecodeError as exc:
        raise BlockFormatError("header", f"non-ASCII header text: {exc}") from exc


Allocator = Callable[[Tuple[int, ...], torch.dtype], Tuple[torch.Tensor, memoryview]]
"""Where a block's payload is read into: a contiguous tensor of that shape and dtype,
and its bytes (:func:`tensor_bytes`; an allocator that has them already saves the
torch calls, which serialise a store's I/O threads)."""


def new_tensor(shape: Tuple[int, ...], dtype: torch.dtype) -> Tuple[torch.Tensor, memoryview]:
    """The default :data:`Allocator`: a fresh tensor."""
    tensor = torch.empty(shape, dtype=dtype)
    return tensor, tensor_bytes(tensor)


def read_block(f: BinaryIO, key: bytes, layout: str, alloc: Optional[Allocator] = None) -> torch.Tensor:
    """Read and fully verify one block from an open unbuffered binary file.

    Cheap checks (magic, version, header CRC, key, layout, sizes) run before
    the payload is read, so a wrong file costs one small read. The payload is
    read straight into ``alloc(shape, dtype)`` (default: a fresh tensor) and its
    CRC checked before the tensor is returned. Raises :class:`BlockFormatError`
    for any mismatch.
    """
    fixed = bytearray(FIXED_HEADER_BYTES)
    got = _read_exact(f, memoryview(fixed))
    if got < len(MAGIC) or fixed[: len(MAGIC)] != MAGIC:
        if got < len(MAGIC) and fixed[:got] == MAGIC[:got]:
            raise BlockFormatError("truncated", f"file ends after {got} bytes")
        raise BlockFormatError("magic", f"foreign file (magic {bytes(fixed[:8])!r})")
    if got < FIXED_HEADER_BYTES:
        raise BlockFormatError("truncated", f"header cut at {got} bytes")
    magic, version, _reserved, header_len, payload_len = _PREFIX.unpack_from(fixed)
    header_crc, payload_crc = _CRCS.unpack_from(fixed, _PREFIX.size)
    if version != FORMAT_VERSION:
        raise BlockFormatError("version", f"format version {version}, expected {FORMAT_VERSION}")
    if not FIXED_HEADER_BYTES <= header_len <= MAX_HEADER_BYTES:
        raise BlockFormatError("header", f"implausible header length {header_len}")
    var = bytearray(header_len - FIXED_HEADER_BYTES)
    if _read_exact(f, memoryview(var)) < len(var):
        raise BlockFormatError("truncated", "header cut short")
    if crc32(var, crc32(bytes(fixed[: _PREFIX.size]))) != header_crc:
        raise BlockFormatError("header", "header checksum mismatch")
    stored_key, stored_layout, dtype_name, shape = _parse_var(bytes(var))
    if stored_key != key:
        raise BlockFormatError("key", f"file holds key {stored_key.hex()}, not {key.hex()}")
    if stored_layout != layout:
        raise BlockFormatError("layout", f"layout {stored_layout!r}, expected {layout!r}")
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise BlockFormatError("dtype", f"unsupported dtype {dtype_name!r}")
    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = dtype.itemsize
    if numel * itemsize != payload_len:
        raise BlockFormatError("header", f"shape {shape} x {dtype_name} != {payload_len} bytes")
    file_size = os.fstat(f.fileno()).st_size
    if file_size < header_len + payload_len:
        raise BlockFormatError("truncated", f"{file_size} bytes, expected {header_len + payload_len}")
    if file_size > header_len + payload_len:
        raise BlockFormatError("size", f"{file_size} bytes, expected {header_len + payload_len}")
    target = (alloc or new_tensor)(tuple(shape), dtype)
    if not isinstance(target, tuple):
        raise TypeError("an Allocator returns (tensor, its bytes), not a bare tensor")
    tensor, view = target
    if _read_exact(f, view) < payload_len:
        raise BlockFormatError("truncated", "payload cut short")
    if crc32(view) != payload_crc:
        raise BlockFormatError("checksum", "payload checksum mismatch")
    return tensor
