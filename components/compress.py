"""Stage `compress`: smaller copies of the trained models, for serving on CPU boxes.

    python -m components.compress models/text models/image models/restore models/diffusion --out models/compressed

Writes `<out>/<family>` for each family: the text model as int8 (`compress.text`: dynamic quantisation of
every linear layer, embeddings int8 on disk) and the GAN, the diffusion model and the restorer at half
precision (`compress.images`: fp16 or bf16 weights; theirs are convolutions, which dynamic int8 does not
cover). `components/compression.py` describes the layouts. Each folder loads wherever its fp32 model does,
and each evaluation stage scores it against the fp32 model in the same run (the `compressed` keys of its
metrics file); `package` ships both, and the service serves either (README, "Compressed models").
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.common import ConfigError, load_params, run_main
from components.compression import BF16, FP16, HALF, INT8, compress_folder
from components.runtime import cpu_threads_from_params, pin_cpu_threads
from components.text_model import compress_text_model

log = logging.getLogger(__name__)
TEXT_METHODS = (INT8, FP16, BF16)
IMAGE_FAMILIES = ("image", "restore", "diffusion")


@dataclass(frozen=True)
class CompressConfig:
    text: str
    images: str
    cpu_threads: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CompressConfig:
        cfg = cls(text=str(params.get("text")), images=str(params.get("images")),
                  cpu_threads=cpu_threads_from_params(params["base"]))  # fmt: skip
        if cfg.text not in TEXT_METHODS:
            raise ConfigError(f"params key 'compress.text' is {cfg.text!r}: use one of {', '.join(TEXT_METHODS)}")
        if cfg.images not in HALF:
            raise ConfigError(
                f"params key 'compress.images' is {cfg.images!r}: use one of {', '.join(HALF)} (the image models are "
                "convolutional: dynamic int8 quantises linear layers only)"
            )
        return cfg


CONFIG = CompressConfig


def compress(cfg: CompressConfig, folders: dict[str, Path], out: Path) -> dict[str, dict[str, Any]]:
    """Compress every family's model folder into `out/<family>`; compression.json's content by family."""
    pin_cpu_threads(cfg.cpu_threads)
    written = {"text": compress_text_model(folders["text"], out / "text", cfg.text)}
    for family in IMAGE_FAMILIES:
        written[family] = compress_folder(folders[family], out / family, cfg.images, f"compress {family} model folder")
    for family, info in written.items():
        log.info("%s: %s, %d -> %d bytes (%.1f %%)", family, info["method"], info["source_bytes"], info["bytes"],
                 100 * info["size_ratio"])  # fmt: skip
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m components.compress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("text", type=Path, help="text model folder (models/text)")
    for family in IMAGE_FAMILIES:
        parser.add_argument(family, type=Path, help=f"{family} model folder (models/{family})")
    parser.add_argument("--out", type=Path, required=True, help="folder of the compressed models (models/compressed)")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(
        lambda: compress(
            CompressConfig.from_params(load_params("compress", args.params)),
            {family: getattr(args, family) for family in ("text", *IMAGE_FAMILIES)},
            args.out,
        )
    )


if __name__ == "__main__":
    main()
