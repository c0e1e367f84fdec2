"""The compress stage: int8 text models and half-precision image models, on disk as safetensors + JSON, loaded
by each family's own loader, against the fp32 model they copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from components import compress
from components.common import ConfigError
from components.compression import COMPRESSION_FILE, compression_of
from components.gan_model import GANConfig, Generator, load_generator
from components.model_io import save_model
from components.restore_model import RestoreConfig, Restorer, load_restorer
from components.text_model import load_text_model
from tests.components.test_train_text import tiny_pretrained


@pytest.fixture
def text_model(tiny_features: Path, tmp_path: Path) -> Path:
    """A GPT-2 of 2 layers × 96 wide: as on real models, its linear layers, not its embeddings, hold most weights."""
    torch.manual_seed(0)
    tiny_pretrained(tmp_path / "text", tiny_features / "text", n_embd=96, n_layer=2)
    return tmp_path / "text"


def restorer(folder: Path, channels: int) -> Restorer:
    torch.manual_seed(1)
    cfg = RestoreConfig(task="super_resolution", scale=2, noise_sigma=0.0, channels=channels, width=16, blocks=2)
    model = Restorer(cfg).eval()
    save_model(model, cfg.to_json(), folder)
    return model


def gan(folder: Path) -> Generator:
    torch.manual_seed(2)
    sizes = {"latent_dim": 8, "embed_dim": 4, "generator_width": 8, "discriminator_width": 8}
    cfg = GANConfig.from_json({**sizes, "image_size": 16, "channels": 1, "num_classes": 3, "loss": "hinge", "ema_decay": 0.999})
    model = Generator(cfg).eval()
    save_model(model, {**cfg.to_json(), "label_names": ["a", "b", "c"]}, folder)
    return model


def test_int8_text_is_a_third_of_the_size_and_predicts_what_fp32_predicts(text_model: Path, tmp_path: Path) -> None:
    info = compress.compress_text_model(text_model, tmp_path / "int8", "int8")
    assert info == compression_of(tmp_path / "int8") and info["method"] == "int8"
    assert info["size_ratio"] <= 0.35, info
    weights = load_file(str(tmp_path / "int8" / "model.safetensors"))
    assert weights["transformer.h.0.attn.c_attn.weight.int8"].dtype == torch.int8
    assert weights["transformer.h.0.attn.c_attn.weight.scale"].shape == (3 * 96,)  # one scale per output row
    assert weights["lm_head.weight.int8"].dtype == torch.int8 and "transformer.wte.weight.int8" in weights
    assert not any(name.endswith(".pkl") or name.endswith(".bin") for name in map(str, (tmp_path / "int8").iterdir()))

    fp32, tokenizer, _ = load_text_model(text_model, "fp32")
    # Asked for another device (a GPU box's evaluation), an int8 model stays on the CPU: no kernels elsewhere.
    int8, int8_tokenizer, _ = load_text_model(tmp_path / "int8", "int8", torch.device("meta"))
    assert int8_tokenizer.get_vocab() == tokenizer.get_vocab() and int8.device.type == "cpu"
    ids = torch.randint(0, len(tokenizer), (4, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        a, b = fp32(input_ids=ids).logits, int8(input_ids=ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    with torch.inference_mode():  # and it decodes, deterministically
        first = int8.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
        again = int8.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(first, again) and first.shape == (4, 11)


def test_fp16_text_halves_the_weights_and_computes_in_fp32(text_model: Path, tmp_path: Path) -> None:
    info = compress.compress_text_model(text_model, tmp_path / "fp16", "fp16")
    assert 0.45 < info["size_ratio"] < 0.55
    model, _, _ = load_text_model(tmp_path / "fp16", "fp16")
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("method, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_image_models_load_into_their_families_fp32_modules(
    method: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    originals = {"restore": restorer(tmp_path / "restore", 3), "image": gan(tmp_path / "image")}
    for family in originals:
        info = compress.compress_folder(tmp_path / family, tmp_path / "out" / family, method, family)
        assert 0.45 < info["size_ratio"] < 0.56, info
        weights = load_file(str(tmp_path / "out" / family / "model.safetensors"))
        assert {t.dtype for t in weights.values() if t.is_floating_point()} == {dtype}
    restored = load_restorer(tmp_path / "out" / "restore")
    assert next(restored.parameters()).dtype == torch.float32
    low = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.allclose(restored(low), originals["restore"](low), atol=0.05)
    generator, config = load_generator(tmp_path / "out" / "image")
    assert config["label_names"] == ["a", "b", "c"] and next(generator.parameters()).dtype == torch.float32


def test_the_stage_writes_every_family_and_its_params_are_checked(
    text_model: Path, tiny_params: dict[str, Any], tmp_path: Path
) -> None:
    restorer(tmp_path / "restore", 1)
    gan(tmp_path / "image")
    gan(tmp_path / "diffusion")  # the stage halves any model_io folder: a GAN stands in for the UNet here
    cfg = compress.CompressConfig.from_params({**tiny_params["compress"], "base": tiny_params["base"]})
    folders = {"text": text_model, **{f: tmp_path / f for f in ("image", "restore", "diffusion")}}
    written = compress.compress(cfg, folders, tmp_path / "compressed")
    methods = {family: info["method"] for family, info in written.items()}
    assert methods == {"text": "int8", "image": "fp16", "restore": "fp16", "diffusion": "fp16"}
    for family in folders:
        assert json.loads((tmp_path / "compressed" / family / COMPRESSION_FILE).read_text()) == written[family]
    with pytest.raises(ConfigError, match=r"params key 'compress.images' is 'int8'.*fp16, bf16"):
        compress.CompressConfig.from_params({"text": "int8", "images": "int8", "base": {}})
    with pytest.raises(ConfigError, match=r"params key 'compress.text' is 'int4'"):
        compress.CompressConfig.from_params({"text": "int4", "images": "fp16", "base": {}})


def test_two_processes_write_the_same_bytes(text_model: Path, tmp_path: Path) -> None:
    """DVC hashes the files: a compressed folder must not depend on the process (hash order, threads) that wrote it."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    restorer(tmp_path / "restore", 3)
    code = (
        "import sys; from pathlib import Path; from components import compress; out = Path(sys.argv[1]); "
        f"compress.compress_text_model(Path({str(text_model)!r}), out / 'text', 'int8'); "
        f"compress.compress_folder(Path({str(tmp_path / 'restore')!r}), out / 'restore', 'fp16', 'restore')"
    )
    for run, threads in (("a", "1"), ("b", "2")):
        env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": threads, "PYTHONHASHSEED": threads}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / run)], env=env, check=True, capture_output=True)
    for family in ("text", "restore"):
        for path in sorted((tmp_path / "a" / family).iterdir()):
            assert path.read_bytes() == (tmp_path / "b" / family / path.name).read_bytes(), path


def test_a_damaged_compressed_folder_is_one_clear_error(text_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "int8"
    compress.compress_text_model(text_model, folder, "int8")
    weights = load_file(str(folder / "model.safetensors"))
    for damage in ("transformer.h.1.mlp.c_fc.weight.scale", "transformer.h.0.attn.c_proj.bias"):
        save_file({k: v for k, v in weights.items() if k != damage}, str(folder / "model.safetensors"))
        with pytest.raises(ConfigError, match=r"its int8 weights have no transformer.h.\d.\w+.c_\w+: rerun the compress stage"):
            load_text_model(folder, "int8")
    narrow = {**weights, "transformer.ln_f.weight": weights["transformer.ln_f.weight"][:-1]}
    save_file(narrow, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"transformer.ln_f.weight does not fit the model its config.json describes"):
        load_text_model(folder, "int8")
    (folder / COMPRESSION_FILE).write_text('{"method": "int3"}')
    with pytest.raises(ConfigError, match=r"compression.json: no known compression method in it"):
        load_text_model(folder, "int8")
