"""The measures every evaluation shares: BLEU / chrF for text, FID / KID for generated images, PSNR / SSIM for
restoration, and the headline keys each family reports.

Evaluation stages, the champion / challenger gate, the run summary, packaging and the benches call these, so a
number means the same thing wherever it appears. The work is done by sacrebleu and torchmetrics (imported when
used); only torch is imported at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

HEADLINE: dict[str, tuple[str, ...]] = {
    "text": ("bleu", "chrf", "value_coverage", "slot_error_rate", "hallucinated_names", "perplexity", "bleu_retrieval_baseline"),
    "image": ("fid_domain", "fid_domain_floor", "kid_domain", "generated_class_accuracy", "feature_net_accuracy"),
    "restore": ("psnr", "psnr_baseline", "ssim", "ssim_baseline", "psnr_y", "task"),
    "diffusion": ("fid_domain", "fid_domain_floor", "kid_domain", "generated_class_accuracy", "sampling_steps"),
}
"""Per model family, the keys of its evaluation's metrics file that summaries and model labels show."""


def evaluation_stage(family: str) -> str:
    """The dvc.yaml stage that writes a family's metrics file."""
    return f"evaluate_{family}"


# --- text -----------------------------------------------------------------------------------------------


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu wants reference *streams*; a hypothesis with fewer references gets None in the others."""
    width = max(len(r) for r in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def corpus_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu), any number of references per hypothesis, with their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    streams = reference_streams(references)
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(hypotheses, streams)
    chrf_score = chrf.corpus_score(hypotheses, streams)
    return {
        "bleu": round(bleu_score.score, 2),
        "chrf": round(chrf_score.score, 2),
        "sacrebleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def sentence_bleu(hypothesis: str, references: list[str]) -> float:
    from sacrebleu.metrics import BLEU

    return round(BLEU(effective_order=True).sentence_score(hypothesis, references).score, 2)


def bleu_statistics(hypotheses: list[str], references: list[list[str]]) -> Any:
    """sacrebleu's per-sentence BLEU statistics (n-gram matches and totals, lengths), multi-reference: summed
    over any subset of sentences, they give that subset's corpus BLEU (`bleu_from_statistics`)."""
    import numpy as np
    from sacrebleu.metrics import BLEU

    return np.array(BLEU()._extract_corpus_statistics(hypotheses, reference_streams(references)))


def bleu_from_statistics(statistics: Any) -> float:
    """Corpus BLEU of the sentences whose statistics (rows of `bleu_statistics`) are given."""
    from sacrebleu.metrics import BLEU

    return float(BLEU()._compute_score_from_stats(list(statistics.sum(0))).score)


# --- generated images -----------------------------------------------------------------------------------


class PrecomputedFeatures(nn.Module):
    """A torchmetrics `feature=` module for inputs that already are features: the identity, with its width."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics FID between two (N, d) feature sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
    """torchmetrics KID (mean, std over random subsets) between two (N, d) feature sets; the subsets are
    drawn from a fixed seed without disturbing the caller's RNG."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights: Path | None, batch_size: int) -> tuple[float | None, str]:
    """Standard FID (torch-fidelity's InceptionV3 through torchmetrics) of uint8 images, and a status line.

    The weights come from `weights` when given, else from the library's own download, which fails offline:
    then the value is None and the status says why.
    """
    if weights is not None and not weights.is_file():
        return None, f"unavailable: inception_weights {weights} does not exist"
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights) if weights else None)
    except Exception as err:  # no torch-fidelity, no network, or a bad weights file
        return None, f"unavailable: {type(err).__name__}: {err}"[:300]
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            metric.update(chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk, real=is_real)
    return float(metric.compute()), "computed"


# --- restoration ----------------------------------------------------------------------------------------


def luma(images: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 Y of RGB in [0, 1] (the 16-235 studio range, scaled to [0, 1]), (B, 1, H, W); a greyscale
    (B, 1, H, W) batch is its own luminance, put on the same studio range."""
    if images.shape[1] == 1:
        return (16.0 + images * 219.0) / 255.0
    weights = torch.tensor([65.481, 128.553, 24.966], device=images.device).view(1, 3, 1, 1)
    return (16.0 + (images * weights).sum(dim=1, keepdim=True)) / 255.0


def shave(images: torch.Tensor, border: int) -> torch.Tensor:
    return images[..., border:-border, border:-border] if border else images


def restoration_scores(restored: torch.Tensor, clean: torch.Tensor, border: int) -> dict[str, float]:
    """PSNR / SSIM (torchmetrics, data range 1) of one (1, C, H, W) pair, all channels and Y with the border shaved."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    restored = restored.clamp(0, 1).float()
    clean = clean.float()
    y_restored, y_clean = shave(luma(restored), border), shave(luma(clean), border)
    # PSNR in float64 (cheap, and exact to the last digit reported); SSIM's Gaussian convolutions in
    # float32, which agrees to ~1e-6 and is ~30x faster than float64 on a CPU.
    return {
        "psnr": float(peak_signal_noise_ratio(restored.double(), clean.double(), data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(restored, clean, data_range=1.0)),
        "psnr_y": float(peak_signal_noise_ratio(y_restored.double(), y_clean.double(), data_range=1.0)),
        "ssim_y": float(structural_similarity_index_measure(y_restored, y_clean, data_range=1.0)),
    }
