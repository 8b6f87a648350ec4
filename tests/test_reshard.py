"""Resharding a policy's kept samples: a small img2dataset-style run built here (source tars written
with webdataset's TarWriter, PIL JPEGs, DOWNLOAD parts, a SELECTION with a repeated uid), resharded
on the session's local Ray, read back with stock ``webdataset.WebDataset``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from manifests.schemas import CURATED, SELECTION, schema_for
from manifests.store import RunLayout
from manifests.uids import read_selection, with_uid_bytes
from pipeline.reshard_runner import ReshardReport, is_up_to_date, plan_reshard, reshard_policy
from stages.base import Resources
import stages.reshard as reshard_stage
from stages.reshard import CURATED_SHARD, TAR_MTIME, TAR_OWNER, ReshardStage, iter_kept_samples

SOURCE_SHARDS = 3
PER_SOURCE = 7  # as downloaded (img2dataset shard_size); one of them failed
PER_OUTPUT = 4
POLICY = "no-text"


def _jpeg(rng: random.Random) -> tuple[bytes, int, int]:
    width, height = rng.randint(8, 40), rng.randint(8, 40)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), width, height


def _img2dataset_key(index: int, shard_id: int) -> str:
    """img2dataset's compute_key for shard_size 7 (one digit per sample, six per shard)."""
    return f"{shard_id * 10 + index:07d}"


def build_run(root: Path, seed: int = 0) -> dict:
    """An img2dataset-shaped run: shards/<s>.tar (+ .parquet), manifests/download/part-<s>.parquet.

    Samples are written in a shuffled order (img2dataset writes in completion order), and the last
    sample of each shard failed (a manifest row, nothing in the tar). Returns {uid: source sample}.
    """
    rng = random.Random(seed)
    layout = RunLayout(root)
    layout.shards_dir.mkdir(parents=True)
    samples: dict[str, dict] = {}
    for shard_id in range(SOURCE_SHARDS):
        shard = f"{shard_id:06d}"
        rows, written = [], []
        for i in range(PER_SOURCE):
            uid = hashlib.sha256(f"{seed}-{shard}-{i}".encode()).hexdigest()[:32]
            caption = f"caption {shard_id}.{i} \u00e9t\u00e9"
            url = f"http://127.0.0.1/images/{uid}.jpg"
            key = _img2dataset_key(i, shard_id)
            ok = i != PER_SOURCE - 1
            jpg, width, height = _jpeg(rng) if ok else (None, None, None)
            meta = {"url": url, "caption": caption, "uid": uid, "key": key, "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "HTTP Error 404", "width": width, "height": height,
                    "original_width": width, "original_height": height, "sha256": hashlib.sha256(jpg).hexdigest() if ok else None}
            rows.append({"uid": uid, "url": url, "caption": caption, "status": "ok" if ok else "failed",
                         "error_kind": None if ok else "http_404", "error": None if ok else "HTTP Error 404", "shard": shard,
                         "key": key if ok else None, "width": width, "height": height, "original_width": width,
                         "original_height": height, "sha256": meta["sha256"], "download_engine": "img2dataset 1.47.0",
                         "downloaded_at": None})
            if ok:
                sample = {"__key__": key, "jpg": jpg, "txt": caption.encode(), "json": json.dumps(meta, indent=4).encode()}
                written.append(sample)
                samples[uid] = {**sample, "shard": shard}
        rng.shuffle(written)
        with wds.TarWriter(str(layout.shards_dir / f"{shard}.tar"), encoder=False) as sink:
            for sample in written:
                sink.write(sample)
        pq.write_table(pa.Table.from_pylist([json.loads(s["json"]) for s in written]), layout.shards_dir / f"{shard}.parquet")
        layout.stage_dir("download").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema_for("download")), layout.part_path("download", shard))
    return samples


def write_selection(layout: RunLayout, uids: list[str], kept: set[str], repeat: str | None = None) -> None:
    """One row per downloaded uid, plus a repeated row for ``repeat`` (a uid listed twice)."""
    order = uids + ([repeat] if repeat else [])
    rows = [{"uid": u, "policy": POLICY, "kept": u in kept, "reason": "kept" if u in kept else "dropped: text"} for u in order]
    layout.selections_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(with_uid_bytes(pa.Table.from_pylist(rows)).cast(SELECTION), layout.selection_path(POLICY))


def read_back(folder: Path) -> list[dict]:
    """Every sample of the policy's shards, read with stock webdataset (no decoding)."""
    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False)) if urls else []


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """The run, built once: every ok uid, the kept ones (two thirds), the source samples by uid."""
    root = tmp_path_factory.mktemp("reshard") / "source"
    samples = build_run(root)
    uids = sorted(samples)
    kept = {u for i, u in enumerate(uids) if i % 3 != 1}
    write_selection(RunLayout(root), uids, kept, repeat=sorted(kept)[0])
    return {"root": root, "samples": samples, "uids": uids, "kept": kept}


def copy_run(source: dict, dest: Path) -> RunLayout:
    shutil.copytree(source["root"], dest)
    return RunLayout(dest)


@pytest.fixture(scope="module")
def resharded(source, ray_local, tmp_path_factory) -> dict:
    layout = copy_run(source, tmp_path_factory.mktemp("reshard") / "run")
    report = reshard_policy(layout, POLICY, PER_OUTPUT, progress=False)
    return {"layout": layout, "report": report, "folder": layout.curated_dir(POLICY)}


def test_shards_hold_each_kept_uid_once(source, resharded):
    folder, report = resharded["folder"], resharded["report"]
    samples = read_back(folder)
    uids = [json.loads(s["json"])["uid"] for s in samples]
    assert sorted(uids) == sorted(source["kept"]) and len(set(uids)) == len(uids)
    assert isinstance(report, ReshardReport) and not report.skipped
    assert report.kept == len(source["kept"]) and report.duplicates_dropped == 1
    n = len(source["kept"])
    assert report.shards == -(-n // PER_OUTPUT) and report.bytes_written > 0

    sizes = json.loads((folder / "sizes.json").read_text())
    assert sum(sizes.values()) == n
    assert list(sizes) == [f"{i:06d}.tar" for i in range(report.shards)]
    assert all(v == PER_OUTPUT for v in list(sizes.values())[:-1]) and 0 < list(sizes.values())[-1] <= PER_OUTPUT
    for name, count in sizes.items():  # the per-tar counts open_clip will trust
        assert len(read_back_one(folder / name)) == count

    # output shard k holds the k-th slice of the uid-sorted kept list
    manifest = pq.read_table(folder / "manifest.parquet")
    assert manifest.schema.equals(CURATED)
    ordered = sorted(source["kept"])
    for name in sizes:
        shard = name.removesuffix(".tar")
        in_shard = {r["uid"] for r in manifest.to_pylist() if r["shard"] == shard}
        k = int(shard)
        assert in_shard == set(ordered[k * PER_OUTPUT : (k + 1) * PER_OUTPUT])
    by_key = {s["__key__"]: s for s in samples}
    for row in manifest.to_pylist():
        assert row["policy"] == POLICY and json.loads(by_key[row["key"]]["json"])["uid"] == row["uid"]
        assert source["samples"][row["uid"]]["__key__"] == row["source_key"]
    assert not list(folder.glob(".tmp-*"))


def read_back_one(tar: Path) -> list[dict]:
    return list(wds.WebDataset(str(tar), shardshuffle=False))


def test_bytes_preserved_json_rewritten_sibling_typed(source, resharded):
    folder = resharded["folder"]
    for tar in sorted(folder.glob("*.tar")):
        sibling = pq.read_table(tar.with_suffix(".parquet"))
        assert sibling.schema.equals(CURATED_SHARD)  # typed columns, not stringified dicts
        rows = sibling.to_pylist()
        samples = read_back_one(tar)
        assert [r["key"] for r in rows] == [s["__key__"] for s in samples]
        assert [r["uid"] for r in rows] == sorted(r["uid"] for r in rows)  # uid order, not download order
        for row, sample in zip(rows, samples):
            assert {k for k in sample if not k.startswith("__")} == {"jpg", "txt", "json"}
            meta = json.loads(sample["json"])
            original = source["samples"][meta["uid"]]
            assert sample["jpg"] == original["jpg"] and sample["txt"] == original["txt"]
            assert sample["__key__"].startswith(tar.stem) and meta["key"] == sample["__key__"]
            before = json.loads(original["json"])  # only the key changes; lineage is in the sibling, not the sample
            assert {k: v for k, v in meta.items() if k != "key"} == {k: v for k, v in before.items() if k != "key"}
            assert row["caption"] == original["txt"].decode() and row["uid"] == meta["uid"]
            assert (row["width"], row["height"]) == Image.open(io.BytesIO(sample["jpg"])).size
            assert (row["source_shard"], row["source_key"]) == (original["shard"], original["__key__"])


def test_rerun_is_skipped_and_a_new_policy_reshards_only_itself(source, resharded):
    layout, folder = resharded["layout"], resharded["folder"]
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = reshard_policy(layout, POLICY, PER_OUTPUT, progress=False)
    assert again.skipped and again.kept == resharded["report"].kept and again.bytes_written == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before

    other = "clip-score-top"
    rows = read_selection(layout.selection_path(POLICY)).to_pylist()
    pq.write_table(with_uid_bytes(pa.Table.from_pylist([{**r, "policy": other, "kept": True} for r in rows])).cast(SELECTION),
                   layout.selection_path(other))
    report = reshard_policy(layout, other, PER_OUTPUT, progress=False)
    assert not report.skipped and report.kept == len(source["uids"])
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_two_runs_give_byte_identical_tars(source, resharded, tmp_path):
    layout = copy_run(source, tmp_path / "second")
    reshard_policy(layout, POLICY, PER_OUTPUT, progress=False)
    first, second = resharded["folder"], layout.curated_dir(POLICY)
    names = sorted(p.name for p in first.glob("*.tar"))
    assert names == sorted(p.name for p in second.glob("*.tar"))
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
        assert pq.read_table(first / name.replace(".tar", ".parquet")).equals(pq.read_table(second / name.replace(".tar", ".parquet")))
    assert pq.read_table(first / "manifest.parquet").equals(pq.read_table(second / "manifest.parquet"))
    assert (first / "sizes.json").read_bytes() == (second / "sizes.json").read_bytes()
    with tarfile.open(first / names[0]) as tar:
        for info in tar.getmembers():
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (TAR_MTIME, 0, 0, TAR_OWNER, TAR_OWNER)


def test_changed_selection_redoes_the_policy(source, ray_local, tmp_path):
    layout = copy_run(source, tmp_path / "changing")
    first = reshard_policy(layout, POLICY, PER_OUTPUT, progress=False)
    folder = layout.curated_dir(POLICY)
    last_shard = folder / f"{first.shards - 1:06d}.tar"
    assert last_shard.exists()

    # fewer kept samples: fewer shards; the old last shard must not survive
    kept = set(sorted(source["kept"])[:PER_OUTPUT + 1])
    write_selection(layout, source["uids"], kept)
    sizes_time = (folder / "sizes.json").stat().st_mtime_ns
    os.utime(layout.selection_path(POLICY), ns=(sizes_time + 10**9, sizes_time + 10**9))
    assert not is_up_to_date(layout, POLICY, PER_OUTPUT)
    redo = reshard_policy(layout, POLICY, PER_OUTPUT, progress=False)
    assert not redo.skipped and redo.kept == len(kept) and redo.shards == 2
    assert not last_shard.exists() and sorted(p.name for p in folder.glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert sorted(json.loads(s["json"])["uid"] for s in read_back(folder)) == sorted(kept)
    assert not list(folder.parent.glob(".tmp-*"))

    # a selection restored with an old mtime is caught by its recorded hash; so is another shard size
    write_selection(layout, source["uids"], source["kept"])
    os.utime(layout.selection_path(POLICY), ns=(1, 1))
    assert not is_up_to_date(layout, POLICY, PER_OUTPUT)
    assert reshard_policy(layout, POLICY, PER_OUTPUT, progress=False).kept == len(source["kept"])
    assert is_up_to_date(layout, POLICY, PER_OUTPUT) and not is_up_to_date(layout, POLICY, PER_OUTPUT + 1)


def test_plan_dedups_sorts_and_refuses_unknown_uids(source, tmp_path):
    layout = copy_run(source, tmp_path / "plan")
    plan = plan_reshard(layout, POLICY, PER_OUTPUT)
    assert plan.kept == len(source["kept"]) and plan.duplicates_dropped == 1
    planned = [uid for s in plan.shards for _, keys in s.inputs for uid in keys.values()]
    assert sorted(planned) == sorted(source["kept"])
    for shard in plan.shards:
        assert [Path(t).stem for t, _ in shard.inputs] == sorted({Path(t).stem for t, _ in shard.inputs})

    write_selection(layout, source["uids"] + ["f" * 32], source["kept"] | {"f" * 32})
    with pytest.raises(ValueError, match="no downloaded sample"):
        plan_reshard(layout, POLICY, PER_OUTPUT)


class CountingFile(io.FileIO):
    """A file that counts the bytes read through it."""

    bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def test_stage_holds_one_sample_and_skips_dropped_bytes(tmp_path, monkeypatch):
    """Bounded memory by construction: samples come one at a time, dropped members are seeked over."""
    big = 1 << 20
    path = tmp_path / "big.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "jpg": os.urandom(big), "json": json.dumps({"uid": f"u{i}"}).encode()})
    with CountingFile(path) as f:
        samples = iter_kept_samples(f, {"k0", "k3"})
        key, members = next(samples)
        assert key == "k0" and len(members["jpg"]) == big
        assert big <= f.bytes_read < big + 64 * 1024  # the first sample, not the tar
        assert [k for k, _ in samples] == ["k3"]
        assert f.bytes_read < 2 * big + 64 * 1024  # k1 and k2 never read
    assert path.stat().st_size > 4 * big

    out = tmp_path / "out"
    stage = ReshardStage(POLICY, samples_per_shard=2)
    result = stage.process_shard("000007", [(path, {"k3": "u3", "k0": "u0"})], out)
    assert result.manifest.column("key").to_pylist() == ["0000070", "0000071"]  # tar order, new keys
    assert result.manifest.column("source_key").to_pylist() == ["k0", "k3"]
    assert result.files == {"tar": out / "000007.tar", "parquet": out / "000007.parquet"}
    assert result.bytes_written == sum(p.stat().st_size for p in result.files.values())
    ReshardStage.check_output(result.manifest.column_names)
    with pytest.raises(ValueError, match="not in the tar"):
        stage.process_shard("000008", [(path, ["k1", "nope"])], out)

    with pytest.raises(ValueError, match="holds uid"):
        stage.process_shard("000009", [(path, {"k1": "wrong"})], out)
    with pytest.raises(ValueError, match="more than samples_per_shard"):
        stage.process_shard("000010", [(path, ["k0", "k1", "k2"])], out)
    with pytest.raises(ValueError, match="listed twice"):
        stage.process_shard("000011", [(path, ["k0"]), (path, ["k1"])], out)
    assert sorted(p.name for p in out.iterdir()) == ["000007.parquet", "000007.tar"]  # failures leave nothing

    # uid order whatever the sources' order, through a spool that spills to disk past its bound:
    # a sample's place does not depend on which shard it was downloaded into (a retry, an appended list)
    other = tmp_path / "other.tar"
    with wds.TarWriter(str(other), encoder=False) as sink:
        sink.write({"__key__": "k9", "jpg": b"early", "json": json.dumps({"uid": "u1"}).encode()})
    ordered = tmp_path / "ordered"
    monkeypatch.setattr(reshard_stage, "SPOOL_IN_MEMORY_BYTES", 1024)
    three = ReshardStage(POLICY, samples_per_shard=3).process_shard(
        "000012", [(path, {"k0": "u0", "k3": "u3"}), (other, {"k9": "u1"})], ordered)
    assert three.manifest.column("uid").to_pylist() == ["u0", "u1", "u3"]
    assert [s["jpg"][:5] for s in read_back_one(ordered / "000012.tar")][1] == b"early"
    assert not [p for p in ordered.iterdir() if p.suffix not in (".tar", ".parquet")]  # no spool left behind


def test_reshard_stage_declares_its_contract():
    stage = ReshardStage(POLICY, PER_OUTPUT)
    assert stage.resources(gpus_available=True) == Resources(cpus=1.0)  # what each Ray task asks for
    assert (stage.name, stage.reads, stage.status_column) == ("reshard", ("uid", "kept", "shard", "key"), None)
    assert stage.output_schema.equals(CURATED)


def test_failed_shard_leaves_no_marker_and_the_rerun_redoes(source, ray_local, tmp_path):
    layout = copy_run(source, tmp_path / "broken")
    tar = layout.shards_dir / "000001.tar"
    tar.rename(tar.with_name("away.tar"))
    with pytest.raises(RuntimeError, match="shard 0000"):
        reshard_policy(layout, POLICY, PER_OUTPUT, progress=False)
    assert not (layout.curated_dir(POLICY) / "sizes.json").exists()
    tar.with_name("away.tar").rename(tar)
    report = reshard_policy(layout, POLICY, PER_OUTPUT, progress=False)
    assert not report.skipped and sorted(json.loads(s["json"])["uid"] for s in read_back(layout.curated_dir(POLICY))) == sorted(source["kept"])
