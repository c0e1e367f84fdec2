"""Compressed copies of trained models, for serving: int8 or half-precision weights, on disk as safetensors +
JSON like every model this project writes, never pickles.

- `int8`: torch's dynamic quantisation (`torch.ao.quantization.quantize_dynamic`, per output channel,
  symmetric) of every `nn.Linear`: weights are int8, activations are quantised on the fly and the products
  run in int8 (fbgemm on x86, qnnpack on ARM). CPU only: a quantised layer has no CUDA kernel.
- `fp16` / `bf16`: every floating-point tensor stored at half width. Loading copies them into the family's
  fp32 modules, so a CPU computes in fp32 (its half-precision arithmetic is slower, where it has any).

A quantised module cannot be saved as a state dict of plain tensors (torch keeps its weight packed), so int8
has a layout of its own: a tensor `W` (out × in, or rows × width for an embedding) of module `m` is stored
as `m.weight.int8` (int8), `m.weight.scale` (float32, one per row) and `m.weight.zero_point` (int64, one
per row); its value is `(int8 - zero_point) * scale`, row by row. Every other tensor is stored as it is.
`compression.json` beside the weights says which method wrote the folder and the sizes before and after.
Only torch, safetensors and the standard library are imported here.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.common import ConfigError, write_json

COMPRESSION_FILE = "compression.json"
"""What a compressed folder is, beside its weights: not in the safetensors metadata, which keeps `format` alone.
safetensors writes its metadata map in hash order, so a second key makes the file's bytes differ run to run
(and DVC rerun everything downstream)."""
INT8, FP16, BF16 = "int8", "fp16", "bf16"
HALF = {FP16: torch.float16, BF16: torch.bfloat16}
INT8_SUFFIXES = (".weight.int8", ".weight.scale", ".weight.zero_point")


@contextlib.contextmanager
def quantisation_api() -> Iterator[None]:
    """torch.ao.quantization, without its deprecation notices on every call: torch 2.14 announces that its
    quantised tensors move to torchao, which is not among what a serving box installs; the API still works."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, message=".*quantiz.*")
        yield


def weight_bytes(folder: Path) -> int:
    """Bytes of a model folder's safetensors files: the model's size on disk."""
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def compression_of(folder: Path) -> dict[str, Any] | None:
    """What `compression.json` says of a model folder (method, sizes), or None for an uncompressed model."""
    path = Path(folder) / COMPRESSION_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{path}: not JSON ({err}); rerun the compress stage (dvc repro compress)") from None
    if not isinstance(info, dict) or info.get("method") not in (INT8, *HALF):
        raise ConfigError(f"{path}: no known compression method in it; rerun the compress stage (dvc repro compress)")
    return info


def write_compression(folder: Path, method: str, source: Path, source_bytes: int | None = None) -> dict[str, Any]:
    """compression.json of a compressed folder: the method, and the weights' size against the source's
    (`source_bytes` when the source's files are not the whole model, e.g. a LoRA adapter)."""
    before, after = source_bytes or weight_bytes(source), weight_bytes(folder)
    info = {"method": method, "bytes": after, "source_bytes": before, "size_ratio": round(after / before, 4)}
    write_json(info, folder / COMPRESSION_FILE)
    return info


def halve(state: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    """The state dict with its floating-point tensors at half width (`fp16` or `bf16`); the rest as it is."""
    dtype = HALF[method]
    return {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}


def quantize_rows(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 of a 2-D tensor, per row and symmetric, as `quantize_dynamic` quantises a linear layer's weight:
    the int8 layout's three tensors (suffixes without the leading `.weight`)."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    with quantisation_api():
        observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        observer(weight.detach().float())
        scale, zero_point = observer.calculate_qparams()
        quantised = torch.quantize_per_channel(weight.detach().float(), scale, zero_point, 0, torch.qint8)
    return packed_tensors(quantised)


def packed_tensors(quantised: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "int8": quantised.int_repr().contiguous(),
        "scale": quantised.q_per_channel_scales().float().contiguous(),
        "zero_point": quantised.q_per_channel_zero_points().long().contiguous(),
    }


def quantised_weight(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The per-channel qint8 tensor of module `name` from the int8 layout."""
    with quantisation_api():
        return torch._make_per_channel_quantized_tensor(
            state[f"{name}.weight.int8"], state[f"{name}.weight.scale"].double(), state[f"{name}.weight.zero_point"], 0
        )


def quantize_linears(model: nn.Module) -> nn.Module:
    """Every `nn.Linear` of `model` (in place) as a dynamically quantised int8 layer, per output channel."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with quantisation_api():
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def _dynamic_linear() -> type:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return DynamicLinear


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The int8 layout of a model whose linear layers `quantize_linears` quantised: their weights and
    every embedding as int8 rows, everything else as it is."""
    dynamic_linear = _dynamic_linear()
    packed: dict[str, dict[str, torch.Tensor]] = {}
    with quantisation_api():
        for name, module in model.named_modules():
            if isinstance(module, dynamic_linear):
                packed[name] = packed_tensors(module.weight())
                if module.bias() is not None:
                    packed[name]["bias"] = module.bias().detach()
            elif isinstance(module, nn.Embedding):
                packed[name] = quantize_rows(module.weight)
        state = {
            key: value.detach().contiguous()
            for key, value in model.state_dict().items()
            if isinstance(value, torch.Tensor) and not any(key.startswith(f"{name}.") for name in packed)
        }
    for name, tensors in packed.items():
        for suffix, tensor in tensors.items():
            state[f"{name}.bias" if suffix == "bias" else f"{name}.weight.{suffix}"] = tensor.contiguous()
    return state


def load_int8_state(model: nn.Module, state: dict[str, torch.Tensor], key: str) -> None:
    """Fill a model prepared as at saving (`quantize_linears` applied) with an int8 layout's tensors."""
    dynamic_linear = _dynamic_linear()
    rest, packed = dict(state), set()
    with quantisation_api():
        for name, module in model.named_modules():
            if isinstance(module, dynamic_linear | nn.Embedding):
                packed.add(f"{name}.weight")
                has_bias = isinstance(module, dynamic_linear) and module.bias() is not None
                needed = [*INT8_SUFFIXES, *([".bias"] if has_bias else [])]
                if any(f"{name}{suffix}" not in state for suffix in needed):
                    raise ConfigError(f"{key}: its int8 weights have no {name}: rerun the compress stage (dvc repro compress)")
                weight = quantised_weight(state, name)
                expected = module.weight.shape if isinstance(module, nn.Embedding) else module.weight().shape
                if weight.shape != expected:
                    raise ConfigError(
                        f"{key}: {name} is {tuple(weight.shape)} in its int8 weights but {tuple(expected)} in its config.json: "
                        "rerun the compress stage (dvc repro compress)"
                    )
                for suffix in INT8_SUFFIXES:
                    rest.pop(f"{name}{suffix}")
                if isinstance(module, nn.Embedding):
                    with torch.no_grad():
                        module.weight.copy_(weight.dequantize())
                else:
                    module.set_weight_bias(weight, rest.pop(f"{name}.bias") if has_bias else None)
    # Not load_state_dict: a quantised layer's own loader expects its packed weight, set above.
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    expected = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and k in targets} - packed
    unexpected = sorted(set(rest) - set(targets))
    missing = sorted(expected - set(rest))
    if missing or unexpected:
        raise ConfigError(
            f"{key}: its int8 weights do not fit the model its config.json describes (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): rerun the compress stage (dvc repro compress)"
        )
    wrong = [name for name, tensor in rest.items() if targets[name].shape != tensor.shape]
    if wrong:
        raise ConfigError(f"{key}: {wrong[0]} does not fit the model its config.json describes: rerun the compress stage")
    with torch.no_grad():
        for name, tensor in rest.items():
            targets[name].copy_(tensor)


def compress_folder(source: Path, folder: Path, method: str, key: str) -> dict[str, Any]:
    """A half-precision copy of a model folder written by `model_io.save_model` (the image families): its
    weights cast, its JSON files copied. Returns compression.json's content."""
    import shutil

    from safetensors.torch import load_file, save_file

    from components.model_io import WEIGHTS, check_safetensors_folder

    if method not in HALF:
        raise ConfigError(f"{key}: {method!r} is not a method for this model (fp16 or bf16)")
    check_safetensors_folder(source, key)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix == ".json" and path.name != COMPRESSION_FILE:
            shutil.copy2(path, folder / path.name)
    halved = halve(load_file(str(source / WEIGHTS)), method)
    save_file(halved, str(folder / WEIGHTS), metadata={"format": "pt"})  # one key: see COMPRESSION_FILE
    return write_compression(folder, method, source)


def compared(scores: dict[str, Any], fp32: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's `compressed` block: the compressed model's scores, each number's change from the fp32
    model's score in the same run (`<key>_delta`), and the method and size from compression.json."""
    deltas = {
        f"{key}_delta": round(value - fp32[key], 4) + 0.0  # + 0.0: no -0.0 for an unchanged score
        for key, value in scores.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and isinstance(fp32.get(key), int | float)
    }
    return {"method": info["method"], "bytes": info["bytes"], "size_ratio": info["size_ratio"], **scores, **deltas}


def compressed_info(folder: Path, key: str) -> dict[str, Any]:
    """compression.json of a folder that must hold a compressed model."""
    info = compression_of(folder)
    if info is None:
        raise ConfigError(f"{key}: {folder} holds no compressed model (no {COMPRESSION_FILE}); run the compress stage first")
    return info
