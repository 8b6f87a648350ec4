"""CLIP's byte-pair tokenizer without torch: the token ids open_clip's ``SimpleTokenizer`` gives.

The CLIP-score actor on onnxruntime (models/clip_onnx.py) must not import torch (1.4 s of its
start, 3.7 s with open_clip), and open_clip's tokenizer module imports it only to return a tensor.
This is the same algorithm over the same vocabulary file (open_clip's
``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip), for the tokenizer open_clip
gives CLIP models by default: ``clean="lower"`` (ftfy, HTML entities twice, whitespace collapsed,
lower case), the start and end tokens, truncation to the context with the end token kept last,
zeros after. Any other tokenizer (a Hugging Face one, another cleaning, a reduction mask) is not
this one: the engine then stays on torch (``clip_onnx._check_exportable``, and the export's
probe comparison with open_clip's ids).

Equality with open_clip is tested on real alt-text captions (tests/test_clip_onnx.py) and checked
again whenever a model is exported.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CONTEXT_LENGTH = 77
_MERGES = 49152 - 256 - 2  # the merges CLIP's vocabulary uses (the file holds more)


def vocabulary_path() -> Path:
    """open_clip's BPE vocabulary file, located without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed (pip install open_clip_torch)")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def _byte_symbols() -> dict[int, str]:
    """Each byte as a printable character: bytes that are printable stand for themselves, the rest
    are moved to code points from 256 up, in byte order (CLIP's reversible byte encoding)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


class ClipTokenizer:
    """``tokenizer(captions) -> int64 array [n, context]``, equal to open_clip's default tokenizer."""

    def __init__(self, vocabulary: Path | None = None, context_length: int = CONTEXT_LENGTH) -> None:
        import regex

        path = vocabulary or vocabulary_path()
        lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : _MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self._bytes = _byte_symbols()
        symbols = list(self._bytes.values())
        words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        words += ["<start_of_text>", "<end_of_text>"]
        self.ids = {w: i for i, w in enumerate(words)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.start, self.end = self.ids["<start_of_text>"], self.ids["<end_of_text>"]
        self.context_length = context_length
        self._pattern = regex.compile(
            r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    @staticmethod
    def clean(text: str) -> str:
        """open_clip's ``clean="lower"``: ftfy's fixes, HTML entities undone twice, whitespace runs
        made one space, lower case."""
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    @functools.lru_cache(maxsize=1 << 16)
    def _word(self, word: str) -> tuple[int, ...]:
        """One pre-token's ids: its byte symbols merged pair by pair, lowest merge rank first."""
        if word in ("<start_of_text>", "<end_of_text>"):
            return (self.ids[word],)
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.ranks.get(pair, len(self.ranks)), k) for k, pair in enumerate(zip(parts, parts[1:]))]
            best = min(ranked)[0]
            if best == len(self.ranks):
                break
            first, second = next(pair for pair in zip(parts, parts[1:]) if self.ranks.get(pair) == best)
            merged, k = [], 0
            while k < len(parts):  # every occurrence of the pair, left to right, as CLIP merges them
                if k < len(parts) - 1 and parts[k] == first and parts[k + 1] == second:
                    merged.append(first + second)
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        return tuple(self.ids[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        """A caption's ids, without the start and end tokens."""
        ids: list[int] = []
        for piece in self._pattern.findall(self.clean(text)):
            ids.extend(self._word("".join(self._bytes[b] for b in piece.encode("utf-8"))))
        return ids

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        """Each caption as start + ids + end, cut to the context (the end token kept last), zeros after."""
        out = np.zeros((len(captions), self.context_length), np.int64)
        for row, caption in enumerate(captions):
            ids = [self.start, *self.encode(caption), self.end]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.end
            out[row, : len(ids)] = ids
        return out
