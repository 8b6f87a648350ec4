"""CLIP scoring on onnxruntime: open_clip's two towers exported once, kept on disk, run without torch.

Why: on CPU the CLIP-score actor spent 4.7 s of its 2-core start loading open_clip (``import
open_clip`` 3.7 s: torch, torchvision, timm), and that load was the run's critical path to its first
scored image (issue 27). onnxruntime imports in 0.1 s, and on one thread its forward of ViT-S-32 is
faster too (8 images: 0.19 s against torch's 0.25 s; a caption batch 0.14 against 0.17).

How, so that a score never changes with the engine:

- **Built once, from the torch model itself.** The first actor to need a model loads it with
  open_clip (``load_clip``: name + tag, checkpoint file or seeded random init, as before) and
  exports the image tower (dynamic batch) and the text tower (dynamic batch and length: the
  forward that stops at the batch's longest caption, ``text_forward_at_length``). For the export
  only, the text blocks' ``nn.MultiheadAttention`` runs as the same projections around
  ``scaled_dot_product_attention`` (its own code keeps the traced length fixed).
- **Kept by what it was built from.** The folder's name is a key of the model name, the weights
  (tag, checkpoint sha256, or the random init's seed), the model's config, and the versions of
  torch, open_clip and onnxruntime: a change to any of them is a new build, never a stale one.
- **Never trusted unchecked.** At build time the two sessions must give the torch model's unit
  embeddings on probe pixels and captions (max abs difference < ``PROBE_TOLERANCE``), and the
  torch-free tokenizer (models/clip_tokens.py) open_clip's token ids; the references are stored
  beside the model and every load checks them again. A build or a check that fails costs only
  speed: the actor scores with the torch model, and says why once.
- **Only what it can do exactly.** open_clip ``CLIP`` models whose config is a file (a built-in
  name or this project's ``model_configs/``) with a causal text tower and the default tokenizer,
  scored on the CPU; anything else (``hf-hub:`` models, Hugging Face text towers, a GPU) runs on
  torch as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from core.cache import cache_dir, file_sha256
from core.errors import ConfigError
from core.images import as_rgb
from models.clip import (
    ClipModel, PairScores, can_trim_text, load_clip, model_config, text_forward_at_length, unit_rows, warn_if_random,
)
from models.clip_tokens import ClipTokenizer
from models.pixels import Pixels, Recipe

logger = logging.getLogger(__name__)

CLIP_CACHE = "clip"  # the project cache's subfolder (core/cache.py)
FORMAT = 1  # of the cached folder: a new format is a new key
ENGINES = ("auto", "torch", "onnx")
PROBE_TOLERANCE = 1e-4  # on unit embeddings; exports measure ~3e-6
PROBE_CAPTIONS = (
    "a photo of a small red apple on green grass, indoors",
    "STOP",
    "",
    "Caf\u00e9 &amp; Bar \u2013 OPEN 24/7! It's 50% OFF\u2026 \u6771\u4eac " + "long words " * 40,
)


class UnsupportedExport(Exception):
    """This model cannot be scored on onnxruntime exactly as open_clip scores it (the message says why)."""


@dataclass
class OnnxClip(PairScores):
    """An exported CLIP on onnxruntime, with ``ClipModel``'s scoring interface (CPU, fp32)."""

    image: Any  # onnxruntime.InferenceSession: float32 NCHW pixels -> image embeddings
    text: Any  # onnxruntime.InferenceSession: int64 tokens [n, length] -> text embeddings
    tokenizer: ClipTokenizer
    pixels: Pixels
    description: str
    meaningful: bool
    batch_size: int = 32
    device: str = "cpu"
    precision: str = "fp32"
    engine: str = "onnxruntime"
    timings: dict[str, float] = field(default_factory=dict)  # where the load's seconds went

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised image embeddings, float32, one row per image, in batches."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.pixel_array(images[start : start + self.batch_size])
            chunks.append(unit_rows(self.image.run(None, {"pixels": pixels})[0]))
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def pixel_array(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The image tower's input for decoded images: open_clip's eval transform (models/pixels.py)."""
        from PIL import Image

        return self.pixels.normalised([self.pixels.from_image(Image.fromarray(as_rgb(im))) for im in images])

    def encode_texts(self, captions: Sequence[str]) -> np.ndarray:
        """L2-normalised caption embeddings, float32 (captions past the context are truncated)."""
        chunks = []
        for start in range(0, len(captions), self.batch_size):
            tokens = self.tokenizer([c or "" for c in captions[start : start + self.batch_size]])
            chunks.append(unit_rows(self.text.run(None, {"tokens": trimmed(tokens)})[0]))
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def trimmed(tokens: np.ndarray) -> np.ndarray:
    """Token rows cut after the batch's last non-padding column (the tokenizer pads with 0)."""
    used = np.flatnonzero((tokens != 0).any(axis=0))
    return np.ascontiguousarray(tokens[:, : max(1, int(used[-1]) + 1 if used.size else 1)])


# -- the cache -----------------------------------------------------------------------------------


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def cache_key(model: str, pretrained: str, seed: int) -> dict[str, Any]:
    """Everything an exported model is built from, read without importing torch or open_clip."""
    pretrained = pretrained or ""
    if pretrained and os.path.isfile(pretrained):
        weights: Any = {"file_sha256": file_sha256(Path(pretrained), CLIP_CACHE)}
    elif pretrained:
        weights = {"tag": pretrained}
    else:
        weights = {"random_init_seed": seed}
    return {"format": FORMAT, "model": model, "weights": weights, "config": model_config(model),
            "torch": _package_version("torch"), "open_clip": _package_version("open_clip_torch"),
            "onnxruntime": _package_version("onnxruntime")}


def cache_folder(key: dict[str, Any]) -> Path:
    """The folder an export with this key lives in (named so a person can tell models apart)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(key["model"]))[:60]
    return cache_dir(CLIP_CACHE) / f"{safe}-{digest}"


# -- export (torch) ------------------------------------------------------------------------------


def _probe_pixels(recipe: Recipe) -> np.ndarray:
    """Two deterministic model inputs (normalised float32, NCHW): a gradient and noise."""
    h, w = recipe.out_hw
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    images = [ramp.astype(np.uint8), rng.integers(0, 256, (h, w, 3), dtype=np.uint8)]
    return Pixels(None, recipe).normalised(images)


@contextmanager
def _exportable(net: Any) -> Iterator[None]:
    """For the export only: torch's fused attention off, and each text block's
    ``nn.MultiheadAttention`` computed as the same projections around
    ``scaled_dot_product_attention`` (its own code keeps the traced length fixed); then put back."""
    import torch
    import torch.nn.functional as F

    class _Attention(torch.nn.Module):
        def __init__(self, mha: Any) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, q: Any, k: Any, v: Any, need_weights: bool = False, attn_mask: Any = None) -> tuple:
            m = self.mha
            n, heads = q.shape[0], m.num_heads
            qkv = F.linear(q, m.in_proj_weight, m.in_proj_bias).reshape(n, -1, 3, heads, m.embed_dim // heads)
            qkv = qkv.permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
            return m.out_proj(out.transpose(1, 2).reshape(n, -1, m.embed_dim)), None

    blocks = list(net.transformer.resblocks)
    originals = [b.attn for b in blocks]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for block in blocks:
            block.attn = _Attention(block.attn)
        yield
    finally:
        for block, attn in zip(blocks, originals):
            block.attn = attn
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _check_exportable(clip: ClipModel) -> Recipe:
    """The recipe of the model's eval transform, or ``UnsupportedExport`` saying what does not fit."""
    import torch

    net = clip.model
    if not can_trim_text(net):
        raise UnsupportedExport("its text tower is not open_clip's causal CLIP text transformer")
    if not getattr(net.transformer, "batch_first", False):
        raise UnsupportedExport("its text transformer is not batch-first")
    for block in net.transformer.resblocks:
        attn = getattr(block, "attn", None)
        if (not isinstance(attn, torch.nn.MultiheadAttention) or not attn.batch_first or not attn._qkv_same_embed_dim
                or attn.bias_k is not None or attn.add_zero_attn or hasattr(block, "ln_1_kv")):
            raise UnsupportedExport("its text blocks are not plain batch-first self-attention")
    if type(clip.tokenizer).__name__ != "SimpleTokenizer" or getattr(clip.tokenizer, "reduction_fn", None) is not None:
        raise UnsupportedExport(f"its tokenizer is {type(clip.tokenizer).__name__}, not open_clip's default")
    recipe = clip.pixels.recipe
    if recipe is None or recipe.resize is None:
        raise UnsupportedExport("its image transform is not open_clip's resize and centre crop")
    return recipe


def export_clip(clip: ClipModel, folder: Path, key: dict[str, Any], num_threads: int = 1, batch_size: int = 32) -> OnnxClip:
    """Export ``clip``'s towers to ``folder`` with the probe references, checked before it is put in
    place (a temporary folder, then a rename: two actors building at once leave one whole folder);
    the checked model, its sessions already in memory."""
    import torch

    from models.onnx_export import export_onnx

    recipe = _check_exportable(clip)
    net = clip.model
    tokenizer = ClipTokenizer(context_length=int(clip.tokenizer.context_length))
    probe_tokens = tokenizer(PROBE_CAPTIONS)
    theirs = clip.tokenizer(list(PROBE_CAPTIONS)).numpy()
    if not np.array_equal(probe_tokens, theirs):
        raise UnsupportedExport("its tokenizer's ids differ from CLIP's byte-pair tokenizer on the probe captions")
    pixels = _probe_pixels(recipe)
    with torch.inference_mode():
        want_image = unit_rows(net.encode_image(torch.from_numpy(pixels)))
        want_text = unit_rows(net.encode_text(torch.from_numpy(theirs)))

    class _Image(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            return self.net.encode_image(x)

    class _Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, tokens: Any) -> Any:
            return text_forward_at_length(self.net, tokens)

    with _exportable(net):
        image_bytes = export_onnx(_Image().eval(), (torch.from_numpy(pixels),), ["pixels"], ["embedding"],
                                  {"pixels": {0: "n"}, "embedding": {0: "n"}})
        text_bytes = export_onnx(_Text().eval(), (torch.from_numpy(trimmed(probe_tokens[:2])),), ["tokens"], ["embedding"],
                                 {"tokens": {0: "n", 1: "length"}, "embedding": {0: "n"}})
    meta = {"key": key, "description": clip.description, "meaningful": clip.meaningful,
            "recipe": asdict(recipe), "context_length": tokenizer.context_length,
            "probe_tokens": probe_tokens.tolist(), "probe_image": want_image.tolist(), "probe_text": want_text.tolist()}
    _sweep_dead_builds(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "image.onnx").write_bytes(image_bytes)
        (tmp / "text.onnx").write_bytes(text_bytes)
        (tmp / "meta.json").write_text(json.dumps(meta))
        checked = load_onnx_clip(tmp, num_threads, batch_size)  # the probe check, before anyone can read it
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").exists():  # not another actor's finished build: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return checked


def _sweep_dead_builds(folder: Path) -> None:
    """Remove the temporary folders of builds whose process is gone (an actor killed mid-export
    leaves one of ~250 MB; a live one, another actor building now, is left alone)."""
    for tmp in folder.parent.glob(f".{folder.name}.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


# -- load (no torch) -----------------------------------------------------------------------------


def load_onnx_clip(folder: Path, num_threads: int = 1, batch_size: int = 32) -> OnnxClip:
    """The exported model in ``folder`` on onnxruntime's CPU provider, after its probe check
    (``ValueError`` when an embedding or a token id differs from what torch and open_clip gave)."""
    started = time.perf_counter()
    import onnxruntime as ort

    meta = json.loads((folder / "meta.json").read_text())
    recipe = meta["recipe"]
    recipe = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items()})
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(num_threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's concern
    imported = time.perf_counter()
    sessions = [ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
                for name in ("image.onnx", "text.onnx")]
    model = OnnxClip(*sessions, tokenizer=ClipTokenizer(context_length=int(meta["context_length"])),
                     pixels=Pixels(None, recipe), description=meta["description"], meaningful=bool(meta["meaningful"]),
                     batch_size=batch_size)
    loaded = time.perf_counter()
    tokens = model.tokenizer(PROBE_CAPTIONS)
    if tokens.tolist() != meta["probe_tokens"]:
        raise ValueError("the tokenizer's ids differ from open_clip's on the probe captions")
    got_image = unit_rows(model.image.run(None, {"pixels": _probe_pixels(recipe)})[0])
    got_text = unit_rows(model.text.run(None, {"tokens": trimmed(tokens)})[0])
    for name, got, want in (("image", got_image, meta["probe_image"]), ("text", got_text, meta["probe_text"])):
        diff = float(np.abs(got - np.asarray(want, np.float32)).max())
        if not diff < PROBE_TOLERANCE:
            raise ValueError(f"the {name} tower differs from torch's by {diff:.2e} on the probe")
    model.timings = {"import_s": imported - started, "sessions_s": loaded - imported, "probe_s": time.perf_counter() - loaded}
    return model


# -- the engine choice ---------------------------------------------------------------------------


def load_clip_scorer(
    model: str, pretrained: str, device: str, precision: str, seed: int, engine: str = "auto",
    num_threads: int | None = None, batch_size: int = 32,
) -> ClipModel | OnnxClip:
    """What the CLIP-score stage scores with: the exported model on onnxruntime on the CPU
    (``engine`` "auto" or "onnx"), exporting it first when the cache has none; open_clip on torch on
    a GPU, with ``engine="torch"``, or when the model cannot be exported exactly (then said once).
    ``engine="onnx"`` with a device or model it cannot serve is a config error."""
    if engine not in ENGINES:
        raise ConfigError(f"clip.engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "onnx" and device != "cpu":
        raise ConfigError(f"clip.engine 'onnx' runs on the CPU; clip.device is {device!r} (use engine 'auto' or 'torch')")
    torch_model = lambda: load_clip(model, pretrained, device=device, precision=precision, seed=seed,  # noqa: E731
                                    num_threads=num_threads, batch_size=batch_size)
    if engine == "torch" or device != "cpu":
        return torch_model()
    if ":" in model or model_config(model) is None:  # a hub or folder model: no config file to key a build by
        if engine == "onnx":
            raise ConfigError(f"clip.engine 'onnx' needs a model whose open_clip config is a file; {model!r} "
                              "is not one (use engine 'auto' or 'torch')")
        return torch_model()
    key = cache_key(model, pretrained, seed)
    folder = cache_folder(key)
    threads = max(1, int(num_threads or 1))
    if (folder / "meta.json").exists():
        try:
            scorer = load_onnx_clip(folder, threads, batch_size)
            warn_if_random(scorer.meaningful)
            return scorer
        except Exception as err:  # noqa: BLE001 - a cached model that fails its check is rebuilt, never used
            logger.warning("cached ONNX CLIP at %s failed its check (%s); rebuilding it", folder, err)
            shutil.rmtree(folder, ignore_errors=True)
    clip = torch_model()
    try:
        return export_clip(clip, folder, key, threads, batch_size)
    except UnsupportedExport as err:
        if engine == "onnx":
            raise ConfigError(f"clip.engine 'onnx' cannot run {model}: {err} (use engine 'auto' or 'torch')") from err
        logger.info("CLIP %s stays on torch: %s", model, err)
    except Exception as err:  # noqa: BLE001 - a failed export costs speed, never the run
        logger.warning("CLIP %s could not be exported to ONNX (%s: %s); scoring on torch", model, type(err).__name__, err)
    return clip


__all__ = ["CLIP_CACHE", "ENGINES", "OnnxClip", "UnsupportedExport", "cache_folder", "cache_key", "export_clip",
           "load_clip_scorer", "load_onnx_clip", "trimmed"]
