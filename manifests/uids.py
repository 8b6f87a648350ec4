"""A uid as 16 bytes, where a file holds one per sample per policy.

A uid is 128 bits written as 32 lowercase hex characters (``pipeline.download_runner.make_uid``).
The manifests keep the text, which people read and join on; a selection (every downloaded sample,
once per policy) keeps the 16 bytes (``fixed_size_binary(16)``): half the bytes, no lengths, and
nothing to compress, so 10M rows are written in a quarter of a second where the text took two
(zstd) and read back in a tenth. The catalog's selection views show the text again (``lower(hex(uid))``);
:func:`read_selection` does the same for Python.

Both conversions are NumPy over the Arrow buffers: no Python object per row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

UID_BYTES = 16
UID_TYPE = pa.binary(UID_BYTES)
HEX_CHARS = 2 * UID_BYTES
UID_BATCH = 1 << 20  # rows of uids read, converted or written at a time
_PIECE_ROWS = 1 << 24  # rows a converted piece holds: 32 bytes a row stays within int32 string offsets
_DIGITS = b"0123456789abcdef"
# a byte's two hex characters, as the uint16 that those two characters are in memory
_PAIR_OF_BYTE = np.frombuffer(b"".join(bytes([_DIGITS[b >> 4], _DIGITS[b & 15]]) for b in range(256)), np.uint16)
_BYTE_OF_PAIR = np.full(1 << 16, -1, np.int16)  # and back: -1 for any pair that is not two lowercase hex digits
_BYTE_OF_PAIR[_PAIR_OF_BYTE] = np.arange(256, dtype=np.int16)


def _pieces(uids: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    chunks = uids.chunks if isinstance(uids, pa.ChunkedArray) else [uids]
    return [c.slice(i, _PIECE_ROWS) for c in chunks for i in range(0, len(c), _PIECE_ROWS)] or [pa.array([], uids.type)]


def _bytes_of(text: pa.Array) -> pa.Array:
    n = len(text)
    if text.null_count:
        raise ValueError("a uid is missing (null)")
    if pa.types.is_large_string(text.type):
        text = text.cast(pa.string())
    if n == 0:
        return pa.array([], UID_TYPE)
    offsets = np.frombuffer(text.buffers()[1], np.int32)[text.offset : text.offset + n + 1]
    if not (np.diff(offsets) == HEX_CHARS).all():
        bad = pc.filter(text, pc.not_equal(pc.binary_length(text), HEX_CHARS))[0].as_py()
        raise ValueError(f"not a uid (32 hex characters): {bad!r}")
    chars = np.frombuffer(text.buffers()[2], np.uint8)[offsets[0] : offsets[0] + n * HEX_CHARS]
    values = _BYTE_OF_PAIR[np.frombuffer(chars.tobytes() if offsets[0] % 2 else chars, np.uint16)]
    if values.min() < 0:
        bad = text[int(np.flatnonzero(values < 0)[0]) // UID_BYTES].as_py()
        raise ValueError(f"not a uid (32 lowercase hex characters): {bad!r}")
    packed = values.astype(np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(UID_TYPE, n, [None, pa.py_buffer(packed)])


def _text_of(raw: pa.Array) -> pa.Array:
    n = len(raw)
    if raw.null_count:
        raise ValueError("a uid is missing (null)")
    if n == 0:
        return pa.array([], pa.string())
    data = np.frombuffer(raw.buffers()[1], np.uint8)[raw.offset * UID_BYTES : (raw.offset + n) * UID_BYTES]
    chars = _PAIR_OF_BYTE[data]
    offsets = np.arange(0, HEX_CHARS * (n + 1), HEX_CHARS, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars))


def uids_as_bytes(uids: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """Hex uids (strings) as 16-byte values, in order; anything else is a ValueError naming it."""
    if pa.types.is_fixed_size_binary(uids.type):
        _check_width(uids.type)
        return uids if isinstance(uids, pa.ChunkedArray) else pa.chunked_array([uids])
    return pa.chunked_array([_bytes_of(p) for p in _pieces(uids)], UID_TYPE)


def _check_width(kind: pa.DataType) -> None:
    if kind.byte_width != UID_BYTES:
        raise ValueError(f"a uid is {UID_BYTES} bytes, not {kind.byte_width}")


def uids_as_text(uids: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """16-byte uids as their 32-character lowercase hex, in order (text passes through)."""
    if not pa.types.is_fixed_size_binary(uids.type):
        return uids if isinstance(uids, pa.ChunkedArray) else pa.chunked_array([uids])
    _check_width(uids.type)
    return pa.chunked_array([_text_of(p) for p in _pieces(uids)], pa.string())


def with_uid_bytes(table: pa.Table) -> pa.Table:
    """``table`` with its text ``uid`` column as 16-byte uids: a selection made elsewhere (a test, a
    benchmark, another tool) as the pipeline writes one."""
    i = table.column_names.index("uid")
    return table.set_column(i, pa.field("uid", UID_TYPE, nullable=False), uids_as_bytes(table.column(i)))


def read_selection(path: str | Path, columns: list[str] | None = None, filesystem=None) -> pa.Table:
    """A selection (``selections/<policy>.parquet``) with its uids as text, as the manifests hold them."""
    table = pq.read_table(path, columns=columns, filesystem=filesystem)
    if "uid" in table.column_names:
        i = table.column_names.index("uid")
        table = table.set_column(i, pa.field("uid", pa.string(), nullable=False), uids_as_text(table.column(i)))
    return table


SQL_AS_TEXT = "lower(hex(uid))"  # DuckDB: a selection's 16-byte uid as the manifests' text
