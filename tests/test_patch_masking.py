"""Patch masking: selector contracts, what PGS keeps, Sinkhorn balance, and the open_clip drop-in.

Real torch and a real (randomly initialised) open_clip model, no mocks. Synthetic images are flat
colour with one checkerboard quadrant, so "edge-rich" patches are known exactly.
"""

from __future__ import annotations

import open_clip
import pytest
import torch

from models.patch_masking import (
    IndexedPatchDropout,
    install,
    keep_count,
    patch_edges,
    patch_grid,
    pgs_keep_indices,
    random_keep_indices,
    sinkhorn_normalize,
)

MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
SIZE, PATCH = 96, 12  # curation-tiny's geometry: an 8 x 8 grid, 64 patches
N = (SIZE // PATCH) ** 2


def checker_quadrant_images(
    batch: int, generator: torch.Generator, noise: float = 0.02
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images, flat random colour with a 3-px checkerboard in one random quadrant.

    Returns the images (B, 3, SIZE, SIZE) and a (B, N) mask of the checkerboard patches.
    """
    half, grid = SIZE // 2, SIZE // PATCH
    yy, xx = torch.meshgrid(torch.arange(half), torch.arange(half), indexing="ij")
    checker = ((yy // 3 + xx // 3) % 2).float()
    images, rich = [], []
    for _ in range(batch):
        image = torch.rand(3, 1, 1, generator=generator).expand(3, SIZE, SIZE).clone()
        quadrant = int(torch.randint(4, (1,), generator=generator))
        top, left = (quadrant // 2) * half, (quadrant % 2) * half
        image[:, top : top + half, left : left + half] = checker
        image = (image + noise * torch.randn(image.shape, generator=generator)).clamp(0.0, 1.0)
        images.append((image - MEAN) / STD)
        mask = torch.zeros(grid, grid, dtype=torch.bool)
        mask[top // PATCH : (top + half) // PATCH, left // PATCH : (left + half) // PATCH] = True
        rich.append(mask.flatten())
    return torch.stack(images), torch.stack(rich)


def kept_mask(keep: torch.Tensor, n: int) -> torch.Tensor:
    """(B, K) indices -> (B, n) bool, True where kept."""
    return torch.zeros(keep.shape[0], n, dtype=torch.bool).scatter(1, keep, True)


def keep_rates(keep: torch.Tensor, rich: torch.Tensor) -> tuple[float, float]:
    """Fraction of edge-rich and of flat patches kept."""
    kept = kept_mask(keep, rich.shape[1])
    return kept[rich].float().mean().item(), kept[~rich].float().mean().item()


# -- selector contracts ---------------------------------------------------------------------------


def test_keep_count() -> None:
    assert keep_count(64, 0.5) == 32
    assert keep_count(64, 0.3) == 45
    assert keep_count(196, 0.3) == 137
    assert keep_count(196, 0.0) == 196
    assert keep_count(4, 0.9) == 1  # never empty
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            keep_count(64, bad)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("size,patch", [(96, 12), (224, 16)])
@pytest.mark.parametrize("selector", ["random", "pgs"])
def test_selector_contract(selector: str, size: int, patch: int, ratio: float) -> None:
    batch, n = 4, (size // patch) ** 2
    generator = torch.Generator().manual_seed(0)
    if selector == "random":
        keep = random_keep_indices(batch, n, ratio, generator=generator)
    else:
        keep = pgs_keep_indices(torch.randn(batch, 3, size, size, generator=generator), patch, ratio,
                                generator=generator)
    assert keep.shape == (batch, keep_count(n, ratio)) and keep.dtype == torch.int64
    assert torch.equal(keep, keep.sort(dim=1).values)
    assert (keep[:, 1:] > keep[:, :-1]).all()  # sorted and unique
    assert keep.min() >= 0 and keep.max() < n


def test_zero_ratio_keeps_everything() -> None:
    images = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(pgs_keep_indices(images, PATCH, 0.0), torch.arange(N).expand(2, N))


@pytest.mark.parametrize("selector", ["random", "pgs"])
def test_seeded_generator_is_deterministic(selector: str) -> None:
    images, _ = checker_quadrant_images(8, torch.Generator().manual_seed(1))

    def select(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        if selector == "random":
            return random_keep_indices(8, N, 0.5, generator=generator)
        return pgs_keep_indices(images, PATCH, 0.5, generator=generator)

    assert torch.equal(select(7), select(7))
    assert not torch.equal(select(7), select(8))


# -- what PGS keeps -------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_pgs_keeps_edge_rich_patches_random_does_not(ratio: float) -> None:
    generator = torch.Generator().manual_seed(2)
    images, rich = checker_quadrant_images(64, generator)
    rich_rate, flat_rate = keep_rates(pgs_keep_indices(images, PATCH, ratio, generator=generator), rich)
    assert rich_rate >= 0.9
    assert flat_rate <= rich_rate - 0.3
    rich_rate, flat_rate = keep_rates(random_keep_indices(64, N, ratio, generator=generator), rich)
    assert abs(rich_rate - (1 - ratio)) < 0.1 and abs(flat_rate - (1 - ratio)) < 0.1


def test_pgs_masks_look_alikes_of_its_seed() -> None:
    """Patches are all red or all blue (32 each, shuffled); one seed, no edge penalty: every
    masked patch has the seed's colour, which a random 19 of 64 almost never has."""
    generator = torch.Generator().manual_seed(3)
    grid = SIZE // PATCH
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    images, labels = [], []
    for _ in range(16):
        label = torch.randperm(N, generator=generator) % 2
        tiles = colours[label].view(grid, grid, 3).permute(2, 0, 1)
        images.append((tiles.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2) - MEAN) / STD)
        labels.append(label)
    images_t, labels_t = torch.stack(images), torch.stack(labels)
    keep = pgs_keep_indices(images_t, PATCH, 0.3, seed_fraction=1 / N, edge_weight=0.0,
                            generator=generator)
    masked = ~kept_mask(keep, N)
    assert (masked.sum(dim=1) == N - keep_count(N, 0.3)).all()
    for label, mask in zip(labels_t, masked):
        assert label[mask].unique().numel() == 1


def test_edge_weight_protects_edges_similarity_cannot_tell_apart() -> None:
    """Rows 0-1 flat, rows 2-4 a one-step pattern, rows 5-7 a 2-px checkerboard of the same
    amplitude (so the same cosine to the flat seeds). Masking half needs 16 patterned patches:
    the edge term takes them from the one-step rows; without it the choice is a coin toss."""
    generator = torch.Generator().manual_seed(9)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    one_step = torch.where(xx % PATCH < PATCH // 2, 1.0, -1.0)
    checker = torch.where((yy // 2 + xx // 2) % 2 == 0, 1.0, -1.0)
    rows = yy // PATCH
    pattern = torch.where(rows < 2, 0.0, torch.where(rows < 5, one_step, checker))
    level = 0.5 + torch.rand(32, 3, 1, 1, generator=generator)
    images = level * (1 + 0.8 * pattern) + 0.01 * torch.randn(32, 3, SIZE, SIZE, generator=generator)
    fine = torch.arange(N) // (SIZE // PATCH) >= 5

    def fine_kept(edge_weight: float) -> float:
        keep = pgs_keep_indices(images, PATCH, 0.5, edge_weight=edge_weight, generator=generator)
        return kept_mask(keep, N)[:, fine].float().mean().item()

    assert fine_kept(1.0) >= 0.95
    assert fine_kept(0.0) < 0.9


def test_edges_come_from_the_raw_image() -> None:
    generator = torch.Generator().manual_seed(4)
    images, rich = checker_quadrant_images(8, generator, noise=0.0)
    edges = patch_edges(images, PATCH)
    assert edges.shape == (8, N) and edges.max() <= 1.0
    assert edges[rich].min() > 0.5 and edges[~rich].max() < 0.2
    # Edges are relative to the image's strongest: a global affine map of the pixels moves nothing.
    assert torch.allclose(patch_edges(images * 0.25 + 0.4, PATCH), edges, atol=1e-5)
    flat = torch.ones(2, 3, SIZE, SIZE) * 0.7  # no edges, not even at the image border
    assert torch.equal(patch_edges(flat, PATCH), torch.zeros(2, N))


def test_embeddings_are_mixed_in() -> None:
    generator = torch.Generator().manual_seed(5)
    images, _ = checker_quadrant_images(4, generator)
    embeddings = torch.randn(4, N, 16, generator=generator)

    def select(weight: float) -> torch.Tensor:
        return pgs_keep_indices(images, PATCH, 0.5, embeddings=embeddings, embedding_weight=weight,
                                generator=torch.Generator().manual_seed(0))

    unmixed = pgs_keep_indices(images, PATCH, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(select(0.0), unmixed)
    assert not torch.equal(select(0.0), select(1.0))
    with pytest.raises(ValueError):
        pgs_keep_indices(images, PATCH, 0.5, embeddings=embeddings[:, :10], embedding_weight=0.5)


def test_sinkhorn_balances_rows_and_columns() -> None:
    images, _ = checker_quadrant_images(8, torch.Generator().manual_seed(6))
    unit = torch.nn.functional.normalize(images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)
                                         .permute(0, 2, 3, 1, 4, 5).reshape(8, N, -1), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # one big flat cluster plus distinct checker patches
    raw = (sim / 0.1).exp()
    raw = raw / raw.sum(dim=(1, 2), keepdim=True) * N
    assert (raw.sum(dim=2) - 1).abs().max() > 0.3  # unbalanced before
    balanced = sinkhorn_normalize(sim, eps=0.1, iters=3)
    assert (balanced >= 0).all()
    assert torch.allclose(balanced.sum(dim=1), torch.ones(8, N), atol=1e-5)
    assert torch.allclose(balanced.sum(dim=2), torch.ones(8, N), atol=1e-2)
    asymmetric = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(7))
    for iters, tolerance in ((3, 0.15), (50, 1e-3)):
        rows = sinkhorn_normalize(asymmetric, eps=0.5, iters=iters).sum(dim=2)
        assert (rows - 1).abs().max() < tolerance


# -- open_clip drop-in ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_name() -> str:
    from models.clip import register_model_configs

    register_model_configs()
    return "curation-tiny" if "curation-tiny" in open_clip.list_models() else "ViT-S-32"


def fresh_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(name)
    return model.eval()


def test_indexed_dropout_gathers_class_token_and_kept_patches() -> None:
    dropout = IndexedPatchDropout()
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    assert dropout(x) is x
    dropout.keep = torch.tensor([[0, 3], [1, 2]])
    out = dropout(x)
    assert torch.equal(out[:, 0], x[:, 0])
    assert torch.equal(out[0, 1:], x[0, [1, 4]]) and torch.equal(out[1, 1:], x[1, [2, 3]])
    dropout.keep = torch.tensor([[0, 3]])
    with pytest.raises(ValueError):
        dropout(x)
    assert "keep" not in dropout.state_dict()


def test_install_on_open_clip(model_name: str) -> None:
    model = fresh_model(model_name)
    grid_h, grid_w = patch_grid(model)
    n = grid_h * grid_w
    assert n + 1 == model.visual.positional_embedding.shape[0]
    size = model.visual.image_size[0]
    patch = size // grid_h
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        reference = model.encode_image(images)

    dropout = install(model)
    assert model.visual.patch_dropout is dropout and install(model) is dropout
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), reference)  # keep None: untouched

    seen: list[tuple[int, ...]] = []
    hook = model.visual.transformer.register_forward_hook(
        lambda _module, args, _output: seen.append(tuple(args[0].shape)))
    dropout.keep = pgs_keep_indices(images, patch, 0.5, generator=torch.Generator().manual_seed(0))
    k = keep_count(n, 0.5)
    model.train()
    features = model.encode_image(images)
    hook.remove()
    assert seen == [(3, 1 + k, model.visual.transformer.width)]
    assert features.shape == reference.shape
    features.square().sum().backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    # Only the class token's and the kept patches' positions took part in the forward.
    touched = model.visual.positional_embedding.grad.abs().sum(dim=1) > 0
    expected = torch.zeros(1 + n, dtype=torch.bool)
    expected[0] = True
    expected[1 + dropout.keep.flatten()] = True
    assert torch.equal(touched, expected)
