"""Greyscale photographs: a denoiser trained on the data's own (greyscale) layout against one trained on RGB.

    python bench/restore_layout.py                 # 600 steps each, sigma 25, the default photos
    python bench/restore_layout.py --steps 1500 --sigma 50

The default photographs are split as `clean` splits them; model `rgb` trains on the RGB train photos
(what the pipeline did before it learned the data's layout), model `grey` on greyscale versions of the same
photos. Both are scored on the greyscale test photos with greyscale noise of the same seed: the `rgb` model
gets the grey image in all three channels and its output's channel mean is scored. Prints one JSON object
with PSNR / SSIM of each and of the noisy input (the baseline, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    import numpy as np
    import pyarrow as pa
    import torch
    import yaml
    from safetensors.numpy import save_file

    from components import augment, clean, datasets, train_restore
    from components.image_io import decode_image, encode_png
    from components.metrics import restoration_scores
    from components.restore_model import degrade, load_restorer

    parser = argparse.ArgumentParser(prog="python bench/restore_layout.py", description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--sigma", type=float, default=25.0)
    args = parser.parse_args(argv)
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))

    photos = pa.Table.from_batches(list(datasets.builtin_photos(64)))
    split = clean.clean_images(photos, params["clean"]["restore_splits"], params["base"]["seed"]).kept

    def grey(table: pa.Table) -> pa.Table:
        rows = []
        for row in table.to_pylist():
            rgb = decode_image(row["image"]).astype(np.float32)
            luma = np.rint(rgb @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
            rows.append({**row, "image": encode_png(luma), "mode": "L", "channels": 1})
        return pa.Table.from_pylist(rows, schema=table.schema)

    layouts = {"rgb": split, "grey": grey(split)}
    section = {**params["train_restore"], "base": params["base"]}
    section["model"] = {**section["model"], "task": "denoise", "noise_sigma": args.sigma}
    section.update(max_steps=args.steps, checkpoint_every=args.steps, device="cpu")
    cfg = train_restore.TrainRestoreConfig.from_params(section)
    report: dict[str, Any] = {"steps": args.steps, "sigma": args.sigma, "train_photos": 0, "test_photos": 0}
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for name, table in layouts.items():
            patches = augment.restore_patches(
                table, params["augment"]["restore"]["patch_size"], params["augment"]["restore"]["patches_per_image"], 0
            )
            stacked = np.stack([np.atleast_3d(decode_image(b)).transpose(2, 0, 1) for b in patches.column("image").to_pylist()])
            folder = Path(tmp) / name
            folder.mkdir()
            save_file({"patches": np.ascontiguousarray(stacked)}, str(folder / "train.safetensors"))
            start = time.perf_counter()
            train_restore.train_restore(cfg, folder, folder / "model", folder / "ckpt")
            report[f"train_seconds_{name}"] = round(time.perf_counter() - start, 1)
            models[name] = load_restorer(folder / "model")
        test = [decode_image(r["image"]) for r in layouts["grey"].to_pylist() if r["split"] == "test"]
        report["train_photos"] = sum(r["split"] == "train" for r in split.to_pylist())
        report["test_photos"] = len(test)
        scores: dict[str, list[dict[str, float]]] = {"noisy_input": [], "rgb": [], "grey": []}
        for index, pixels in enumerate(test):
            clean_image = torch.from_numpy(pixels).float().div(255.0)[None, None]  # (1, 1, H, W)
            noisy = degrade(clean_image, models["grey"].cfg, torch.Generator().manual_seed(index))
            with torch.inference_mode():
                by_grey = models["grey"](noisy).clamp(0, 1)
                by_rgb = models["rgb"](noisy.expand(-1, 3, -1, -1)).clamp(0, 1).mean(dim=1, keepdim=True)
            scores["noisy_input"].append(restoration_scores(noisy.clamp(0, 1), clean_image, 0))
            scores["rgb"].append(restoration_scores(by_rgb, clean_image, 0))
            scores["grey"].append(restoration_scores(by_grey, clean_image, 0))
    for name, rows in scores.items():
        report[f"psnr_{name}"] = round(sum(r["psnr"] for r in rows) / len(rows), 2)
        report[f"ssim_{name}"] = round(sum(r["ssim"] for r in rows) / len(rows), 4)
    report["psnr_gain_grey_over_rgb"] = round(report["psnr_grey"] - report["psnr_rgb"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
