"""A pool's own columns travel with its samples (issue 24 items 1, 2, 6): LAION's and DataComp's
metadata as published, real LAION alt-texts (shared/realdata/laion_captions10k, from
rom1504/img2dataset's tests, MIT), images served on 127.0.0.1."""

from __future__ import annotations

import decimal
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.store import RunLayout
from manifests.uids import read_selection
from pipeline.cli import main
from pipeline.config import load_config
from sources import open_source

REAL_CAPTIONS = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "laion_captions10k" / "test_10000.parquet"
N = 12


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def images(tmp_path):
    """N photos of different sizes on a static server on 127.0.0.1."""
    folder = tmp_path / "www"
    folder.mkdir()
    for i in range(N):
        Image.new("RGB", (120 + 10 * i, 90 + 5 * i), (20 * i % 255, 100, 200)).save(folder / f"p{i}.jpg", quality=90)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def loopback(tmp_path) -> Path:
    config = tmp_path / "loopback.toml"
    config.write_text('[download]\nallow_networks = ["127.0.0.1/32"]\nshard_size = 5\n')
    return config


def _real_captions(n: int) -> list[str]:
    if not REAL_CAPTIONS.is_file():
        pytest.skip(f"the real captions are not there: {REAL_CAPTIONS} (shared/ must sit beside the checkout)")
    return pq.read_table(REAL_CAPTIONS, columns=["TEXT"]).column("TEXT").to_pylist()[:n]


def laion_list(base: str, path: Path) -> pa.Table:
    """LAION-5B's parquet columns as published (URL, TEXT, WIDTH, HEIGHT, similarity, punsafe,
    pwatermark, LICENSE, NSFW), with real captions and our served URLs."""
    captions = _real_captions(N)
    table = pa.table({
        "URL": [f"{base}/p{i}.jpg" for i in range(N)],
        "TEXT": captions,
        "WIDTH": pa.array([640 + i for i in range(N)], pa.int32()),
        "HEIGHT": pa.array([480 + i for i in range(N)], pa.int32()),
        "similarity": [0.25 + 0.01 * i for i in range(N)],
        "punsafe": pa.array([0.01 * i if i != 3 else None for i in range(N)], pa.float32()),
        "pwatermark": pa.array([0.5] * N, pa.float32()),
        "LICENSE": ["?" if i % 2 else "creative-commons" for i in range(N)],
        "NSFW": ["UNLIKELY"] * N,
    })
    pq.write_table(table, path)
    return table


def _samples(out: Path, sql: str) -> list[dict]:
    con = duckdb.connect(str(RunLayout(out).catalog_path), read_only=True)
    try:
        return con.execute(sql).to_arrow_table().to_pylist()
    finally:
        con.close()


def test_laion_parquet_as_published_keeps_every_column_and_laion_sim_selects_like_a_hand_filter(
        ray_local, images, loopback, tmp_path, capsys):
    listing = laion_list(images, tmp_path / "laion.parquet")
    out = tmp_path / "out"
    config = tmp_path / "laion.toml"  # clip-score-top ranked by LAION's own score, not ours
    config.write_text(loopback.read_text() + '[policies.clip-score-top]\nparams = { keep_fraction = 0.25, score = "similarity" }\n')
    code = main(["curate", "--dataset", "laion-subset", "--url-list", str(tmp_path / "laion.parquet"),
                 "--config", str(config), "--output", str(out), "--stages", "download,filter",
                 "--policies", "all,laion-sim,clip-score-top", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rows = {r["url"]: r for r in _samples(out, "select * from samples")}
    assert len(rows) == N
    for want in listing.to_pylist():
        got = rows[want["URL"]]
        assert got["caption"] == want["TEXT"]  # LAION's TEXT is the caption, URL the url, with no flags
        assert got["source_width"] == want["WIDTH"] and got["source_height"] == want["HEIGHT"]
        for column in ("similarity", "punsafe", "pwatermark", "LICENSE", "NSFW"):
            assert got[column] == pytest.approx(want[column]) if isinstance(want[column], float) else got[column] == want[column]
        assert got["width"] is not None and got["width"] != want["WIDTH"]  # ours: the downloaded image's
    kinds = dict((r["column_name"], r["column_type"]) for r in _samples(out, "describe source"))
    assert kinds["similarity"] == "DOUBLE" and kinds["punsafe"] == "FLOAT" and kinds["source_width"] == "INTEGER"

    # the policy on similarity keeps exactly the rows a hand-written filter of the parquet keeps
    by_uid = {r["uid"]: r["url"] for r in rows.values()}
    kept = {by_uid[u] for u, k in zip(*_selection(out, "laion-sim")) if k}
    by_hand = {r["URL"] for r in listing.to_pylist() if r["similarity"] >= 0.3}
    assert kept == by_hand and 0 < len(kept) < N
    import numpy as np

    similarity = [r["similarity"] for r in listing.to_pylist()]
    bar = float(np.quantile(similarity, 1 - 0.25))  # linear interpolation: DuckDB's quantile_cont
    top = {by_uid[u] for u, k in zip(*_selection(out, "clip-score-top")) if k}
    assert top == {r["URL"] for r in listing.to_pylist() if r["similarity"] >= bar} and len(top) == 3

    # laion-subset's default policies add laion-sim when the list has the column; not otherwise
    dataset = load_config(None).dataset("laion-subset")
    source = open_source(dataset, url_list=str(tmp_path / "laion.parquet"))
    assert "laion-sim" in source.policies_for(dataset.policies)
    pq.write_table(listing.drop_columns(["similarity"]), tmp_path / "nosim.parquet")
    assert "laion-sim" not in open_source(dataset, url_list=str(tmp_path / "nosim.parquet")).policies_for(dataset.policies)


def _selection(out: Path, policy: str) -> tuple[list[str], list[bool]]:
    table = read_selection(RunLayout(out).selection_path(policy))
    return table.column("uid").to_pylist(), table.column("kept").to_pylist()


def test_datacomp_list_keeps_uid_nested_boxes_and_reports_repeated_ids(ray_local, images, loopback, tmp_path, capsys):
    uids = [f"{i:032x}" for i in range(N)]
    uids[5] = uids[4]  # the pool names one id twice (another url): planned once, reported
    boxes = [[[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.95]] if i % 3 == 0 else [] for i in range(N)]
    table = pa.table({
        "uid": uids,
        "url": [f"{images}/p{i}.jpg" for i in range(N)],
        "text": _real_captions(N),
        "original_width": [1000 + i for i in range(N)],
        "original_height": [800] * N,
        "clip_b32_similarity_score": pa.array([0.2 + 0.01 * i for i in range(N)], pa.float32()),
        "clip_l14_similarity_score": pa.array([0.15 + 0.01 * i for i in range(N)], pa.float32()),
        "face_bboxes": pa.array(boxes, pa.list_(pa.list_(pa.float64()))),
        "sha256": [f"{i:064x}" for i in range(N)],
    })
    pq.write_table(table, tmp_path / "pool.parquet")
    out = tmp_path / "out"
    code = main(["curate", "--dataset", "datacomp", "--url-list", str(tmp_path / "pool.parquet"),
                 "--config", str(loopback), "--output", str(out), "--stages", "download", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "1 row(s) repeating an earlier row's source_uid" in printed.out
    rows = {r["url"]: r for r in _samples(out, "select * from samples")}
    assert len(rows) == N - 1 and f"{images}/p5.jpg" not in rows
    for want in table.to_pylist():
        if want["url"].endswith("/p5.jpg"):
            continue
        got = rows[want["url"]]
        assert got["source_uid"] == want["uid"] and got["uid"] != want["uid"]  # ours stays ours
        assert got["source_face_bboxes"] == want["face_bboxes"]  # a list of float lists, whole (renamed: the faces step writes face_bboxes)
        assert got["source_original_width"] == want["original_width"] and got["source_sha256"] == want["sha256"]
        assert got["clip_l14_similarity_score"] == pytest.approx(want["clip_l14_similarity_score"])


def test_a_clashing_column_or_a_type_duckdb_cannot_hold_stops_before_any_work(tmp_path, capsys):
    base = pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]})
    cases = {
        "status": (base.append_column("Status", pa.array(["x"])), "'Status' has the name of a column the pipeline writes"),
        "decimal": (base.append_column("price", pa.array([decimal.Decimal("1.5")], pa.decimal256(40, 2))),
                    "'price' has type decimal256(40, 2), which the catalog"),
    }
    for name, (table, message) in cases.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        out = tmp_path / f"out-{name}"
        code = main(["curate", "--url-list", str(tmp_path / f"{name}.parquet"), "--output", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    # renaming or dropping it is what the message says, and it works
    pq.write_table(cases["status"][0], tmp_path / "status.parquet")
    dataset = load_config(None).dataset("laion-subset")
    from dataclasses import replace
    renamed = open_source(replace(dataset, rename_columns={"status": "source_status"}), url_list=str(tmp_path / "status.parquet"))
    assert renamed.source_columns() == ("source_status",)
    dropped = open_source(replace(dataset, drop_columns=("STATUS",)), url_list=str(tmp_path / "status.parquet"))
    assert dropped.source_columns() == ()


def test_bad_values_in_a_row_never_fail_the_list(tmp_path):
    """A number column with a word in it (past pyarrow's first block) is still numbers, that one null;
    a JSON key whose values change type is kept as text."""
    from sources.url_list import read_url_list

    n = 60_000
    lines = ["url,caption,score"] + [f"http://h/{i}.jpg,caption {i},{'n/a' if i == n - 3 else i / 4}" for i in range(n)]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    table = read_url_list(str(tmp_path / "list.csv"))
    assert table.schema.field("score").type == pa.float64()
    assert table.column("score").null_count == 1 and table.column("score")[n - 4].as_py() == (n - 4) / 4
    (tmp_path / "list.jsonl").write_text('{"url": "http://h/1", "caption": "a", "x": 1}\n'
                                         '{"url": "http://h/2", "caption": "b", "x": [1, 2]}\n')
    table = read_url_list(str(tmp_path / "list.jsonl"))
    assert table.column("x").to_pylist() == ["1", "[1, 2]"]


def test_appending_a_list_with_other_columns(ray_local, images, loopback, tmp_path, capsys):
    first = pa.table({"url": [f"{images}/p{i}.jpg" for i in range(4)], "caption": [f"c{i}" for i in range(4)],
                      "aesthetic": [5.0, 6.0, 7.0, 8.0]})
    second = pa.table({"url": [f"{images}/p{i}.jpg" for i in range(4, 7)], "caption": [f"c{i}" for i in range(4, 7)],
                       "lang": ["en", "de", "fr"]})
    pq.write_table(first, tmp_path / "a.parquet")
    pq.write_table(second, tmp_path / "b.parquet")
    out = tmp_path / "out"
    for name in ("a", "b"):
        code = main(["curate", "--url-list", str(tmp_path / f"{name}.parquet"), "--config", str(loopback),
                     "--output", str(out), "--stages", "download", "--no-progress"])
        assert code == 0, capsys.readouterr().err
    rows = {r["caption"]: (r["aesthetic"], r["lang"]) for r in _samples(out, "select caption, aesthetic, lang from samples")}
    assert rows == {"c0": (5.0, None), "c1": (6.0, None), "c2": (7.0, None), "c3": (8.0, None),
                    "c4": (None, "en"), "c5": (None, "de"), "c6": (None, "fr")}


def test_datacomp_npz_beside_the_list_is_imported_as_the_clip_step(ray_local, images, loopback, tmp_path, capsys):
    """DataComp's .npz (b32_img, b32_txt, l14_img, l14_txt, row-aligned with the parquet): the CLIP
    step scores by the pool's own l14 cosine, keeps the vectors, and decodes no image."""
    import numpy as np

    rng = np.random.default_rng(3)
    pool = pa.table({"uid": [f"{i:032x}" for i in range(N)], "url": [f"{images}/p{i}.jpg" for i in range(N)],
                     "text": _real_captions(N)})
    pq.write_table(pool, tmp_path / "pool.parquet")
    vectors = {}
    for model, dim in (("b32", 512), ("l14", 768)):
        for kind in ("img", "txt"):
            raw = rng.normal(size=(N, dim)).astype(np.float32)
            vectors[f"{model}_{kind}"] = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float16)
    vectors["l14_txt"][2] = vectors["l14_img"][2]  # one caption that matches its image exactly
    np.savez(tmp_path / "pool.npz", **vectors)
    out = tmp_path / "out"
    code = main(["curate", "--dataset", "datacomp", "--url-list", str(tmp_path / "pool.parquet"),
                 "--config", str(loopback), "--output", str(out), "--stages", "download,clip_score", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"{N} samples scored from the pool's own embeddings" in printed.out
    assert "per-sample stages: " not in printed.out  # nothing went through the model or the decoder
    rows = _samples(out, "select s.source_uid, s.clip_score, s.clip_model, s.clip_status, e.image_embedding, "
                         "e.text_embedding from samples s join embeddings e using (uid) order by s.source_uid")
    assert len(rows) == N
    for i, row in enumerate(rows):
        img, txt = vectors["l14_img"][i].astype(np.float32), vectors["l14_txt"][i].astype(np.float32)
        want = float(img @ txt / np.linalg.norm(img) / np.linalg.norm(txt))
        assert row["clip_status"] == "ok" and row["clip_score"] == pytest.approx(want, abs=1e-3)
        assert row["clip_model"] == "imported: datacomp npz l14 (pool.npz)"
        assert np.allclose(row["image_embedding"], img, atol=2e-3) and len(row["text_embedding"]) == 768
    assert rows[2]["clip_score"] == pytest.approx(1.0, abs=1e-3)
    # the same list with another row count beside it: one line naming both
    np.savez(tmp_path / "pool.npz", **{k: v[:-1] for k, v in vectors.items()})
    code = main(["curate", "--dataset", "datacomp", "--url-list", str(tmp_path / "pool.parquet"),
                 "--output", str(tmp_path / "out2"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "but the list has 12 rows" in err and len(err.splitlines()) == 1
