"""Model folders on disk: safetensors weights + a JSON config, never pickles.

Our own families (image generator, feature network, restorer) are saved like transformers'
`save_pretrained` folders: `model.safetensors` and `config.json`, plus `training.json` (the params and data
hash that produced them). Loading refuses a folder whose weights are only pickle files, since unpickling
runs code from the file. Only torch, safetensors and the standard library are imported here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common import ConfigError, write_json

if TYPE_CHECKING:
    import torch
    from torch import nn

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def check_safetensors_folder(path: Path, key: str) -> None:
    """A model folder we may load: config.json and safetensors weights. Pickle weights are refused."""
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder")
    if not (path / CONFIG).is_file():
        raise ConfigError(f"{key}: {path} has no {CONFIG} (expected a folder written by this project or save_pretrained)")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        detail = f"it holds only pickle weights {pickles}" if pickles else "it holds no *.safetensors weights"
        raise ConfigError(
            f"{key}: refusing {path}: {detail}. Pickle files can run code when loaded; "
            "convert them to safetensors where you trust them (safetensors.torch.save_file / save_pretrained)."
        )


def save_model(module: nn.Module, config: dict[str, Any], folder: Path) -> None:
    """Write `model.safetensors` (contiguous CPU copies of the state dict) and `config.json`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    write_json(config, folder / CONFIG)


def load_model_files(folder: Path, key: str, family: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict) of a folder written by `save_model` for `family`; pickles are refused."""
    from safetensors.torch import load_file

    check_safetensors_folder(folder, key)
    if not (folder / WEIGHTS).is_file():
        raise ConfigError(f"{key}: {folder} has no {WEIGHTS}")
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    if config.get("family") != family:
        raise ConfigError(f"{key}: {folder} holds a {config.get('family')!r} model, expected {family!r}")
    return config, load_file(str(folder / WEIGHTS))
