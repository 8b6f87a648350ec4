"""Training step time with patch masking (FLIP random, CLIP-PGS) vs none, side by side.

    python bench/train_bench.py [--steps N] [--batch-size B] [--model NAME] [--threads T]

One model, one optimiser, the same real embedded images (resized to the model's input) and
captions for every variant; the variants take turns step by step (round-robin), so that background
load slows them alike. The first round is a warm-up and is not timed. A step is forward + backward +
AdamW update, plus the patch selection for the masked variants (PGS selection is part of its cost).
Prints the median step time per variant and each masked variant's ratio to no masking.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

VARIANTS: tuple[tuple[str, float], ...] = (("none", 0.0), ("random", 0.3), ("random", 0.5), ("pgs", 0.3), ("pgs", 0.5))


def run_benchmark(steps: int, batch_size: int, model_name: str, threads: int) -> list[dict]:
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    from models import patch_masking
    from models.clip import register_model_configs
    from sources.embedded import generate

    register_model_configs()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    samples = generate(batch_size, seed=3)
    images = torch.stack([preprocess(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples])
    texts = tokenizer([s.caption for s in samples])
    dropper = patch_masking.install(model)
    grid_h, grid_w = patch_masking.patch_grid(model)
    n_patches, patch_size = grid_h * grid_w, model.visual.patch_size[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = open_clip.ClipLoss()
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step(masking: str, ratio: float) -> float:
        start = time.perf_counter()
        if masking == "random":
            dropper.keep = patch_masking.random_keep_indices(batch_size, n_patches, ratio, generator)
        elif masking == "pgs":
            dropper.keep = patch_masking.pgs_keep_indices(images, patch_size, ratio, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(*model(images, texts)).backward()
        optimizer.step()
        dropper.keep = None
        return time.perf_counter() - start

    times: dict[tuple[str, float], list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(steps + 1):
        for variant in VARIANTS:
            elapsed = step(*variant)
            if round_:
                times[variant].append(elapsed)
    base = statistics.median(times[VARIANTS[0]])
    return [
        {"masking": m, "ratio": r, "tokens": 1 + patch_masking.keep_count(n_patches, r) if m != "none" else 1 + n_patches,
         "median_s": statistics.median(times[(m, r)]), "vs_none": statistics.median(times[(m, r)]) / base,
         "p90_s": float(np.percentile(times[(m, r)], 90))}
        for m, r in VARIANTS
    ]


NAME = "masking"
TITLE = "Training step time with CLIP-PGS / FLIP patch dropout vs no masking"


def run(ctx: object) -> object:
    """``make bench``'s entry: each masked variant's step time over no masking, round-robin."""
    from bench.common import BenchResult, Ratio, quiet_warnings

    steps, batch_size, model = (2 if ctx.quick else 8), 64, "curation-tiny"  # type: ignore[attr-defined]
    with quiet_warnings():
        rows = run_benchmark(steps, batch_size, model, ctx.cores)  # type: ignore[attr-defined]
    out = BenchResult(NAME, TITLE, data={"rows": rows, "steps": steps, "batch_size": batch_size, "model": model})
    for row in rows[1:]:
        out.rows.append(Ratio(NAME, f"step time {row['masking']} {row['ratio']:.1f} / none", row["vs_none"], "x", "",
                              None, f"{row['tokens']} of {rows[0]['tokens']} image tokens; "
                              f"{(1 - row['vs_none']) * 100:+.0f}% time saved"))
    out.markdown = "\n".join([
        f"`{model}`, batch {batch_size}, {steps} timed steps per variant after a warm-up round, variants in turns, "
        f"{ctx.cores} torch threads; a step is forward + backward + AdamW, plus the patch selection for the masked "  # type: ignore[attr-defined]
        "variants (PGS's Sobel + Sinkhorn selection is part of its cost). No target: the issue asks for the "
        "comparison.",
        "",
        "| masking | drop ratio | image tokens | median s | p90 s | vs none |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {r['masking']} | {r['ratio']:.1f} | {r['tokens']} | {r['median_s']:.3f} | {r['p90_s']:.3f} | "
          f"{r['vs_none']:.2f}x |" for r in rows],
    ])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="curation-tiny", help="open_clip model name (default curation-tiny)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args(argv)
    rows = run_benchmark(args.steps, args.batch_size, args.model, args.threads)
    print(f"train bench: {args.model}, batch {args.batch_size}, {args.steps} timed steps per variant, "
          f"{args.threads} threads, round-robin")
    print(f"{'masking':8s} {'ratio':>5s} {'tokens':>6s} {'median s':>9s} {'p90 s':>7s} {'vs none':>8s}")
    for row in rows:
        print(f"{row['masking']:8s} {row['ratio']:5.1f} {row['tokens']:6d} {row['median_s']:9.3f} "
              f"{row['p90_s']:7.3f} {row['vs_none']:7.2f}x")
    for row in rows[1:]:
        print(f"RESULT train step time {row['masking']} {row['ratio']:.1f} / none: {row['vs_none']:.2f}x "
              f"({(1 - row['vs_none']) * 100:.0f}% saved)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
