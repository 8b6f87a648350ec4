"""CLIP scoring stage vs the bare model forward on the same tensors.

    python bench/clip_bench.py [--quick]

The stage (``ClipScoreStage.process_batch``) takes decoded images, captions and OCR quads, and
does everything a score needs: masks the text regions (T-MARS), preprocesses every original and
masked image with open_clip's eval transform, tokenizes, runs the image and text towers, and
fills the rows. The bare forward gets the very tensors the stage builds (pixels of the originals
and the masked images, tokens), made beforehand, and only runs the towers, batch for batch as the
stage chunks them. The ratio is what the stage's own work costs on top of the model.

The shipped engine on a CPU is onnxruntime (``clip.engine = "auto"``, models/clip_onnx.py): the
bare forward is the exported towers' sessions. Two more ratios compare the stage with the same
stage on torch (``clip.engine = "torch"``: what the engine gains) and with open_clip's stock
``encode_image`` + ``encode_text`` over the full 77-token context on torch (what a user's loop runs;
the stage also trims the text forward to the batch's longest caption, exact under the causal mask).

A third side runs the stage with ``clip.keep_embeddings = false``: what keeping each sample's
image and caption embedding (float16, the catalog's ``embeddings`` view) costs in images/s, and,
from the rows both sides produced, what it costs in bytes of the clip_score part (one part of
all the images, written as the runner writes parts: zstd Parquet).

Same model object, same threads (the replica's CPUs, as in the DAG), batches taken in turns.
The embedded dataset's ground-truth boxes stand in for OCR quads (about half the images have
text, so the stage runs about 1.5 image forwards per sample).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BenchResult,
    Context,
    Ratio,
    Timer,
    decode_jpeg,
    quiet_warnings,
    standalone_main,
)

NAME = "clip"
TITLE = "CLIP scoring stage vs the bare model forward on the same tensors"
TARGET = 0.9


def run(ctx: Context, threads: int = 1) -> BenchResult:
    import numpy as np
    import torch

    from models.clip import mask_text_regions
    from models.clip_onnx import OnnxClip, trimmed
    from pipeline.config import load_config
    from sources.embedded import generate
    from stages.clip_score import ClipScoreStage

    result = BenchResult(NAME, TITLE)
    n_images = 32 if ctx.quick else 128
    rounds = 1 if ctx.quick else 3
    base = load_config().clip
    config = dataclasses.replace(base, device="cpu", cpus_per_replica=float(threads))
    samples = generate(n_images, seed=5)
    images = [decode_jpeg(s.image) for s in samples]
    quads = [[[list(map(float, p)) for p in quad] for quad in s.boxes] for s in samples]
    stage = ClipScoreStage(config)  # the shipped engine: onnxruntime on a CPU
    on_torch = ClipScoreStage(dataclasses.replace(config, engine="torch"))
    with quiet_warnings():
        stage.setup()  # threads = the replica's CPUs
        on_torch.setup()
    clip, torch_clip = stage.clip, on_torch.clip
    assert isinstance(clip, OnnxClip), f"the shipped engine on a CPU is onnxruntime, not {type(clip).__name__}"
    no_embeddings = ClipScoreStage(dataclasses.replace(config, keep_embeddings=False))
    no_embeddings.clip = clip  # the same model object
    size = config.batch_for("cpu")

    batches = []
    for lo in range(0, n_images, size):
        hi = min(n_images, lo + size)
        batch = {"uid": [s.sample_id for s in samples[lo:hi]], "image": images[lo:hi],
                 "caption": [s.caption for s in samples[lo:hi]], "decode_error": [None] * (hi - lo),
                 "ocr_status": ["ok"] * (hi - lo), "quads": quads[lo:hi],
                 "n_regions": [len(q) for q in quads[lo:hi]]}
        # the inputs the stage builds for this batch, made once, outside any timing
        masked = [mask_text_regions(images[i], quads[i]) for i in range(lo, hi) if quads[i]]
        pixels = clip.pixel_array(images[lo:hi] + masked)
        tokens = clip.tokenizer(batch["caption"])
        batches.append((batch, pixels, tokens))

    def bare(pixels: Any, tokens: Any) -> Any:
        """The exported towers alone (onnxruntime sessions) on the stage's inputs."""
        for start in range(0, len(pixels), size):
            image_emb = clip.image.run(None, {"pixels": pixels[start:start + size]})[0]
        return image_emb, clip.text.run(None, {"tokens": trimmed(tokens)})[0]

    def stock(pixels: Any, tokens: Any) -> Any:
        """What a stock open_clip loop runs: torch's encode_image and encode_text over the full context."""
        with torch.inference_mode():
            for start in range(0, len(pixels), size):
                image_emb = torch_clip.model.encode_image(torch.from_numpy(pixels[start:start + size]))
            return image_emb, torch_clip.model.encode_text(torch.from_numpy(tokens))

    timers = {"stage": Timer(), "stage on torch": Timer(), "no-embeddings": Timer(), "bare": Timer(), "stock": Timer()}
    with quiet_warnings():
        stage.process_batch({k: v[:2] for k, v in batches[0][0].items()})  # warm-up, untimed
        on_torch.process_batch({k: v[:2] for k, v in batches[0][0].items()})
        bare(batches[0][1][:2], batches[0][2][:2])
        outputs, outputs_off, outputs_torch = [], [], []
        for _ in range(rounds):
            for batch, pixels, tokens in batches:
                outputs.append(timers["stage"].run(lambda: stage.process_batch(batch)))
                outputs_torch.append(timers["stage on torch"].run(lambda: on_torch.process_batch(batch)))
                outputs_off.append(timers["no-embeddings"].run(lambda: no_embeddings.process_batch(batch)))
                timers["bare"].run(lambda: bare(pixels, tokens))
                timers["stock"].run(lambda: stock(pixels, tokens))

    # the same inputs: the stage's raw scores are the cosines of the bare forward's embeddings,
    # and the two engines' scores agree
    batch, pixels, tokens = batches[0]
    img, txt = bare(pixels[: len(batch["uid"])], tokens)
    img, txt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (img, txt))
    check = float(np.abs((img * txt).sum(-1) - np.array(outputs[0]["clip_score"], dtype=np.float32)).max())
    engines = float(max(abs(a - b) for out, ref in zip(outputs[: len(batches)], outputs_torch[: len(batches)])
                        for a, b in zip(out["clip_score"], ref["clip_score"])))

    total = n_images * rounds
    rate = {k: total / t.wall_s for k, t in timers.items()}
    overhead = rate["stage"] / rate["bare"]
    vs_stock = rate["stage"] / rate["stock"]
    vs_torch = rate["stage"] / rate["stage on torch"]
    forwards = sum(len(p) for _, p, _ in batches) / n_images
    per_sample = {"with": _part_bytes(outputs[: len(batches)]) / n_images,
                  "without": _part_bytes(outputs_off[: len(batches)]) / n_images}
    keep_cost = rate["stage"] / rate["no-embeddings"]
    result.rows.append(Ratio(NAME, "stage img/s / bare forward img/s (same inputs)", overhead, "x", f">= {TARGET:g}",
                             overhead >= TARGET, f"{rate['stage']:.2f} vs {rate['bare']:.2f} img/s, {threads} thread(s), onnxruntime"))
    result.rows.append(Ratio(NAME, "stage img/s on onnxruntime / on torch (clip.engine)", vs_torch, "x", "", None,
                             f"{rate['stage']:.2f} vs {rate['stage on torch']:.2f} img/s; scores differ by at most {engines:.1e}"))
    result.rows.append(Ratio(NAME, "stage img/s / stock open_clip forward (torch, 77-token text)", vs_stock, "x", "", None,
                             "onnxruntime, and the text forward trimmed to the longest caption (exact)"))
    dim = len(next(e for e in outputs[0]["image_embedding"] if e is not None))
    result.rows.append(Ratio(NAME, "stage img/s keep_embeddings on / off", keep_cost, "x", "", None,
                             f"{rate['stage']:.2f} vs {rate['no-embeddings']:.2f} img/s"))
    result.rows.append(Ratio(NAME, "clip_score part bytes/sample with / without embeddings",
                             per_sample["with"] / per_sample["without"], "x", "", None,
                             f"{per_sample['with']:.0f} vs {per_sample['without']:.0f} B/sample "
                             f"(2 x {dim} float16 = {4 * dim} B raw), zstd Parquet"))
    med = {k: statistics.median(t.laps) for k, t in timers.items()}
    result.data = {"images": n_images, "rounds": rounds, "threads": threads, "batch_size": size,
                   "model": clip.description, "engine": clip.engine, "image_forwards_per_sample": forwards,
                   "images_per_s": rate, "cpu_s_per_image": {k: t.cpu_s / total for k, t in timers.items()},
                   "median_batch_s": med, "max_abs_score_diff_stage_vs_bare": check,
                   "max_abs_score_diff_onnxruntime_vs_torch": engines,
                   "part_bytes_per_sample": per_sample, "embedding_dim": dim}
    result.markdown = "\n".join([
        f"{n_images} embedded images x {rounds} rounds, batches of {size}, {threads} thread(s) (a replica's "
        f"CPUs in the DAG), {clip.description}, {forwards:.2f} image forwards per sample (originals + text-masked).",
        "",
        "| side | images/s | CPU s / image | median s / batch |",
        "|---|---:|---:|---:|",
        *[f"| {k} | {rate[k]:.2f} | {t.cpu_s / total:.4f} | {med[k]:.3f} |" for k, t in timers.items()],
        "",
        "`stage`: `ClipScoreStage.process_batch` (mask, preprocess, tokenize, forward, rows) with the shipped "
        "engine, open_clip's model exported to onnxruntime (`clip.engine = \"auto\"` on a CPU); `stage on torch`: "
        "the same with `clip.engine = \"torch\"`; `bare`: the exported towers alone on the stage's inputs made "
        "beforehand; `stock`: open_clip's own `encode_image` and `encode_text` (full context) on torch. Stage scores "
        f"vs cosines of the bare embeddings: max abs difference {check:.1e}; onnxruntime vs torch stage scores: "
        f"{engines:.1e}. `no-embeddings`: the stage with `clip.keep_embeddings = false`.",
        "",
        f"Embeddings kept (`[clip] keep_embeddings`, the default): the clip_score part holds "
        f"{per_sample['with']:.0f} bytes per sample instead of {per_sample['without']:.0f} "
        f"({n_images} rows in one zstd Parquet part, as the runner writes them; two {dim}-d float16 vectors are "
        f"{4 * dim} bytes raw), and the stage runs at {keep_cost:.2f}x the images/s it has without them.",
    ])
    return result


def _part_bytes(outputs: list[dict[str, list]]) -> int:
    """Bytes of the rows as one clip_score part, written as ``manifests.store.write_table_atomic`` writes."""
    import tempfile

    import pyarrow as pa

    from manifests.schemas import schema_for
    from manifests.store import write_table_atomic

    schema = schema_for("clip_score")
    table = pa.concat_tables([pa.Table.from_pydict(out, schema=schema) for out in outputs])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "part.parquet"
        write_table_atomic(table, path)
        return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    return standalone_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
