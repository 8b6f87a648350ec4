"""``python -m pipeline export`` (issue 24 item 3): a selection as DataComp's subset file, as
Parquet, and as a URL list, from a real small run.

DataComp's side is written from its own code (mlfoundations/datacomp): ``baselines/apply_filter.py``
splits each uid as ``(int(uid[:16], 16), int(uid[16:32], 16))`` into ``np.dtype("u8,u8")``, sorts
and ``np.save``s; ``resharder.py``'s ``load_subset`` asserts the dtype of what ``np.load`` reads, and
its ``copy_worker`` finds a sample by ``np.searchsorted`` of ``divmod(int(uid, 16), 2**64)``: the
file must be sorted for that lookup to find it. Nothing here is computed with the exporter's code.
"""

from __future__ import annotations

import functools
import hashlib
import io
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.store import RunLayout
from pipeline.cli import main
from pipeline.download_runner import make_uid
from sources.url_list import read_url_list

U16 = np.dtype("u8,u8")  # resharder.py: u16 = np.dtype("u8,u8")
N = 12
MIN_L14 = 0.2


def datacomp_split(uids: list[str]) -> np.ndarray:
    """apply_filter.py's subset: each 32-hex uid as two u8, sorted, as np.save gets it."""
    array = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], U16)
    array.sort()
    return array


def load_subset(subset_file: Path) -> np.ndarray:
    """resharder.py's load_subset, for a local file."""
    with open(subset_file, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            subset = np.load(subset_file, mmap_mode="r")
            assert subset.dtype == U16
        else:
            subset = np.memmap(subset_file, U16, mode="r+")
    return subset


def resharder_count(subset: np.ndarray, uid: str) -> int:
    """How many times resharder.py's copy_worker writes the sample with this uid."""
    key_u16 = np.array([divmod(int(uid, 16), 2**64)], U16)[0]
    return int(np.searchsorted(subset, key_u16, "right") - np.searchsorted(subset, key_u16, "left"))


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def datacomp_run(ray_local, tmp_path_factory) -> dict:
    """A DataComp-shaped pool (uid, url, text, scores, face_bboxes) of N served photos and one broken
    URL, downloaded and selected by a policy on the pool's own L14 score."""
    base = tmp_path_factory.mktemp("datacomp")
    www = base / "www"
    www.mkdir()
    for i in range(N):
        Image.new("RGB", (100 + 10 * i, 80 + 4 * i), (20 * i % 255, 90, 200)).save(www / f"p{i}.jpg", quality=90)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{server.server_address[1]}"
    # DataComp's uids are 128-bit hex; half of these have the top bit set (past a signed int64)
    uids = [hashlib.md5(f"pool-{i}".encode()).hexdigest() for i in range(N + 1)]
    pool = pa.table({
        "uid": uids,
        "url": [f"{host}/p{i}.jpg" for i in range(N)] + [f"{host}/missing.jpg"],
        "text": [f"a photo number {i}" for i in range(N + 1)],
        "clip_l14_similarity_score": pa.array([0.14 + 0.01 * i for i in range(N + 1)], pa.float32()),
        "face_bboxes": pa.array([[[0.1, 0.2, 0.3, 0.4]] if i % 3 == 0 else [] for i in range(N + 1)],
                                pa.list_(pa.list_(pa.float64()))),
    })
    pq.write_table(pool, base / "pool.parquet")
    config = base / "config.toml"
    config.write_text('[download]\nallow_networks = ["127.0.0.1/32"]\nshard_size = 5\n\n'
                      '[policies.l14-top]\ndescription = "the pool\'s own ViT-L/14 score at least min_score"\n'
                      f'params = {{ min_score = {MIN_L14} }}\n'
                      'rules = { l14 = "clip_l14_similarity_score >= {min_score}" }\n')
    out = base / "out"
    code = main(["curate", "--dataset", "datacomp", "--url-list", str(base / "pool.parquet"), "--config", str(config),
                 "--output", str(out), "--stages", "download,filter", "--policies", "all,l14-top", "--no-progress"])
    assert code == 0
    yield {"root": out, "pool": pool, "base": base}
    server.shutdown()
    server.server_close()


def _rows(root: Path, sql: str) -> list[dict]:
    con = duckdb.connect(str(RunLayout(root).catalog_path), read_only=True)
    try:
        return con.execute(sql).to_arrow_table().to_pylist()
    finally:
        con.close()


def _export(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["export", *args])
    printed = capsys.readouterr()
    return code, printed.out.strip(), printed.err.strip()


def test_datacomp_subset_is_the_pools_own_uids_as_datacomp_writes_and_reads_them(datacomp_run, tmp_path, capsys):
    root, pool = datacomp_run["root"], datacomp_run["pool"].to_pylist()
    target = tmp_path / "subset.npy"
    code, out, err = _export(capsys, "--output", str(root), "--policy", "l14-top", "--format", "datacomp",
                             "--to", str(target))
    assert code == 0, err
    # what the policy kept, from the catalog: our selection joined to the pool's uid
    kept = [r["source_uid"] for r in _rows(root, "select source_uid from selection_l14_top join source using (uid) where kept")]
    # and by hand from the pool: the L14 rule, less the URL that could not be downloaded
    by_hand = [r["uid"] for r in pool if r["clip_l14_similarity_score"] >= MIN_L14 and "missing" not in r["url"]]
    assert sorted(kept) == sorted(by_hand) and 0 < len(kept) < N
    assert out.splitlines() == [out] and f"exported {len(kept)} kept sample(s)" in out and str(target) in out

    subset = load_subset(target)  # DataComp's own reader and its assertion
    expected = datacomp_split(kept)
    assert subset.dtype == U16 and np.array_equal(np.asarray(subset), expected)
    saved = io.BytesIO()
    np.save(saved, expected)
    assert target.read_bytes() == saved.getvalue()  # byte for byte what apply_filter.py's np.save writes
    assert any(hi >= 2**63 for hi, _ in expected.tolist())  # the unsigned half of the range is there
    # the resharder's lookup finds each kept sample once and no other pool sample
    for row in pool:
        assert resharder_count(subset, row["uid"]) == (1 if row["uid"] in kept else 0)


def test_parquet_has_exactly_the_kept_rows_with_the_pools_columns(datacomp_run, tmp_path, capsys):
    root, pool = datacomp_run["root"], {r["uid"]: r for r in datacomp_run["pool"].to_pylist()}
    target = tmp_path / "kept.parquet"
    code, out, err = _export(capsys, "--output", str(root), "--policy", "l14-top", "--format", "parquet",
                             "--to", str(target))
    assert code == 0, err
    table = pq.read_table(target)
    assert table.column_names[:7] == ["uid", "source_uid", "url", "caption", "shard", "key", "reason"]
    assert {"clip_l14_similarity_score", "source_face_bboxes"} <= set(table.column_names[7:])
    expected = {r["uid"]: r for r in _rows(root, "select s.uid, d.shard, d.key, s.reason from selection_l14_top s "
                                                 "join download d using (uid) where s.kept")}
    rows = table.to_pylist()
    assert len(rows) == len(expected) and {r["uid"] for r in rows} == set(expected)
    for row in rows:
        want = pool[row["source_uid"]]
        assert row["uid"] == make_uid(want["url"], want["text"])  # ours, from the pool's url and text
        assert (row["url"], row["caption"]) == (want["url"], want["text"])
        assert row["source_face_bboxes"] == want["face_bboxes"]
        assert row["clip_l14_similarity_score"] == pytest.approx(want["clip_l14_similarity_score"])
        assert row["clip_l14_similarity_score"] >= MIN_L14 - 1e-6
        assert (row["shard"], row["key"], row["reason"]) == tuple(expected[row["uid"]][c] for c in ("shard", "key", "reason"))


def test_urls_list_reads_back_as_the_same_rows(datacomp_run, tmp_path, capsys):
    root = datacomp_run["root"]
    target = tmp_path / "urls.parquet"
    code, out, err = _export(capsys, "--output", str(root), "--policy", "l14-top", "--format", "urls", "--to", str(target))
    assert code == 0, err
    written = pq.read_table(target)
    # img2dataset --input_format parquet --url_col url --caption_col caption: two string columns of these names
    assert written.column_names[:2] == ["url", "caption"]
    assert pa.types.is_string(written.schema.field("url").type) and pa.types.is_string(written.schema.field("caption").type)
    kept = _rows(root, "select s.uid, d.url, d.caption, src.source_uid from selection_l14_top s join download d using (uid) "
                       "join source src using (uid) where s.kept")
    back = read_url_list(str(target))  # what `curate --url-list` reads
    assert sorted(zip(back.column("url").to_pylist(), back.column("caption").to_pylist())) == \
        sorted((r["url"], r["caption"]) for r in kept)
    # a curate of it plans the same samples (same uids), and the pool's uid is its uid again
    assert {make_uid(u, c) for u, c in zip(back.column("url").to_pylist(), back.column("caption").to_pylist())} == \
        {r["uid"] for r in kept}
    assert sorted(back.column("source_uid").to_pylist()) == sorted(r["source_uid"] for r in kept)
    assert "source_face_bboxes" in back.column_names


def test_a_run_without_pool_uids_exports_ours_to_a_path_or_an_fsspec_url(embedded_run, tmp_path, capsys):
    root = embedded_run["root"]
    kept = [r["uid"] for r in _rows(root, "select uid from selection_no_text where kept")]
    assert 0 < len(kept)
    local = tmp_path / "deep" / "no-text.npy"
    code, out, err = _export(capsys, "--output", str(root), "--policy", "no-text", "--format", "datacomp", "--to", str(local))
    assert code == 0, err
    assert np.array_equal(np.asarray(load_subset(local)), datacomp_split(kept))
    assert f"0 the pool's own source_uid, {len(kept)} ours" in out

    url = "memory://exports/no-text.npy"
    code, out, err = _export(capsys, "--output", str(root), "--policy", "no-text", "--format", "datacomp", "--to", url)
    assert code == 0, err
    with fsspec.open(url, "rb") as f:
        assert f.read() == local.read_bytes()
    code, out, err = _export(capsys, "--output", str(root), "--policy", "no-text", "--format", "parquet",
                             "--to", "memory://exports/no-text.parquet")
    assert code == 0, err
    with fsspec.open("memory://exports/no-text.parquet", "rb") as f:
        table = pq.read_table(f)
    assert sorted(table.column("uid").to_pylist()) == sorted(kept)
    assert table.column("source_uid").null_count == len(kept)
    assert table.column_names == ["uid", "source_uid", "url", "caption", "shard", "key", "reason"]


def test_each_problem_is_one_line_and_exit_2(embedded_run, tmp_path, capsys):
    root = str(embedded_run["root"])
    cases = {
        "unknown policy 'nope'": ["--policy", "nope", "--format", "datacomp"],
        "policy 'laion-sim' has no selection": ["--policy", "laion-sim", "--format", "datacomp"],  # known, not run
        "unknown export format 'csv'": ["--policy", "no-text", "--format", "csv"],
    }
    for message, args in cases.items():
        code, out, err = _export(capsys, "--output", root, *args, "--to", str(tmp_path / "x.npy"))
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    code, out, err = _export(capsys, "--output", str(tmp_path / "nothing"), "--policy", "all", "--format", "urls",
                             "--to", str(tmp_path / "x.parquet"))
    assert code == 2 and "no catalog" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.parquet").exists()


def test_a_source_uid_that_is_not_a_datacomp_uid_is_refused(embedded_run, tmp_path, capsys):
    """A list whose `uid` column is not DataComp's: the catalog of a copy of the embedded run gets
    a `source` view as the pipeline builds it (uid, source_uid, the list's other columns)."""
    root = tmp_path / "run"
    root.mkdir()
    shutil.copy(RunLayout(embedded_run["root"]).catalog_path, root / "catalog.duckdb")
    ours = [r["uid"] for r in _rows(root, "select uid from selection_all where kept order by uid")]
    source_uids = [u.upper() for u in ours]  # upper-case hex is still a uid
    source_uids[3], source_uids[7] = "1234", "z" * 32
    pq.write_table(pa.table({"uid": ours, "source_uid": source_uids, "lang": ["en"] * len(ours)}), tmp_path / "src.parquet")
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute(f"create view source as select * from read_parquet('{tmp_path / 'src.parquet'}')")
    con.close()

    code, out, err = _export(capsys, "--output", str(root), "--policy", "all", "--format", "datacomp",
                             "--to", str(tmp_path / "all.npy"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "2 kept sample(s) have a source_uid that is not 32 hex digits" in err and "'1234'" in err
    assert not (tmp_path / "all.npy").exists()

    code, out, err = _export(capsys, "--output", str(root), "--policy", "all", "--format", "parquet",
                             "--to", str(tmp_path / "all.parquet"))
    assert code == 0, err
    table = pq.read_table(tmp_path / "all.parquet")
    assert dict(zip(table.column("uid").to_pylist(), table.column("source_uid").to_pylist())) == dict(zip(ours, source_uids))
    assert table.column("lang").to_pylist() == ["en"] * len(ours)


def test_help_explains_each_format(capsys):
    from pipeline.export import FORMATS

    with pytest.raises(SystemExit) as exit_:
        main(["export", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in FORMATS:
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split()) > 8, line  # a sentence, not just the name
    assert "subset-file" in text and "img2dataset" in text
