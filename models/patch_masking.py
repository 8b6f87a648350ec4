"""Training-time patch masking for open_clip's vision tower: CLIP-PGS and FLIP-style random.

Dropping image patches before the ViT makes a training step cheaper (FLIP drops them at random).
CLIP-PGS (Pei et al., CVPR 2025, seed 001) drops them where little is lost: flat, redundant
regions, while edge-rich object areas are kept. Selection happens per image *before* the
forward, from the pixels (and optionally per-patch embeddings), and the chosen indices are handed
to ``IndexedPatchDropout``, which ``install`` puts in place of ``model.visual.patch_dropout``.

PGS, as built here (the paper leaves the details below open; each is a parameter):

1. **Features.** Each patch is its flattened pixels (``C * p * p`` values, as the model sees
   them). Pixel similarity is their cosine; with ``embeddings`` it is mixed with the cosine of the
   per-patch embeddings, ``(1 - embedding_weight) * pixel + embedding_weight * embedding``.
2. **Optimal-transport normalisation.** ``sinkhorn_normalize`` turns ``exp(sim / eps)`` into a
   near doubly-stochastic matrix (rows and columns sum to 1), so a patch similar to everything
   (a hub) cannot dominate every row. The diagonal is excluded (a patch's match with itself is
   every row's maximum and would swallow its mass as soon as patches are not exact copies). Each
   row is then divided by its maximum: "similarity to a seed" is in [0, 1], 1 for the seed's best
   match, which gives ``similarity_threshold`` a scale independent of the number of patches.
3. **Edges.** Sobel magnitude on the full-resolution luminance (channel mean), pooled per patch
   and divided by the image's maximum. It is computed on the image as fed to the model, a
   per-channel affine map of the raw pixels, so edges are where the raw image has them (per-patch
   standardisation first would turn the edge map into noise).
4. **Seeds.** ``round(seed_fraction * N)`` patches (at least one), drawn without replacement
   with weights ``exp(-edge / seed_temperature)`` (Gumbel top-k): flat patches are preferred.
5. **Selection to an exact count.** The paper masks the thresholded set, "at least" 30 % / 50 %
   of patches; a batched ViT needs the same count in every image, so each patch gets a masking
   score and the ``N - K`` highest are masked. With ``t = sim_to_nearest_seed`` and
   ``step = [t > similarity_threshold]``, the score is ``(step + t) / 2 - edge_weight * edge``
   plus a tiny random tie-break: similarity evidence in [0, 1] against edge evidence in
   [0, edge_weight]. The step ranks the thresholded set first, trimmed by its edge-aware score
   when it is too large and topped up with the most seed-similar, least edgy patches when too
   small; at the default weight 1 a thresholded patch falls behind an unthresholded one only if
   its edge score is higher by more than 0.5 (of the image's strongest), so object edges stay.

Both selectors return ``(B, K)`` int64 indices, sorted per row, with ``K = keep_count(N, r)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SINKHORN_EPS = 0.1  # cosine similarities live in [-1, 1]: exp(sim / 0.1) spans e^-10 .. e^10
SEED_TEMPERATURE = 0.1  # a patch at the image's maximum edge is e^10 times less likely a seed
_TIE_JITTER = 1e-4  # below any meaningful score difference; breaks ties between identical patches


def keep_count(n_patches: int, mask_ratio: float) -> int:
    """Patches kept per image: ``n_patches - round(n_patches * mask_ratio)``, at least 1.

    Parameters:
        n_patches: patches per image (grid_h * grid_w).
        mask_ratio: fraction of patches to drop, in [0, 1).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), not {mask_ratio}")
    if n_patches < 1:
        raise ValueError(f"n_patches must be positive, not {n_patches}")
    return max(1, n_patches - round(n_patches * mask_ratio))


def random_keep_indices(
    batch: int, n_patches: int, mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """FLIP-style uniform random patch dropout, as indices so it shares PGS's code path.

    Parameters:
        batch: number of images B.
        n_patches: patches per image N.
        mask_ratio: fraction of patches to drop, in [0, 1).
        generator: source of randomness (its device is used); None uses torch's global one.

    Returns:
        (B, K) int64 kept patch indices, sorted per row.
    """
    keep = keep_count(n_patches, mask_ratio)
    device = generator.device if generator is not None else None
    noise = torch.rand(batch, n_patches, generator=generator, device=device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def sinkhorn_normalize(sim: torch.Tensor, eps: float = SINKHORN_EPS, iters: int = 3) -> torch.Tensor:
    """Entropic optimal-transport normalisation of a batch of similarity matrices.

    Alternating row and column normalisation of ``exp(sim / eps)`` in the log domain (no overflow
    for small ``eps``), ending on columns: column sums are exactly 1 and row sums approach 1 as
    ``iters`` grows, which balances how much mass any one patch can attract.

    Parameters:
        sim: (B, N, N) similarities.
        eps: entropic temperature; smaller is sharper.
        iters: row/column normalisation rounds (at least 1).

    Returns:
        (B, N, N) non-negative matrix with near-uniform (unit) row and column sums.
    """
    if iters < 1:
        raise ValueError(f"sinkhorn iters must be >= 1, not {iters}")
    log_p = sim / eps
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=2, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p.exp()


def patch_edges(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean Sobel gradient magnitude per patch, divided by the image's maximum patch value.

    Parameters:
        images: (B, C, H, W) images; H and W are cropped to whole patches, as the patch conv does.
        patch_size: side of a square patch in pixels.

    Returns:
        (B, N) values in [0, 1], patches in row-major order (open_clip's token order); all zero
        for a flat image.
    """
    # Luminance (channel mean) only, as Sobel is usually run: per channel triples the cost for
    # the rare edge with no luminance step. Separable Sobel ([1, 2, 1] smoothing x [-1, 0, 1]
    # difference) as slices: conv2d is several times slower on CPU. Replicate padding: zero
    # padding would draw an edge around every image border.
    padded = F.pad(images.mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    diff_x = padded[..., 2:] - padded[..., :-2]
    grad_x = diff_x[..., :-2, :] + 2.0 * diff_x[..., 1:-1, :] + diff_x[..., 2:, :]
    smooth_x = padded[..., :-2] + 2.0 * padded[..., 1:-1] + padded[..., 2:]
    grad_y = smooth_x[..., 2:, :] - smooth_x[..., :-2, :]
    magnitude = (grad_x.square() + grad_y.square()).sqrt()
    per_patch = F.avg_pool2d(magnitude, patch_size).flatten(1)
    return per_patch / per_patch.amax(dim=1, keepdim=True).clamp_min(1e-12)


def _patch_pixels(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p), patches in row-major order like open_clip's conv1 tokens."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images[:, :, : gh * patch_size, : gw * patch_size]
    x = x.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, gh * gw, c * patch_size * patch_size)


def _cosine(features: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) cosine similarities (an all-zero feature is similar to nothing)."""
    unit = F.normalize(features, dim=-1)
    return unit @ unit.transpose(1, 2)


@torch.no_grad()
def pgs_keep_indices(
    images: torch.Tensor,
    patch_size: int,
    mask_ratio: float,
    *,
    seed_fraction: float = 0.05,
    similarity_threshold: float = 0.5,
    sinkhorn_iters: int = 3,
    edge_weight: float = 1.0,
    embeddings: torch.Tensor | None = None,
    embedding_weight: float = 0.0,
    generator: torch.Generator | None = None,
    sinkhorn_eps: float = SINKHORN_EPS,
    seed_temperature: float = SEED_TEMPERATURE,
) -> torch.Tensor:
    """CLIP-PGS patch selection: mask flat patches similar to low-edge seeds, keep edge-rich ones.

    Parameters:
        images: (B, 3, H, W) images exactly as fed to the model (normalised).
        patch_size: the vision tower's (square) patch size in pixels.
        mask_ratio: fraction of patches to drop, in [0, 1) (the paper's variants: 0.3, 0.5).
        seed_fraction: fraction of patches drawn as seeds (the paper: about 5 %).
        similarity_threshold: a patch whose row-max-normalised, Sinkhorn-balanced similarity to
            some seed exceeds this is ranked ahead for masking (the paper: 0.5).
        sinkhorn_iters: row/column normalisation rounds.
        edge_weight: how strongly the patch edge score (in [0, 1]) protects a patch from masking.
        embeddings: optional (B, N, E) per-patch embeddings mixed into the similarity.
        embedding_weight: weight in [0, 1] of the embedding similarity (the caller schedules it).
        generator: randomness for seeds and tie-breaks (its device must be the images' device).
        sinkhorn_eps: entropic temperature of the Sinkhorn normalisation.
        seed_temperature: seeds are drawn with weight exp(-edge / seed_temperature).

    Returns:
        (B, K) int64 kept patch indices, sorted per row, K = keep_count(N, mask_ratio).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), not {tuple(images.shape)}")
    if not 0.0 <= embedding_weight <= 1.0:
        raise ValueError(f"embedding_weight must be in [0, 1], not {embedding_weight}")
    b, _, h, w = images.shape
    n = (h // patch_size) * (w // patch_size)
    keep = keep_count(n, mask_ratio)
    device = images.device
    if keep == n:
        return torch.arange(n, device=device).expand(b, n).clone()

    images = images.float()
    sim = _cosine(_patch_pixels(images, patch_size))
    if embeddings is not None and embedding_weight > 0.0:
        if embeddings.shape[:2] != (b, n):
            raise ValueError(f"embeddings must be (B={b}, N={n}, E), not {tuple(embeddings.shape)}")
        sim = (1.0 - embedding_weight) * sim + embedding_weight * _cosine(embeddings.to(device).float())
    # Self-similarity says nothing and, as every row's largest entry, would swallow its mass.
    self_pairs = torch.eye(n, dtype=torch.bool, device=device)
    sim = sim.masked_fill(self_pairs, float("-inf"))
    balanced = sinkhorn_normalize(sim, sinkhorn_eps, sinkhorn_iters)
    balanced = balanced / balanced.amax(dim=2, keepdim=True)
    edges = patch_edges(images, patch_size)

    # Seeds: Gumbel top-k = sampling without replacement with weights exp(-edge / temperature).
    n_seeds = max(1, round(seed_fraction * n))
    uniform = torch.rand(b, n, generator=generator, device=device).clamp_(1e-12, 1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(uniform))
    seeds = (gumbel - edges / seed_temperature).topk(n_seeds, dim=1).indices  # (B, S)
    seed_rows = balanced.gather(1, seeds.unsqueeze(-1).expand(-1, -1, n))  # (B, S, N)
    to_seed = seed_rows.amax(dim=1).scatter(1, seeds, 1.0)  # a seed is fully similar to itself

    jitter = _TIE_JITTER * torch.rand(b, n, generator=generator, device=device)
    evidence = ((to_seed > similarity_threshold).float() + to_seed) / 2.0
    score = evidence - edge_weight * edges + jitter
    return score.topk(keep, dim=1, largest=False).indices.sort(dim=1).values


class IndexedPatchDropout(torch.nn.Module):
    """Keeps the class token and the patches listed in ``keep``, chosen per image by the caller.

    Set ``keep`` to a (B, K) tensor of 0-based patch indices (class token excluded) before the
    forward; ``None`` is the identity (evaluation, or a step without masking). It is a plain
    attribute, not a buffer, so it never enters a checkpoint.
    """

    def __init__(self) -> None:
        super().__init__()
        self.keep: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, D) tokens, class token first -> (B, 1+K, D)."""
        if self.keep is None:
            return x
        if self.keep.ndim != 2 or self.keep.shape[0] != x.shape[0]:
            raise ValueError(f"keep must be (B={x.shape[0]}, K), not {tuple(self.keep.shape)}")
        index = (self.keep.to(x.device) + 1).unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return torch.cat([x[:, :1], x.gather(1, index)], dim=1)


def install(model: torch.nn.Module) -> IndexedPatchDropout:
    """Put an ``IndexedPatchDropout`` in place of ``model.visual.patch_dropout`` and return it.

    It replaces open_clip's own (FLIP) ``PatchDropout``: random dropout is had through
    ``random_keep_indices`` instead. Idempotent: a model that already has one keeps it.

    Parameters:
        model: an open_clip CLIP model with a ViT vision tower.
    """
    visual = model.visual
    if not hasattr(visual, "patch_dropout"):
        raise TypeError(f"{type(visual).__name__} has no patch_dropout: not an open_clip ViT tower")
    if not isinstance(visual.patch_dropout, IndexedPatchDropout):
        visual.patch_dropout = IndexedPatchDropout()
    return visual.patch_dropout


def patch_grid(model: torch.nn.Module) -> tuple[int, int]:
    """(grid_h, grid_w) of ``model.visual``: N = grid_h * grid_w, patch size = image side // grid.

    Parameters:
        model: an open_clip CLIP model with a ViT vision tower.
    """
    grid_h, grid_w = model.visual.grid_size
    return int(grid_h), int(grid_w)
