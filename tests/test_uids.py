"""uids as 16 bytes and back (``manifests.uids``): exact round trips at any offset and size, and
a clear error for anything that is not a uid."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest

from manifests.uids import UID_TYPE, uids_as_bytes, uids_as_text, with_uid_bytes
from pipeline.download_runner import make_uid


def _uids(n: int) -> list[str]:
    return [make_uid(f"http://127.0.0.1/{i}.jpg", f"caption {i}") for i in range(n)]


def test_round_trip_equals_python_hex_at_any_offset():
    text = _uids(1000)
    packed = uids_as_bytes(pa.array(text))
    assert packed.type == UID_TYPE and packed.to_pylist() == [bytes.fromhex(u) for u in text]
    assert uids_as_text(packed).to_pylist() == text
    for start, length in ((1, 10), (333, 600), (999, 1), (0, 0)):
        # slices of both kinds (offsets into shared buffers), and chunked input
        assert uids_as_bytes(pa.array(text).slice(start, length)).to_pylist() == [bytes.fromhex(u) for u in text[start:start + length]]
        assert uids_as_text(packed.chunk(0).slice(start, length)).to_pylist() == text[start:start + length]
    chunked = pa.chunked_array([pa.array(text[:7]), pa.array(text[7:])])
    assert uids_as_text(uids_as_bytes(chunked)).to_pylist() == text
    table = with_uid_bytes(pa.table({"uid": text[:3], "kept": [True, False, True]}))
    assert table.schema.field("uid").type == UID_TYPE and table.column("kept").to_pylist() == [True, False, True]


def test_anything_but_32_lowercase_hex_characters_is_refused_by_name():
    good = _uids(3)
    for bad in ("0" * 31 + "é", "x" * 32, hashlib.sha256(b"a").hexdigest()[:32].upper(), "abc", good[0] + "0", good[0][:31] + "g"):
        with pytest.raises(ValueError, match="not a uid") as err:
            uids_as_bytes(pa.array(good + [bad]))
        assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match="missing"):
        uids_as_bytes(pa.array(good + [None]))
    for convert in (uids_as_text, uids_as_bytes):
        with pytest.raises(ValueError, match="16 bytes"):
            convert(pa.array([b"12345678"], pa.binary(8)))
