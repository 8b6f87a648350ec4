"""GPU throughput of the curation's model forwards, for the cost projection in BENCHMARKS.md.

    python bench/gpu_rates.py [--out bench/results/gpu_rates.json]

Runs on a CUDA machine (not part of ``make bench``, which measures this machine): the CLIP towers
the pipeline scores with (open_clip ViT-S-32, the offline default, and ViT-B-32, the usual real
weights) and easyocr's CRAFT text detector, at the sizes the pipeline feeds them, under autocast
(bf16) and in fp32. Weights are random: a forward's cost does not depend on their values.
Imports only torch, open_clip and easyocr's CRAFT module (``easyocr.craft``, or a copy of that
file and ``easyocr/model/modules.py`` on PYTHONPATH as ``craft`` / ``craft_modules``), so it runs
where the project's other dependencies are not installed.

Each measurement: warm-up, then enough iterations for >= 2 s, timed with CUDA events, inputs
already on the device (host-side decode, resize and masking are CPU work, measured by make bench).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def _timed(fn, min_seconds: float = 2.0) -> float:  # noqa: ANN001
    """Seconds per call of ``fn`` on the GPU (events around a loop of calls, after a warm-up)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    n = 1
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
        if seconds >= min_seconds or n >= 4096:
            return seconds / n
        n *= 2


def _craft():  # noqa: ANN202
    try:
        from easyocr.craft import CRAFT
    except ImportError:
        from craft import CRAFT  # the copied module (see the docstring)
    return CRAFT(pretrained=False, freeze=False)


def clip_rates(name: str, batch: int, dtype: str) -> dict:
    import open_clip
    import torch

    model = open_clip.create_model(name, pretrained=None, device="cuda").eval()
    pixels = torch.randn(batch, 3, 224, 224, device="cuda")
    tokenizer = open_clip.get_tokenizer(name)
    captions = ["a photo of a small red apple on green grass with a sign that reads fresh fruit"] * batch
    full = tokenizer(captions).to("cuda")
    length = int((full != 0).sum(1).max())
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cuda", enabled=False)
    out = {"model": name, "batch": batch, "precision": dtype, "caption_tokens": length}
    with torch.inference_mode(), cast:
        out["image_per_s"] = batch / _timed(lambda: model.encode_image(pixels))
        out["text_full_context_per_s"] = batch / _timed(lambda: model.encode_text(full))
        try:  # the stage's trimmed text forward (models.clip.encode_text_trimmed), when importable
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from models.clip import encode_text_trimmed

            out["text_trimmed_per_s"] = batch / _timed(lambda: encode_text_trimmed(model, full))
        except Exception as err:  # noqa: BLE001 - the project's config module may not import here
            out["text_trimmed_error"] = f"{type(err).__name__}: {err}"
    return out


def craft_rates(batch: int, height: int, width: int, dtype: str) -> dict:
    import torch

    net = _craft().cuda().eval()
    x = torch.randn(batch, 3, height, width, device="cuda")
    cast = torch.autocast("cuda", dtype=torch.float16) if dtype == "fp16" else torch.autocast("cuda", enabled=False)
    with torch.inference_mode(), cast:
        per_call = _timed(lambda: net(x))
    return {"model": "CRAFT (easyocr detector)", "batch": batch, "size": [height, width], "precision": dtype,
            "image_per_s": batch / per_call}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_rates.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "clip": [],
        "craft": [],
    }
    import open_clip

    result["open_clip"] = open_clip.__version__
    for name in ("ViT-S-32", "ViT-B-32"):
        for dtype in ("bf16", "fp32"):
            result["clip"].append(clip_rates(name, 256, dtype))
            print(json.dumps(result["clip"][-1]), flush=True)
    for dtype in ("fp16", "fp32"):
        # detector_size 512 on the embedded 512x384 images: a 512x384 canvas (multiples of 32)
        result["craft"].append(craft_rates(32, 384, 512, dtype))
        print(json.dumps(result["craft"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
