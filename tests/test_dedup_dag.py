"""The dedup stage inside a whole curate run, on real photographs and their near-duplicates.

Real scene-text photos written by others (../shared/realdata/scenetext: mmocr's wildreceipt and
RapidOCR's test images, Apache-2.0) are served on 127.0.0.1 with a re-encoded, a resized and a
lightly cropped copy of each; img2dataset downloads them like any URL list. The run must put each
photo and its copies in one ``dup_group``, keep different photos apart, and the shipped ``dedup``
policy must keep exactly one sample per group while ``all`` keeps everything.
"""

from __future__ import annotations

import functools
import io
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.catalog import run_query
from manifests.store import RunLayout
from pipeline.cli import main

SCENETEXT = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "scenetext"
# A 64-bit pHash moves with every crop: measured on these photos after img2dataset's resize, 2% off
# each side costs 2-6 bits, but on the 348 px receipt (mmocr_wildreceipt/2.jpeg) and the 323 px
# ch_en_num.jpg 2-4% costs 8-18 bits, past the default radius of 10. Those two are left out of
# the crop case on purpose: pHash dedup catches re-encodes, resizes and light crops of larger photos.
PHOTOS = ["mmocr_wildreceipt/1.jpeg", "rapidocr_tests/en.jpg", "rapidocr_tests/korean.jpg",
          "rapidocr_tests/return_word_debug.jpg", "rapidocr_tests/issue_170.png"]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: D401 - silence the test server
        pass


def _variants(image: Image.Image) -> dict[str, bytes]:
    """The photo as served, and three near-duplicates of it: what the web is full of."""
    def jpeg(im: Image.Image, quality: int) -> bytes:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    w, h = image.size
    dx, dy = int(w * 0.02), int(h * 0.02)
    return {
        "orig": jpeg(image, 95),
        "reencoded": jpeg(image, 50),
        "resized": jpeg(image.resize((w // 2, h // 2), Image.LANCZOS), 90),
        "cropped": jpeg(image.crop((dx, dy, w - dx, h - dy)), 90),
    }


@pytest.fixture()
def near_duplicate_server(tmp_path):
    if not SCENETEXT.is_dir():
        pytest.skip(f"the real photos are not there: {SCENETEXT} (shared/ beside the checkout)")
    folder = tmp_path / "www"
    folder.mkdir()
    rows = []
    for i, name in enumerate(PHOTOS):
        with Image.open(SCENETEXT / name) as image:
            for kind, data in _variants(image).items():
                (folder / f"p{i}-{kind}.jpg").write_bytes(data)
                rows.append((f"p{i}-{kind}.jpg", i, f"photo {i} ({kind})"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", rows
    server.shutdown()
    server.server_close()


def test_near_duplicates_of_real_photos_form_one_group_each(ray_local, near_duplicate_server, tmp_path):
    base, rows = near_duplicate_server
    url_list = tmp_path / "photos.parquet"
    pq.write_table(pa.table({"url": [f"{base}/{f}" for f, _, _ in rows], "caption": [c for _, _, c in rows]}), url_list)
    config = tmp_path / "fast.toml"
    config.write_text('[download]\nallow_networks = ["127.0.0.1/32"]\n[ocr]\nengine = "rapidocr"\n')
    out = tmp_path / "out"
    assert main(["curate", "--url-list", str(url_list), "--config", str(config), "--output", str(out),
                 "--policies", "all,dedup", "--shard-size", "10", "--no-progress"]) == 0
    layout = RunLayout(out)
    _, got = run_query(layout, "select url, dup_group, dup_group_size, phash from samples where status = 'ok'")
    assert len(got) == len(rows), "every photo and copy downloads"
    photo_of = {f"{base}/{f}": photo for f, photo, _ in rows}
    groups: dict[int, set[str]] = {}
    for url, group, size, phash in got:
        assert phash is not None and group is not None
        groups.setdefault(photo_of[url], set()).add(group)
        assert size == 4, (url, size)
    assert all(len(g) == 1 for g in groups.values()), groups  # the copies of a photo share its group
    assert len(set.union(*groups.values())) == len(PHOTOS)  # and different photos do not
    kept = dict(run_query(layout, "select policy, count(*) filter (where kept) from selections group by 1")[1])
    assert kept == {"all": len(rows), "dedup": len(PHOTOS)}
    # the representative is the largest copy: the full-size original or its re-encode, never the half size
    _, reps = run_query(layout, "select url from samples join selection_dedup using (uid) where kept")
    assert not any(url.endswith(("-resized.jpg", "-cropped.jpg")) for (url,) in reps), reps
    assert sum(json.loads((layout.curated_dir("dedup") / "sizes.json").read_text()).values()) == len(PHOTOS)
