"""Champion / challenger: is a retrained model good enough to replace the promoted one?

Both are scored on the same test data, per family, with a paired bootstrap (the same resampled test items
for both models) of the difference challenger − champion, oriented so that positive is better:

- text: corpus BLEU (sacrebleu's sufficient statistics per sentence, summed over each resample, as
  sacrebleu's own paired bootstrap does), from each model's `data/evaluation/text/outputs.parquet`;
- restore: mean PSNR over the test images, from `data/evaluation/restore/per_image.json`;
- image: FID (lower is better) of resampled generated images against the real test images, both models'
  samples (`data/evaluation/image/generated_images.safetensors`) embedded by the champion's feature network
  and compared with the champion's cached real features, so the two FIDs share one yardstick;
- diffusion: the same FID, of the diffusion models' samples (`data/evaluation/diffusion/...`), when the
  champion has a diffusion evaluation (one from before the diffusion stages has none, and serves none).

The challenger is promoted when the lower end of the 95 % interval of the difference is at least −tolerance
(a non-inferiority test: "not worse beyond the tolerance", with confidence). Every decision is appended to
the promotion history (JSON) with the figures that made it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from components.common import locked, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Comparison:
    family: str
    metric: str
    champion: float
    challenger: float
    delta: float  # challenger − champion, positive = better
    ci_low: float
    ci_high: float
    tolerance: float
    promote: bool
    reason: str


def paired_bootstrap(
    n_items: int, statistic: Callable[[np.ndarray], tuple[float, float]], samples: int, seed: int
) -> tuple[float, float]:
    """95 % percentile interval of challenger − champion, by scipy's bootstrap over the test items' indices
    (so both models see the same resampled items): `statistic(indices)` returns (champion, challenger)."""
    from scipy.stats import bootstrap

    def delta(indices: np.ndarray) -> float:
        champion, challenger = statistic(indices.astype(int))
        return challenger - champion

    result = bootstrap(
        (np.arange(n_items),), delta, vectorized=False, n_resamples=samples, method="percentile",
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def decide(family: str, metric: str, champion: float, challenger: float, ci: tuple[float, float], tolerance: float) -> Comparison:
    delta = challenger - champion
    promote = ci[0] >= -tolerance
    verdict = "not worse beyond" if promote else "possibly worse beyond"
    reason = (
        f"{metric}: challenger {challenger:.4g} vs champion {champion:.4g}, difference {delta:+.4g} "
        f"(95% CI {ci[0]:+.4g} … {ci[1]:+.4g}): {verdict} the tolerance {tolerance}"
    )
    return Comparison(family, metric, champion, challenger, delta, ci[0], ci[1], tolerance, promote, reason)


def compare_text(champion: Any, challenger: Any, tolerance: float, samples: int, seed: int) -> Comparison:
    """Corpus BLEU of two outputs tables (evaluate_text's outputs.parquet as pandas) on the same sources."""
    merged = champion.merge(challenger, on="source", suffixes=("_champion", "_challenger"))
    if merged.empty:
        raise ValueError("the two evaluations share no test source")
    from components.metrics import bleu_from_statistics as bleu
    from components.metrics import bleu_statistics

    references = [list(r) for r in merged["references_champion"]]
    champ_stats = bleu_statistics(list(merged["hypothesis_champion"]), references)
    chall_stats = bleu_statistics(list(merged["hypothesis_challenger"]), references)
    ci = paired_bootstrap(len(merged), lambda idx: (bleu(champ_stats[idx]), bleu(chall_stats[idx])), samples, seed)
    return decide("text", "bleu", bleu(champ_stats), bleu(chall_stats), ci, tolerance)


def compare_restore(
    champion: list[dict[str, Any]], challenger: list[dict[str, Any]], tolerance: float, samples: int, seed: int
) -> Comparison:
    """Mean PSNR over the images both evaluations scored (evaluate_restore's per_image.json rows)."""
    by_id = {row["record_id"]: row["psnr"] for row in champion}
    pairs = np.array([(by_id[row["record_id"]], row["psnr"]) for row in challenger if row["record_id"] in by_id])
    if len(pairs) == 0:
        raise ValueError("the two evaluations share no test image")
    ci = paired_bootstrap(len(pairs), lambda idx: (pairs[idx, 0].mean(), pairs[idx, 1].mean()), samples, seed)
    return decide("restore", "psnr", float(pairs[:, 0].mean()), float(pairs[:, 1].mean()), ci, tolerance)


def compare_image(
    champion_fake: Any, challenger_fake: Any, real: Any, tolerance: float, samples: int, seed: int, family: str = "image"
) -> Comparison:
    """FID (negated, so higher is better) of generated-image features against the real test features,
    bootstrapping the generated images (same resampled indices for both; the seeds are shared)."""
    from components.metrics import fid_from_features

    n = min(len(champion_fake), len(challenger_fake))

    def neg_fid(idx: np.ndarray) -> tuple[float, float]:
        return -fid_from_features(real, champion_fake[idx]), -fid_from_features(real, challenger_fake[idx])

    champion_value, challenger_value = neg_fid(np.arange(n))
    ci = paired_bootstrap(n, neg_fid, samples, seed)
    comparison = decide(family, "-fid_domain", champion_value, challenger_value, ci, tolerance)
    return comparison


def record(
    history_path: Path, comparisons: list[Comparison], experiment: str, promoted: bool, outcome: str | None = None
) -> dict[str, Any]:
    """Append one decision (all families) to the promotion history and return it; `outcome` is what became
    of the challenger: promoted, rejected, or sent to an online A/B test first.

    The read-append-rewrite holds the history's lock (two flows deciding at once both keep their entry), and the
    rewrite is atomic (a reader or a crash never sees half a file)."""
    entry = {
        "at": datetime.now(UTC).isoformat(),
        "experiment": experiment,
        "promoted": promoted,
        "comparisons": [asdict(c) for c in comparisons],
        "outcome": outcome or ("promoted" if promoted else "rejected"),
    }
    with locked(history_path):
        history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else []
        write_json([*history, entry], history_path)
    return entry


@dataclass(frozen=True)
class PromotionConfig:
    tolerance_bleu: float
    tolerance_fid: float
    tolerance_psnr: float
    bootstrap_samples: int
    seed: int
    history: Path  # relative to the repo root
    record: Path  # what the service serves (serving/promoted.py), relative to the repo root
    require_online: bool = False  # a passing challenger goes on an online A/B test instead of being promoted

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PromotionConfig:
        from components.common import require

        p = "promotion"
        return cls(
            tolerance_bleu=float(require(params, "tolerance_bleu", (int, float), p, low=0)),
            tolerance_fid=float(require(params, "tolerance_fid", (int, float), p, low=0)),
            tolerance_psnr=float(require(params, "tolerance_psnr", (int, float), p, low=0)),
            bootstrap_samples=require(params, "bootstrap_samples", int, p, low=10),
            seed=require(params["base"], "seed", int, "base"),
            history=Path(require(params, "history", str, p)),
            record=Path(require(params, "record", str, p)),
            require_online=require(params, "require_online", bool, p),
        )


def read_artifact(root: Path, path: str, rev: str | None) -> bytes:
    """A pipeline output as bytes: from the workspace (rev None) or from a git revision / DVC experiment."""
    if rev is None:
        return (root / path).read_bytes()
    import dvc.api

    return dvc.api.read(path, repo=str(root), rev=rev, mode="rb")


def compare_revisions(root: Path, challenger_rev: str, cfg: PromotionConfig, champion_rev: str | None = None) -> list[Comparison]:
    """Every family's comparison of the challenger (an experiment) with the champion: the workspace, or the
    revision `champion_rev` (the experiment that promoted it)."""
    import io

    import pandas as pd
    from dvc.exceptions import PathMissingError
    from safetensors.torch import load as load_safetensors

    from components.feature_net import DomainFeatures, extract, feature_net_from_state, reference_path
    from components.metrics import evaluation_stage
    from components.model_io import CONFIG, WEIGHTS
    from components.pipeline import load_stages

    stages = load_stages(root)

    def both(family: str) -> tuple[bytes, bytes]:
        """The per-item outputs of a family's evaluation stage, for the champion and the challenger."""
        path = stages[evaluation_stage(family)].only_out().as_posix()
        return read_artifact(root, path, champion_rev), read_artifact(root, path, challenger_rev)

    def champions(path: Path) -> bytes:
        return read_artifact(root, path.as_posix(), champion_rev)

    text = [pd.read_parquet(io.BytesIO(b)) for b in both("text")]
    restore = [json.loads(b) for b in both("restore")]
    feature_net_stage = stages["train_feature_net"]  # its command: <features> <model folder> --reference <folder>
    net_dir, reference_dir = feature_net_stage.argument(1), feature_net_stage.argument("--reference")
    net = feature_net_from_state(json.loads(champions(net_dir / CONFIG)), load_safetensors(champions(net_dir / WEIGHTS)))
    extractor = DomainFeatures(net)
    real = load_safetensors(champions(reference_path(reference_dir, "test")))["features"]
    n, seed = cfg.bootstrap_samples, cfg.seed
    comparisons = [compare_text(text[0], text[1], cfg.tolerance_bleu, n, seed)]
    for family in ("image", "diffusion"):
        try:
            fakes = [extract(extractor, load_safetensors(b)["images"]) for b in both(family)]
        except (FileNotFoundError, KeyError, PathMissingError) as err:
            if family == "image":
                raise
            log.info("no %s comparison: the champion has no %s evaluation (%s)", family, family, err)
            continue
        # FID per resample is dearer than BLEU's or PSNR's: a tenth of the resamples
        comparisons.append(compare_image(fakes[0], fakes[1], real, cfg.tolerance_fid, max(10, n // 10), seed, family))
    comparisons.append(compare_restore(restore[0], restore[1], cfg.tolerance_psnr, n, seed))
    return comparisons
