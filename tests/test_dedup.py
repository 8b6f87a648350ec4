"""The near-duplicate stages (stages/dedup.py): pHash per image, groups over the pool.

The photos are real scene-text pictures written by others, kept in ../shared/realdata/scenetext
(see its README): mmocr's wildreceipt receipts (open-mmlab/mmocr tests/data/kie_toy_dataset,
Apache-2.0), RapidOCR's test images (RapidAI/RapidOCR python/tests, Apache-2.0) and the
deep-text-recognition-benchmark demo crops (clovaai/deep-text-recognition-benchmark demo_image,
Apache-2.0). Their near-duplicates (JPEG quality 50, resized, lightly cropped) are made here.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import time
from pathlib import Path

import cv2
import duckdb
import numpy as np
import pyarrow as pa
import pytest
from scipy.fftpack import dct

import stages.dedup as dedup
from manifests.schemas import schema_for
from stages.base import PoolWork, Resources, StageContractError
from stages.dedup import DedupConfig, DedupStage, DupGroupStage, close_pairs, dup_groups, hamming, phash

SCENETEXT = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "scenetext"

# Photos of 100 px or more on the short side (the ones whose hash means something).
PHOTOS = [
    "mmocr_wildreceipt/1.jpeg",
    "mmocr_wildreceipt/2.jpeg",
    "rapidocr_tests/ch_en_num.jpg",
    "rapidocr_tests/en.jpg",
    "rapidocr_tests/issue_170.png",
    "rapidocr_tests/korean.jpg",
    "rapidocr_tests/return_word_debug.jpg",
    "dtrb_demo/demo_10.jpg",
    "dtrb_demo/demo_3.png",
    "dtrb_demo/demo_4.png",
    "dtrb_demo/demo_5.png",
    "dtrb_demo/demo_9.jpg",
]
# Of those, the ones whose 3 % crop moved the hash by at most the default radius when measured
# (4-10 bits); 2.jpeg, ch_en_num, return_word_debug and demo_3 moved by 12-14 bits, which is why
# a light crop is "usually", not "always", caught (see DedupConfig).
CROP_PHOTOS = [
    "mmocr_wildreceipt/1.jpeg",
    "rapidocr_tests/en.jpg",
    "rapidocr_tests/issue_170.png",
    "rapidocr_tests/korean.jpg",
    "dtrb_demo/demo_10.jpg",
    "dtrb_demo/demo_9.jpg",
]


def _load(relative: str) -> np.ndarray:
    bgr = cv2.imread(str(SCENETEXT / relative), cv2.IMREAD_COLOR)
    assert bgr is not None, relative
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _resize(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape[:2]
    method = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, (round(w * factor), round(h * factor)), interpolation=method)


def _crop(image: np.ndarray, fraction: float) -> np.ndarray:
    h, w = image.shape[:2]
    dy, dx = round(h * fraction), round(w * fraction)
    return image[dy : h - dy, dx : w - dx]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    if not SCENETEXT.is_dir():
        pytest.skip(f"the real photos are not there: {SCENETEXT} (shared/ must sit beside the checkout)")
    return {name: _load(name) for name in PHOTOS}


# -- the hash ------------------------------------------------------------------------------------


def _reference_phash(image: np.ndarray) -> int:
    """imagehash's pHash maths written out independently (scipy's unnormalised DCT, float64)."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float64)
    low = dct(dct(small, axis=0), axis=1)[:8, :8]
    value = 0
    for bit in (low > np.median(low)).ravel():
        value = (value << 1) | int(bit)
    return value - (1 << 64) if value >= 1 << 63 else value


def test_phash_is_the_dct_hash_as_signed_int64(photos):
    for name, image in photos.items():
        value = phash(image)
        assert isinstance(value, int) and -(1 << 63) <= value < (1 << 63), name
        assert value == _reference_phash(image), name
        assert (value & ((1 << 64) - 1)).bit_count() == 32, name  # median split: half the bits
    # Arrow's int64 holds every hash (the manifest column).
    assert pa.array([phash(im) for im in photos.values()], type=pa.int64()).null_count == 0
    # Greyscale input hashes like its RGB copy.
    receipt = photos["mmocr_wildreceipt/1.jpeg"]
    grey = cv2.cvtColor(receipt, cv2.COLOR_RGB2GRAY)
    assert phash(grey) == phash(np.repeat(grey[:, :, None], 3, axis=2))


def test_hamming_counts_differing_bits_of_signed_values():
    assert hamming(0, 0) == 0
    assert hamming(0, -1) == 64
    assert hamming(-(1 << 63), 0) == 1
    assert hamming(0b1011, 0b0110) == 3
    assert hamming(5, -6) == hamming(-6, 5) == 64


def test_phash_is_fast_on_a_512px_photo(photos):
    image = _resize(photos["mmocr_wildreceipt/1.jpeg"], 512 / 1600)  # 512x384, the stored size
    phash(image)
    start = time.perf_counter()
    for _ in range(50):
        phash(image)
    per_image = (time.perf_counter() - start) / 50
    assert per_image < 0.02, f"{per_image * 1e3:.1f} ms per 512 px image (measured ~0.4 ms on 2 cores)"


# -- the batch stage ------------------------------------------------------------------------------


def test_batch_scores_images_and_fails_rows_without_pixels(photos):
    stage = DedupStage(DedupConfig())
    receipt, korean = photos["mmocr_wildreceipt/1.jpeg"], photos["rapidocr_tests/korean.jpg"]
    batch = {
        "uid": ["a", "b", "c", "d"],
        "image": [receipt, None, korean, np.zeros((0, 0, 3), dtype=np.uint8)],
        "decode_error": [None, "cannot identify image file", None, None],
    }
    out = stage.process_batch(batch)
    stage.check_output(out)
    assert list(out) == schema_for("dedup").names
    assert out["uid"] == ["a", "b", "c", "d"]
    assert out["dedup_status"] == ["ok", "failed", "ok", "failed"]
    assert out["phash"][0] == phash(receipt) and out["phash"][2] == phash(korean)
    assert out["phash"][1] is None and out["phash"][3] is None
    assert out["dedup_error"][0] is None and out["dedup_error"][2] is None
    assert "cannot identify image file" in out["dedup_error"][1]
    assert "phash failed" in out["dedup_error"][3]
    # The rows make a manifest of the declared schema as they are.
    table = pa.Table.from_pydict(out, schema=schema_for("dedup"))
    assert table.num_rows == 4
    with pytest.raises(StageContractError, match="missing column"):
        stage.check_output({k: v for k, v in out.items() if k != "phash"})


def test_batch_without_decode_error_column_still_says_why():
    out = DedupStage(DedupConfig()).process_batch({"uid": ["x"], "image": [None]})
    assert out["dedup_status"] == ["failed"] and "no image" in out["dedup_error"][0]


def test_stage_declarations_and_resources():
    assert (DedupStage.name, DedupStage.reads, DedupStage.status_column) == ("dedup", ("image",), "dedup_status")
    assert DedupStage.output_schema.equals(schema_for("dedup"), check_metadata=True)
    assert DedupStage(DedupConfig()).resources(True) == Resources(cpus=0.25, gpus=0.0, batch_size=8, replicas=1)
    assert (DupGroupStage.name, DupGroupStage.reads, DupGroupStage.status_column) == (
        "dup_group", ("phash", "sha256", "original_width", "original_height"), None)
    assert DupGroupStage.output_schema.equals(schema_for("dup_group"), check_metadata=True)
    assert DupGroupStage(DedupConfig()).resources(False) == Resources(cpus=1.0)


def test_config_default_and_problems():
    assert DedupConfig().radius == 10
    assert DedupConfig().problems() == []
    assert DedupConfig(radius=0).problems() == [] and DedupConfig(radius=16).problems() == []
    for bad in (-1, 17, 64):
        (message,) = DedupConfig(radius=bad).problems()
        assert "dedup.radius must be within 0..16" in message


def test_module_imports_point_down():
    tree = ast.parse(Path(dedup.__file__).read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in modules if m.split(".")[0] == "pipeline"], modules


# -- near-duplicates of real photos ----------------------------------------------------------------


def _variants(image: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "jpeg50": _jpeg(image, 50),
        "half": _resize(image, 0.5),
        "double": _resize(image, 2.0),
        "all_at_once": _jpeg(_crop(_resize(image, 2.0), 0.03), 50),
    }


def test_reencoded_resized_and_cropped_copies_group_with_their_photo(photos):
    radius = DedupConfig().radius
    uids, hashes = [], []
    for index, (name, image) in enumerate(photos.items()):
        variants = _variants(image)
        if name in CROP_PHOTOS:
            variants["crop3"] = _crop(image, 0.03)
        else:  # no crop: the rest must still join its photo (re-encode and resize)
            del variants["all_at_once"]
        uids.append(f"p{index:02d}")
        hashes.append(phash(image))
        for label, variant in variants.items():
            uids.append(f"p{index:02d}-{label}")
            hashes.append(phash(variant))
    groups, sizes = dup_groups(uids, hashes, [None] * len(uids), radius)
    by_photo: dict[str, set[str]] = {}
    for uid, group in zip(uids, groups):
        by_photo.setdefault(uid.split("-")[0], set()).add(group)
    for index, name in enumerate(photos):
        photo = f"p{index:02d}"
        assert by_photo[photo] == {photo}, f"{name}: its copies are in groups {by_photo[photo]}"
    # Different photos never share a group, and every group is one photo with its copies.
    assert len({next(iter(g)) for g in by_photo.values()}) == len(photos)
    for uid, group, size in zip(uids, groups, sizes):
        assert size == sum(1 for u in uids if u.split("-")[0] == group), uid


def test_different_photos_are_far_apart_at_the_default_radius(photos):
    radius = DedupConfig().radius
    hashes = {name: phash(image) for name, image in photos.items()}
    closest = min(hamming(hashes[a], hashes[b]) for a, b in itertools.combinations(hashes, 2))
    assert closest > radius + 4, f"two different photos are only {closest} bits apart"
    names = list(hashes)
    groups, sizes = dup_groups(names, [hashes[n] for n in names], [None] * len(names), radius)
    assert groups == names and sizes == [1] * len(names)


def test_byte_equal_copies_group_by_sha256_without_phash():
    receipt = (SCENETEXT / "mmocr_wildreceipt/1.jpeg")
    if not receipt.is_file():
        pytest.skip(f"the real photos are not there: {SCENETEXT}")
    data = receipt.read_bytes()
    same = hashlib.sha256(bytes(data)).hexdigest()
    other = hashlib.sha256((SCENETEXT / "mmocr_wildreceipt/2.jpeg").read_bytes()).hexdigest()
    uids = ["z-copy", "a-copy", "m-other", "q-nothing", "b-hash-only"]
    phashes = [None, None, None, None, 12345]
    sha256s = [same, same, other, None, None]
    groups, sizes = dup_groups(uids, phashes, sha256s, 10)
    assert groups == ["a-copy", "a-copy", "m-other", None, "b-hash-only"]
    assert sizes == [2, 2, 1, None, 1]
    # A sha256 link and a pHash link chain into one group (transitive closure).
    groups, sizes = dup_groups(["c", "b", "a"], [None, 0b111, 0b1], [same, same, None], 2)
    assert groups == ["a", "a", "a"] and sizes == [3, 3, 3]


# -- the grouping against brute force ---------------------------------------------------------------


def _planted_hashes(seed: int, n: int) -> list[int]:
    """n random 64-bit hashes, a third of them near-copies (0-13 bits flipped) of another, some
    of those copied again (chains), and a few exact repeats."""
    rng = np.random.default_rng(seed)
    values = [int(v) for v in rng.integers(0, 1 << 64, size=n // 2, dtype=np.uint64)]
    while len(values) < n:
        source = values[int(rng.integers(0, len(values)))]
        flips = int(rng.integers(0, 14))
        for bit in rng.choice(64, size=flips, replace=False):
            source ^= 1 << int(bit)
        values.append(source)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in values]


def _brute_force_groups(uids, phashes, radius):
    """O(n^2) reference: every pair compared, components by union-find, named by smallest uid."""
    parent = list(range(len(uids)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    u = np.array(phashes, dtype=np.int64).view(np.uint64)
    within = np.bitwise_count(u[:, None] ^ u[None, :]) <= radius
    for i, j in zip(*np.nonzero(np.triu(within, 1))):
        parent[find(int(i))] = find(int(j))
    members: dict[int, list[str]] = {}
    for i, uid in enumerate(uids):
        members.setdefault(find(i), []).append(uid)
    return [min(members[find(i)]) for i in range(len(uids))], [len(members[find(i)]) for i in range(len(uids))]


@pytest.mark.parametrize("radius", [0, 1, 4, 8, 10, 16])
def test_dup_groups_agrees_with_brute_force(radius):
    phashes = _planted_hashes(seed=radius, n=2000)
    uids = [f"s{i:05d}" for i in range(len(phashes))]
    groups, sizes = dup_groups(uids, phashes, [None] * len(uids), radius)
    want_groups, want_sizes = _brute_force_groups(uids, phashes, radius)
    assert groups == want_groups and sizes == want_sizes
    if radius >= 4:
        assert max(sizes) > 2  # the planted copies and chains are there to be found


@pytest.mark.parametrize(("radius", "bands"), [(4, 6), (4, 8), (8, 11), (10, 13)])
def test_every_band_plan_finds_exactly_the_close_pairs(monkeypatch, radius, bands):
    """The search plan is chosen by cost; each plan (one or several bands must agree) is exact."""
    hashes = np.unique(np.array(_planted_hashes(seed=bands, n=1500), dtype=np.int64).view(np.uint64))
    near = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= radius
    want = set(zip(*(a.tolist() for a in np.nonzero(np.triu(near, 1)))))
    monkeypatch.setattr(dedup, "band_plan", lambda n, r: (bands, bands - r))
    i, j = close_pairs(hashes, radius)
    assert set(zip(i.tolist(), j.tolist())) == want and len(i) == len(want)
    assert want  # planted pairs exist


def test_band_plan_follows_the_pigeonhole_rule():
    assert dedup.band_plan(1000, 4) == (5, 1)  # small pools: the textbook radius + 1 bands
    for n, radius in [(10**4, 10), (10**6, 8), (10**6, 10)]:
        bands, agree = dedup.band_plan(n, radius)
        assert bands - agree == radius and agree >= 2  # wider keys where buckets would be huge


def test_dup_groups_does_not_depend_on_row_order():
    rng = np.random.default_rng(3)
    phashes: list[int | None] = list(_planted_hashes(seed=99, n=600))
    sha256s: list[str | None] = [None] * len(phashes)
    for i in rng.choice(len(phashes), size=60, replace=False):
        phashes[i] = None
    for i in rng.choice(len(phashes), size=80, replace=False):
        sha256s[i] = f"sha{int(rng.integers(0, 30))}"  # byte-equal copies across unrelated hashes
    uids = [f"u{int(v):06d}" for v in rng.permutation(10**6)[: len(phashes)]]
    groups, sizes = dup_groups(uids, phashes, sha256s, 10)
    expected = dict(zip(uids, zip(groups, sizes)))
    assert any(s and s > 2 for s in sizes)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(uids))
        g2, s2 = dup_groups([uids[i] for i in order], [phashes[i] for i in order],
                            [sha256s[i] for i in order], 10)
        assert dict(zip((uids[i] for i in order), zip(g2, s2))) == expected


def test_dup_groups_refuses_bad_input():
    with pytest.raises(ValueError, match="radius"):
        dup_groups(["a"], [1], [None], 64)
    with pytest.raises(ValueError, match="length"):
        dup_groups(["a", "b"], [1], [None, None], 4)
    assert dup_groups([], [], [], 4) == ([], [])


# -- the pool stage ---------------------------------------------------------------------------------


def _pool(stage: DupGroupStage, con, folder) -> pa.Table:
    return pa.Table.from_batches(list(stage.process_pool(con, PoolWork(folder))), schema=schema_for("dup_group"))


def test_pool_stage_groups_downloaded_samples_from_the_catalog(tmp_path):
    near = 0x00FF00FF00FF00FF
    other = 0x0F0F0F0F0F0F0F0F  # 32 bits from near and from ~near
    con = duckdb.connect()
    con.execute("create table samples (uid varchar, status varchar, phash bigint, sha256 varchar, "
                "original_width integer, original_height integer)")
    con.executemany(
        "insert into samples values (?, ?, ?, ?, ?, ?)",
        [
            ("d", "ok", near, "s1", 640, 480),  # the larger of its group: kept over b
            ("b", "ok", near ^ 0b111, "s2", 320, 240),  # 3 bits from d
            ("a", "ok", other, "s3", 100, 100),
            ("e", "ok", None, "s3", 100, 100),  # undecodable, but the same bytes as a; a tie: the smaller uid (a) is kept
            ("c", "failed", near, "s2", 2000, 2000),  # failed download: not in the output, links nothing
            ("f", "ok", None, None, None, None),
            ("g", "ok", ~near, "s4", None, None),  # all bits differ from d
        ],
    )
    table = _pool(DupGroupStage(DedupConfig()), con, tmp_path)
    got = table.to_pydict()
    assert {k: got[k] for k in ("uid", "dup_group", "dup_group_size", "dup_keeper")} == {
        "uid": ["a", "b", "d", "e", "f", "g"],
        "dup_group": ["a", "b", "b", "a", None, "g"],
        "dup_group_size": [2, 2, 2, 2, None, 1],
        "dup_keeper": [True, False, True, False, None, True],
    }
    # the exact tier: only a and e share their bytes (s3); d, b and g are alone; f has no bytes
    assert got["dup_exact_group"] == ["a", "b", "d", "a", None, "g"]
    assert got["dup_exact_size"] == [2, 1, 1, 2, None, 1]
    assert got["dup_exact_keeper"] == [True, True, True, False, None, True]
    assert got["dup_semantic_group"] == [None] * 6  # no embeddings in this pool
    DupGroupStage.check_output(table.column_names)


def test_pool_stage_on_an_empty_pool(tmp_path):
    con = duckdb.connect()
    con.execute("create table samples (uid varchar, status varchar, phash bigint, sha256 varchar, "
                "original_width integer, original_height integer)")
    table = _pool(DupGroupStage(DedupConfig()), con, tmp_path)
    assert table.num_rows == 0
