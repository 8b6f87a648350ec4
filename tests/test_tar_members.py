"""training/tar_members.py: the training loader's tar reader gives what webdataset's own gives.

The reference is always stock ``webdataset.tarfile_to_samples()`` (tarfile underneath) on the same
file: tars written by our resharder's settings, by webdataset's ``TarWriter`` with its defaults (a
pax header before every member), by Python's ``tarfile`` in GNU and pax formats with long and
non-ASCII names, directories, links and ``__meta__`` files; and real scene-text photos from
``../shared/realdata``. Broken tars must fail, naming the shard.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from stages.reshard import TAR_MODE, TAR_MTIME, TAR_OWNER
from training.tar_members import TarError, tar_file_expander

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "scenetext"


def _ours(path: Path) -> list[dict]:
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(path)]), wds.tariterators.url_opener, tar_file_expander, wds.tariterators.group_by_keys
    )
    return list(pipeline)


def _stock(path: Path) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))


def _photos() -> list[bytes]:
    found = sorted(REALDATA.glob("*/*.jp*g"))[:6]
    if not found:
        pytest.skip(f"{REALDATA} not found (../shared/realdata beside the clone)")
    return [p.read_bytes() for p in found]


def _add(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data) if kind in tarfile.REGULAR_TYPES else None)


def test_webdataset_tarwriter_shards_read_as_webdataset_reads_them(tmp_path):
    """Our resharder's settings (ustar, int mtime) and TarWriter's defaults (float mtime: a pax
    header before every member), real photos and captions: the same samples, byte for byte."""
    photos = _photos()
    for label, options in {"ours": {"mtime": TAR_MTIME, "user": TAR_OWNER, "group": TAR_OWNER, "mode": TAR_MODE},
                           "defaults": {}}.items():
        path = tmp_path / f"{label}.tar"
        with wds.TarWriter(str(path), **options) as writer:
            for i, jpg in enumerate(photos * 3):
                writer.write({"__key__": f"{i:06d}", "jpg": jpg, "txt": f"caption {i} ünïcödé", "json": b"{}"})
        if label == "defaults":
            with tarfile.open(path) as tar:
                assert any(m.pax_headers for m in tar.getmembers())  # the pax path really is taken
        ours, stock = _ours(path), _stock(path)
        assert len(ours) == len(photos) * 3
        assert ours == stock, label


@pytest.mark.parametrize("form", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_directories_links_and_meta_files_as_webdataset(tmp_path, form):
    """Names past 100 bytes (GNU long names, pax paths, ustar's prefix), non-ASCII names, upper-case
    extensions, directories, links and ``__meta__`` members: what webdataset keeps, and nothing else."""
    path = tmp_path / "mixed.tar"
    deep = "/".join(["folder"] * 12)  # 83 bytes of directories: a ustar prefix, or a long name
    with tarfile.open(path, "w", format=form) as tar:
        _add(tar, "__index__", b"skipped by webdataset")
        _add(tar, "data", b"", tarfile.DIRTYPE)
        _add(tar, "data/a.JPG", b"\xff\xd8 one")
        _add(tar, "data/a.txt", b"first")
        _add(tar, "data/a.link", b"", tarfile.SYMTYPE)
        _add(tar, f"{deep}/sample_with_a_rather_long_key_0001.jpg", b"two" * 300)
        _add(tar, f"{deep}/sample_with_a_rather_long_key_0001.txt", b"second")
        if form != tarfile.USTAR_FORMAT:  # ustar cannot hold these names
            _add(tar, f"{deep}/{'k' * 120}.jpg", b"three")
            _add(tar, f"{deep}/{'k' * 120}.txt", b"third")
            _add(tar, "données/échantillon.txt", "quatrième".encode())
        _add(tar, "empty.txt", b"")
    ours, stock = _ours(path), _stock(path)
    assert ours == stock
    assert [s["__key__"] for s in ours][:2] == ["data/a", f"{deep}/sample_with_a_rather_long_key_0001"]
    assert ours[0]["jpg"] == b"\xff\xd8 one" and "link" not in ours[0]


def test_a_duplicate_member_is_webdatasets_error(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "x.txt", b"1")
        _add(tar, "x.txt", b"2")
    for read in (_ours, _stock):
        with pytest.raises(ValueError, match="duplicate"):
            read(path)


def test_broken_tars_fail_naming_the_shard(tmp_path):
    """A flipped header byte, a tar cut inside a member, an empty file, a JPEG posing as a tar: an
    error naming the file, never a shorter epoch read without a word (stock webdataset's answer to
    the flipped byte)."""
    good = tmp_path / "good.tar"
    with wds.TarWriter(str(good), mtime=TAR_MTIME) as writer:
        for i in range(4):
            writer.write({"__key__": f"{i:04d}", "jpg": bytes(range(256)) * 20, "txt": f"c{i}"})
    data = good.read_bytes()
    second = data.index(b"0001.jpg")  # the third member's header
    broken = {
        "flipped": data[:second + 10] + b"X" + data[second + 11:],
        "cut": data[: second + 512 + 100],
        "empty": b"",
        "jpeg": b"\xff\xd8\xff\xe0" + bytes(2000),
    }
    for name, content in broken.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(content)
        with pytest.raises(TarError, match=str(path)):
            _ours(path)
        if name == "flipped":  # tarfile ends a tar at a bad header past the first: webdataset reads on short
            assert len(_stock(path)) == 1
        else:
            with pytest.raises(tarfile.ReadError):  # webdataset refuses the others too
                _stock(path)
