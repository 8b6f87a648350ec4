"""Evaluate a CLIP on the held-out sets: zero-shot accuracy, typographic attack, spurious
backgrounds and retrieval, the probes by which the curation papers judge a filter.

The metric functions are pure functions over embeddings and predictions, so they are tested on
hand-made cases; ``evaluate`` only embeds the sets once and applies them.

Metrics (``EvalResult.metrics``; accuracies and rates in [0, 1], drops in [-1, 1]):

- ``clean_top1``: zero-shot top-1 on ``clean``, classes embedded as the mean of the normalised
  prompt embeddings, renormalised (CLIP's prompt ensemble).
- ``typographic_top1``, ``typographic_drop`` (clean - typographic) and ``attack_success_rate``: the
  share of typographic images predicted as the class written on them (Less is More's ImageNet-Atr).
- ``common_top1``, ``counter_top1``, ``spurious_drop`` (common - counter): CounterAnimal.
- ``text_only_top1``: zero-shot top-1 on the class words alone on plain backgrounds (does it read?).
- ``i2t_r1``, ``i2t_r5``, ``t2i_r1``, ``t2i_r5``: retrieval recall at 1 and 5; a query counts as
  found when fewer than k other candidates score at least as high as its pair (ties count
  against it, so a collapsed model gets no credit).
- ``chance``: 1 / number of classes.

``EvalResult.per_class`` has one row per class with the same accuracies, attack success and
spurious drop over the images of that true class, plus ``predicted_when_written``: the share of
attacked images carrying that class's name that are predicted as it (which words the model reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.clip import ClipModel
from sources.eval_sets import EvalItem, EvalSets

PROMPTS: tuple[str, ...] = ("a photo of a {}.", "a drawing of a {}.", "a {}.")


@dataclass(frozen=True)
class EvalResult:
    """Headline metrics and one row per class, with the model they came from."""

    model: str
    metrics: dict[str, float]
    per_class: list[dict[str, Any]]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(clip: ClipModel, classes: Sequence[str], prompts: Sequence[str] = PROMPTS) -> np.ndarray:
    """One unit vector per class: the mean of its normalised prompt embeddings, renormalised."""
    texts = [p.format(c) for c in classes for p in prompts]
    emb = clip.encode_texts(texts).reshape(len(classes), len(prompts), -1)
    return _unit(emb.mean(axis=1)).astype(np.float32)


def predict(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """Zero-shot class index per image: the most similar class embedding."""
    return (image_emb @ class_emb.T).argmax(axis=1)


def top1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Share of predictions equal to the labels (nan for no items)."""
    return float(np.mean(pred == labels)) if len(labels) else float("nan")


def top1_by_class(pred: np.ndarray, target: np.ndarray, groups: np.ndarray, n_classes: int) -> np.ndarray:
    """``top1(pred, target)`` within the items of each class index of ``groups`` (nan if none)."""
    return np.array([top1(pred[groups == k], target[groups == k]) for k in range(n_classes)])


def attack_success_rate(pred: np.ndarray, written: np.ndarray) -> float:
    """Share of attacked images classified as the (wrong) class written on them."""
    return top1(pred, written)


def recall_at_k(sim: np.ndarray, k: int) -> float:
    """Recall@k of square ``sim`` (queries x candidates) whose right answer is the diagonal.

    A query is found when fewer than ``k`` other candidates score >= its pair: ties go against it.
    """
    right = np.diag(sim)[:, None]
    others_ahead = (sim >= right).sum(axis=1) - 1
    return float(np.mean(others_ahead < k))


def _labels(items: Sequence[EvalItem], field: str = "label") -> np.ndarray:
    return np.array([getattr(item, field) for item in items], dtype=np.int64)


def _embed(clip: ClipModel, items: Sequence[EvalItem]) -> np.ndarray:
    return clip.encode_images([item.rgb() for item in items])


def evaluate(clip: ClipModel, sets: EvalSets, prompts: tuple[str, ...] = PROMPTS) -> EvalResult:
    """Embed every set once and compute the metrics of the module docstring."""
    n = len(sets.classes)
    classes = class_embeddings(clip, sets.classes, prompts)
    y_clean, y_typo = _labels(sets.clean), _labels(sets.typographic)
    written = _labels(sets.typographic, "written_label")
    p_clean = predict(_embed(clip, sets.clean), classes)
    p_typo = predict(_embed(clip, sets.typographic), classes)
    common = [item for item in sets.spurious if item.group == "common"]
    counter = [item for item in sets.spurious if item.group == "counter"]
    y_common, y_counter = _labels(common), _labels(counter)
    p_common = predict(_embed(clip, common), classes)
    p_counter = predict(_embed(clip, counter), classes)
    sim = _embed(clip, sets.retrieval) @ clip.encode_texts([item.caption for item in sets.retrieval]).T
    p_text = predict(_embed(clip, sets.text_only), classes) if sets.text_only else np.zeros(0, dtype=np.int64)
    y_text = _labels(sets.text_only)

    metrics = {
        "clean_top1": top1(p_clean, y_clean),
        "typographic_top1": top1(p_typo, y_typo),
        "attack_success_rate": attack_success_rate(p_typo, written),
        "common_top1": top1(p_common, y_common),
        "counter_top1": top1(p_counter, y_counter),
        "text_only_top1": top1(p_text, y_text),
        "i2t_r1": recall_at_k(sim, 1),
        "i2t_r5": recall_at_k(sim, 5),
        "t2i_r1": recall_at_k(sim.T, 1),
        "t2i_r5": recall_at_k(sim.T, 5),
        "chance": 1.0 / n,
    }
    metrics["typographic_drop"] = metrics["clean_top1"] - metrics["typographic_top1"]
    metrics["spurious_drop"] = metrics["common_top1"] - metrics["counter_top1"]

    columns = {  # per true class, except the last: per class whose name is written
        "clean_top1": top1_by_class(p_clean, y_clean, y_clean, n),
        "typographic_top1": top1_by_class(p_typo, y_typo, y_typo, n),
        "attack_success_rate": top1_by_class(p_typo, written, y_typo, n),
        "common_top1": top1_by_class(p_common, y_common, y_common, n),
        "counter_top1": top1_by_class(p_counter, y_counter, y_counter, n),
        "text_only_top1": top1_by_class(p_text, y_text, y_text, n),
        "predicted_when_written": top1_by_class(p_typo, written, written, n),
    }
    per_class = [
        {"class": name, **{key: float(col[k]) for key, col in columns.items()},
         "spurious_drop": float(columns["common_top1"][k] - columns["counter_top1"][k])}
        for k, name in enumerate(sets.classes)
    ]
    return EvalResult(model=clip.description, metrics=metrics, per_class=per_class)
