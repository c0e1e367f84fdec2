"""LoRA fine-tuning (train_text.lora) of a tiny pretrained causal LM the test saves with save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from components import train_text
from components.common import ConfigError
from components.text_model import BASE_FILE, load_text_model
from tests.components.test_train_text import config, tiny_pretrained

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"], "merge": False}


def lora_config(params: dict[str, Any], base: Path, **lora: Any) -> train_text.TrainTextConfig:
    # No validation: selection would keep an early step, and the curve is what is checked here.
    return config(
        params, init_from=str(base), lora={**LORA, **lora}, max_steps=40, lr=3e-2, warmup_steps=2, log_every=5,
        validate_every=0, checkpoint_every=40,
    )  # fmt: skip


@pytest.fixture
def base(tiny_features: Path, tmp_path: Path) -> Path:
    """A small GPT-2 (wider than test_train_text's, so adapters are the small share they are on real models)."""
    tiny_pretrained(tmp_path / "pretrained", tiny_features / "text", n_embd=64, n_layer=2)
    return tmp_path / "pretrained"


def test_lora_trains_a_small_adapter_whose_loss_falls_and_merges_to_the_same_model(
    tiny_params: dict[str, Any], tiny_features: Path, base: Path, tmp_path: Path
) -> None:
    features = tiny_features / "text"
    adapter = train_text.train_text(lora_config(tiny_params, base), features, tmp_path / "adapter", tmp_path / "ckpt_a")
    train_text.train_text(lora_config(tiny_params, base, merge=True), features, tmp_path / "merged", tmp_path / "ckpt_m")

    record = adapter.record
    assert record["trainable_parameters"] < 0.05 * record["parameters"], record
    losses = [loss for _, loss in adapter.losses]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15, losses  # step-to-step noise is ~0.03
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", BASE_FILE, "config.json"} <= names
    assert "model.safetensors" not in names  # the adapter alone, not the base's weights again
    reference = json.loads((tmp_path / "adapter" / BASE_FILE).read_text())
    assert reference["path"] == str(base.resolve()) and reference["hash"].startswith("sha256:")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()

    unmerged_model, tokenizer, _ = load_text_model(tmp_path / "adapter", "adapter")
    merged_model, _, _ = load_text_model(tmp_path / "merged", "merged")
    ids = torch.tensor([tokenizer.encode("colour red <|sep|> a red one")])
    with torch.no_grad():
        a, b = unmerged_model(input_ids=ids).logits, merged_model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_an_adapter_whose_base_changed_is_refused(
    tiny_params: dict[str, Any], tiny_features: Path, base: Path, tmp_path: Path
) -> None:
    cfg = lora_config(tiny_params, base, max_steps=2, checkpoint_every=2)
    train_text.train_text(cfg, tiny_features / "text", tmp_path / "adapter", tmp_path / "ckpt")
    load_text_model(tmp_path / "adapter", "adapter")  # loads while the base is the one it was trained on
    weights = load_file(str(base / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"is a LoRA adapter of .*pretrained, whose weights changed"):
        load_text_model(tmp_path / "adapter", "adapter")


def test_lora_params_are_checked_with_the_key_named(tiny_params: dict[str, Any], base: Path) -> None:
    with pytest.raises(ConfigError, match=r"'train_text.lora' needs train_text.init_from"):
        config(tiny_params, lora=LORA)
    with pytest.raises(ConfigError, match=r"'train_text.lora.r'"):
        lora_config(tiny_params, base, r=0)
    with pytest.raises(ConfigError, match=r"'train_text.lora.target_modules' must be a list"):
        lora_config(tiny_params, base, target_modules="c_attn")
