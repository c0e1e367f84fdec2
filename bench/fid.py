"""Seconds for FID (and FID + KID) of N generated images: the pipeline's path vs torchmetrics' default path.

    dvc repro evaluate_image && python bench/fid.py            # 10 000 images from models/image (the GAN)
    python bench/fid.py --images 2000
    python bench/fid.py --generator models/diffusion --images 2000   # the diffusion model's samples instead

Ours (`evaluate_image`): real test features cached by `train_feature_net`, each generated image through the
feature network once, FID and KID from those features. torchmetrics' default path: the metric objects
with `feature=` our network, fed the real test images and the generated images, one metric after the other
(so FID + KID extracts every image twice). Both give the same value; the JSON shows it. Generation time is
measured separately and excluded from both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.feature_net import DomainFeatures, extract, load_feature_net, load_reference, reference_path  # noqa: E402
from components.image_generators import load_image_generator  # noqa: E402
from components.image_io import load_image_split  # noqa: E402
from components.metrics import fid_from_features, kid_from_features  # noqa: E402
from components.pipeline import load_stages  # noqa: E402


def timed(fn):  # type: ignore[no-untyped-def]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=100)
    parser.add_argument("--generator", type=Path, default=None, help="a GAN or diffusion model folder (default: models/image)")
    args = parser.parse_args()
    stages = load_stages(ROOT)
    image_dir = args.generator or ROOT / stages["train_image"].argument(1)
    net_dir = ROOT / stages["train_feature_net"].argument(1)
    reference = ROOT / reference_path(stages["train_feature_net"].argument("--reference"), "test")
    test_images = ROOT / stages["train_image"].argument(0) / "test.safetensors"
    for needed in (image_dir, net_dir, reference, test_images):
        if not needed.exists():
            sys.exit(f"{needed} is missing: run `dvc repro evaluate_image` first")
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = load_image_generator(image_dir).to(device)
    extractor = DomainFeatures(load_feature_net(net_dir).to(device))
    per_class = -(-args.images // generator.num_classes)
    noise, labels = generator.class_noise(per_class, seed=0)
    fake_images, generate_s = timed(lambda: generator.generate(noise[: args.images], labels[: args.images], args.batch))
    real_images = load_image_split(test_images).images
    size = min(args.kid_subset_size, len(real_images))

    def ours(with_kid: bool) -> tuple[float, float | None]:
        real = load_reference(reference)
        fake = extract(extractor, fake_images, args.batch)
        kid = kid_from_features(real, fake, args.kid_subsets, size, seed=0)[0] if with_kid else None
        return fid_from_features(real, fake), kid

    def default_path(with_kid: bool) -> tuple[float, float | None]:
        fid = FrechetInceptionDistance(feature=extractor).to(device)
        for images, is_real in ((real_images, True), (fake_images, False)):
            for i in range(0, len(images), args.batch):
                fid.update(images[i : i + args.batch].to(device), real=is_real)
        kid_value = None
        if with_kid:
            kid = KernelInceptionDistance(feature=extractor, subsets=args.kid_subsets, subset_size=size).to(device)
            for images, is_real in ((real_images, True), (fake_images, False)):
                for i in range(0, len(images), args.batch):
                    kid.update(images[i : i + args.batch].to(device), real=is_real)
            torch.manual_seed(0)
            kid_value = float(kid.compute()[0])
        return float(fid.compute()), kid_value

    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "generator": generator.kind,
               "images": len(fake_images),
               "real_test_images": len(real_images), "generate_seconds": round(generate_s, 3)}  # fmt: skip
    for with_kid in (False, True):
        (ours_fid, ours_kid), ours_s = timed(lambda: ours(with_kid))  # noqa: B023
        (ref_fid, ref_kid), ref_s = timed(lambda: default_path(with_kid))  # noqa: B023
        results["fid_and_kid" if with_kid else "fid"] = {
            "ours_seconds": round(ours_s, 3),
            "torchmetrics_default_seconds": round(ref_s, 3),
            "speedup": round(ref_s / ours_s, 2),
            "fid_ours": round(ours_fid, 6),
            "fid_torchmetrics": round(ref_fid, 6),
            **({"kid_ours": round(ours_kid, 6), "kid_torchmetrics": round(ref_kid, 6)} if with_kid else {}),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
