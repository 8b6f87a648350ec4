"""A user's own URL list (not made by the embedded generator), and every way a list can be bad."""

from __future__ import annotations

import functools
import json
import struct
import threading
import zlib
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.store import RunLayout
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from sources.url_list import read_url_list


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: D401 - silence the test server
        pass


def _png_bomb() -> bytes:
    """A PNG whose header declares 100000 x 100000 pixels but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


@pytest.fixture()
def photo_server(tmp_path):
    """A plain static-file server on 127.0.0.1 with a few photos of the test's own making."""
    folder = tmp_path / "www"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "orange", "purple"]):
        image = Image.new("RGB", (200 + 40 * i, 150), colour)
        image.save(folder / f"photo{i}.jpg", quality=90)
    Image.new("RGB", (900, 700), "white").save(folder / "big.png")  # resized to <= 512 by img2dataset
    (folder / "bomb.png").write_bytes(_png_bomb())
    (folder / "empty.jpg").write_bytes(b"")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_users_own_parquet_list_with_other_column_names(ray_local, photo_server, tmp_path):
    base = photo_server
    rows = [{"image_url": f"{base}/photo{i}.jpg", "text": f"a plain {c} square"} for i, c in
            enumerate(["red", "green", "blue", "orange", "purple"])]
    rows += [
        {"image_url": f"{base}/big.png", "text": "a large white picture"},
        {"image_url": f"{base}/bomb.png", "text": "a decompression bomb"},
        {"image_url": f"{base}/empty.jpg", "text": "zero bytes"},
        {"image_url": f"{base}/nothing-here.jpg", "text": "a 404"},
        {"image_url": "ftp://127.0.0.1/x.jpg", "text": "an unsupported scheme"},
        {"image_url": f"{base}/photo0.jpg", "text": "a plain red square"},  # exact repeat of row 0
    ]
    list_path = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist(rows), list_path)
    out = tmp_path / "out"
    # the test server is on loopback, which the download guard refuses unless allowed on purpose
    config = tmp_path / "loopback.toml"
    config.write_text('[download]\nallow_networks = ["127.0.0.1/32"]\n')
    code = main(["curate", "--url-list", str(list_path), "--url-column", "image_url", "--caption-column", "text",
                 "--config", str(config), "--output", str(out), "--no-progress"])
    assert code == 0
    got = {r["url"].rsplit("/", 1)[-1]: r for r in pq.read_table(RunLayout(out).stage_dir("download")).to_pylist()}
    assert len(got) == len(rows) - 1  # the exact repeat is planned once
    for i in range(5):
        assert got[f"photo{i}.jpg"]["status"] == "ok"
        assert got[f"photo{i}.jpg"]["width"] == 200 + 40 * i
    assert got["big.png"]["status"] == "ok"
    assert (got["big.png"]["width"], got["big.png"]["original_width"]) == (512, 900)
    assert got["bomb.png"]["error_kind"] == "decompression_bomb"
    assert got["empty.jpg"]["status"] == "failed" and got["empty.jpg"]["error_kind"] == "empty_body"
    assert got["nothing-here.jpg"]["error_kind"] == "http_404"
    assert got["x.jpg"]["status"] == "failed" and got["x.jpg"]["error_kind"] == "unsupported_scheme"
    meta = json.loads((out / "input" / "dataset.json").read_text())
    assert meta["duplicates_dropped"] == 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_csv_and_jsonl_lists_are_read(tmp_path, fmt):
    path = tmp_path / f"list.{fmt}"
    if fmt == "csv":
        path.write_text('url,caption\nhttp://127.0.0.1:1/a.jpg,"a cat, sitting"\nhttp://127.0.0.1:1/b.jpg,\n')
    else:
        path.write_text('{"url": "http://127.0.0.1:1/a.jpg", "caption": "a cat, sitting"}\n'
                        '{"url": "http://127.0.0.1:1/b.jpg", "caption": null}\n')
    table = read_url_list(str(path))
    assert table.column_names == ["url", "caption"]
    assert table.column("caption").to_pylist() == ["a cat, sitting", ""]


def _bad_lists(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    missing = tmp_path / "missing_col.parquet"
    pq.write_table(pa.table({"link": ["http://127.0.0.1/a.jpg"], "caption": ["x"]}), missing)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("url,caption\n")
    not_table = tmp_path / "not_a_table.parquet"
    not_table.write_bytes(b"this is not parquet at all" * 10)
    unknown = tmp_path / "list.xlsx"
    unknown.write_text("whatever")
    return {
        "missing column": (missing, "missing column(s) 'url'"),
        "empty file": (empty, "the file is empty"),
        "no rows": (header_only, "no rows"),
        "not a table": (not_table, "not a readable parquet table"),
        "unknown format": (unknown, "cannot tell its format"),
        "no such file": (tmp_path / "nope.parquet", "file not found"),
    }


def test_bad_url_lists_give_one_clear_error_and_write_nothing(tmp_path, capsys):
    for name, (path, message) in _bad_lists(tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        code = main(["curate", "--url-list", str(path), "--output", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert err.startswith("error: URL list ") and message in err, (name, err)
        assert len(err.splitlines()) == 1, (name, err)
        assert not out.exists(), name


def test_laion_subset_without_a_list_says_what_to_do(capsys):
    assert main(["curate", "--dataset", "laion-subset", "--no-progress"]) == 2
    assert "needs a URL list" in capsys.readouterr().err


def test_another_list_into_the_same_output_is_appended(ray_local, photo_server, tmp_path, capsys):
    """(Once refused; now appended: tests/test_append.py tests appending in depth.)"""
    first = tmp_path / "a.csv"
    first.write_text(f"url,caption\n{photo_server}/photo1.jpg,one\n")
    second = tmp_path / "b.csv"
    second.write_text(f"url,caption\n{photo_server}/photo2.jpg,two\n")
    out = tmp_path / "out"
    assert main(["curate", "--url-list", str(first), "--output", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["curate", "--url-list", str(second), "--output", str(out), "--no-progress"]) == 0
    rows = pq.read_table(RunLayout(out).stage_dir("download")).to_pylist()
    assert sorted((r["caption"], r["shard"]) for r in rows) == [("one", "000000"), ("two", "000001")]
    meta = json.loads((out / "input" / "dataset.json").read_text())
    assert [i["rows"] for i in meta["inputs"]] == [1, 1]


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[download]\nshard_sise = 10\n")
    with pytest.raises(ConfigError, match="shard_sise"):
        load_config(bad)
    bad.write_text("[download]\nshard_size = 'ten'\n")
    with pytest.raises(ConfigError, match="download.shard_size must be int"):
        load_config(bad)
    bad.write_text("[ocr]\nengine = 'tesseract'\n")
    with pytest.raises(ConfigError, match="ocr.engine"):
        load_config(bad)
    bad.write_text("not toml [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_unknown_dataset_lists_the_known_ones(capsys):
    assert main(["curate", "--dataset", "nope", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nope'" in err and "embedded" in err and "laion-subset" in err
