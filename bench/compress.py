"""fp32 against compressed, per family, in one run: CPU latency and throughput, size on disk, and the metric
delta the evaluation stage measured for the two models in one process.

    dvc repro evaluate_text evaluate_restore && python bench/compress.py
    python bench/compress.py --text-shape 12x768     # also a GPT-2-small-shaped text model (random weights)
    python bench/compress.py --threads 1 --repeats 5

Text: the test split's sources, decoded greedily for exactly `--new-tokens` tokens in batches of `--batch`
(what the service's adaptive batching sends), alternating fp32 and int8, median of `--repeats`; throughput in
generated tokens per second. `--text-shape LxW` adds a randomly initialised GPT-2 of L layers × W wide,
compressed by the same code: speed does not depend on the weights' values, and the default model (3 × 128)
is small enough that Python's per-token overhead, not the matrix products int8 speeds up, sets its pace.
Restorer: one `--restore-side`² photo per call. Generators: a batch of `--images` per call (the GAN), a
request's images one by one at the model's own sampling steps (the diffusion model, as the service samples).
Metric deltas come from the pipeline's metrics files (`compressed.<key>_delta`): BLEU and slot error rate,
PSNR, domain FID. Goals (issue 20): text ≥ 1.8× CPU throughput with BLEU within 0.5 and size ≤ 35 %;
the restorer's PSNR within 0.1 dB. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.compression import compression_of, weight_bytes  # noqa: E402
from components.image_generators import load_image_generator  # noqa: E402
from components.pipeline import load_stages  # noqa: E402
from components.restore_model import load_restorer  # noqa: E402
from components.text_model import compress_text_model, load_text_model, prompt_ids, read_texts  # noqa: E402


def paired(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each run, the runs alternated so that a noisy neighbour slows both alike."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def sampler(generator: Any, noise: torch.Tensor, labels: torch.Tensor, per_call: int) -> Callable[[], Any]:
    return lambda: generator.generate(noise, labels, per_call)


def text_batch(folder: Path, sources: list[str], batch: int, new_tokens: int) -> tuple[Any, Callable[[], Any]]:
    model, tokenizer, delexicaliser = load_text_model(folder, str(folder))
    max_length = model.config.max_position_embeddings
    model_sources = [delexicaliser.model_source(s) for s in sources] if delexicaliser else sources
    prompts = [prompt_ids(s, tokenizer, max_length, new_tokens) for s in model_sources[:batch]]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1

    def run() -> Any:
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip

    return model, run


def text_figures(fp32: Path, int8: Path, sources: list[str], args: argparse.Namespace) -> dict[str, Any]:
    _, run_fp32 = text_batch(fp32, sources, args.batch, args.new_tokens)
    _, run_int8 = text_batch(int8, sources, args.batch, args.new_tokens)
    seconds = paired({"fp32": run_fp32, "int8": run_int8}, args.repeats)
    tokens = min(args.batch, len(sources)) * args.new_tokens
    return {
        "method": compression_of(int8)["method"],
        "fp32_tokens_per_s": round(tokens / seconds["fp32"], 1),
        "compressed_tokens_per_s": round(tokens / seconds["int8"], 1),
        "throughput_ratio": round(seconds["fp32"] / seconds["int8"], 3),
        "fp32_ms_per_batch": round(1000 * seconds["fp32"], 1),
        "compressed_ms_per_batch": round(1000 * seconds["int8"], 1),
        "fp32_bytes": weight_bytes(fp32),
        "compressed_bytes": weight_bytes(int8),
        "size_ratio": round(weight_bytes(int8) / weight_bytes(fp32), 4),
    }


def shaped_text_model(shape: str, tokenizer_folder: Path, folder: Path) -> None:
    """A randomly initialised GPT-2 of `LxW` (layers × width) with the trained model's tokenizer, saved as
    train_text saves one."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width = (int(n) for n in shape.lower().split("x"))
    config = json.loads((tokenizer_folder / "config.json").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=config["vocab_size"], n_positions=config["n_positions"], n_embd=width,
                                       n_layer=layers, n_head=max(1, width // 64)))  # fmt: skip
    model.save_pretrained(folder, safe_serialization=True)
    for path in tokenizer_folder.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, folder / path.name)


def metric_deltas(metrics: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    if not metrics.is_file():
        return {"metrics": f"{metrics} is missing: run its evaluation stage"}
    block = json.loads(metrics.read_text(encoding="utf-8")).get("compressed") or {}
    return {key: block.get(key) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="text requests per generate call")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--text-shape", action="append", default=[], help="also an LxW GPT-2 of random weights, e.g. 12x768")
    parser.add_argument("--restore-side", type=int, default=256)
    parser.add_argument("--images", type=int, default=16, help="images per generator call")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = load_stages(ROOT)
    compressed = ROOT / stages["compress"].argument("--out")
    folders = {
        family: ROOT / stages["compress"].argument(i) for i, family in enumerate(("text", "image", "restore", "diffusion"))
    }
    for needed in [*folders.values(), *(compressed / f for f in folders)]:
        if not needed.is_dir():
            sys.exit(f"{needed} is missing: run `dvc repro compress` first")
    features = ROOT / stages["evaluate_text"].argument(1)
    sources = sorted({row["source"] for row in read_texts(features / "test.parquet")})[: args.batch]
    result: dict[str, Any] = {"device": "cpu", "threads": torch.get_num_threads(), "batch": args.batch,
                              "new_tokens": args.new_tokens, "repeats": args.repeats}  # fmt: skip

    text = text_figures(folders["text"], compressed / "text", sources, args)
    metrics = {family: ROOT / stages[f"evaluate_{family}"].only_metrics() for family in folders}
    text |= metric_deltas(metrics["text"], ("bleu", "bleu_delta", "chrf_delta", "slot_error_rate_delta", "perplexity_delta"))
    text["goal"] = {"throughput_ratio": 1.8, "bleu_delta": -0.5, "size_ratio": 0.35}
    result["text"] = text
    for shape in args.text_shape:
        with tempfile.TemporaryDirectory() as scratch:
            shaped, shaped_int8 = Path(scratch) / "fp32", Path(scratch) / "int8"
            shaped_text_model(shape, folders["text"], shaped)
            compress_text_model(shaped, shaped_int8, "int8")
            result[f"text_{shape}"] = text_figures(shaped, shaped_int8, sources, args)

    side = args.restore_side
    photo = torch.rand(1, load_restorer(folders["restore"]).cfg.channels, side, side, generator=torch.Generator().manual_seed(0))
    fp32_restorer, half_restorer = load_restorer(folders["restore"]), load_restorer(compressed / "restore")
    with torch.inference_mode():
        seconds = paired({"fp32": lambda: fp32_restorer(photo), "half": lambda: half_restorer(photo)}, args.repeats)
    result["restore"] = {
        "method": compression_of(compressed / "restore")["method"], "input_side": side,
        "fp32_ms_per_image": round(1000 * seconds["fp32"], 2), "compressed_ms_per_image": round(1000 * seconds["half"], 2),
        "size_ratio": round(weight_bytes(compressed / "restore") / weight_bytes(folders["restore"]), 4),
        **metric_deltas(metrics["restore"], ("psnr", "psnr_delta", "ssim_delta")), "goal": {"psnr_delta": -0.1},
    }  # fmt: skip
    for family in ("image", "diffusion"):
        generators = {
            name: load_image_generator(folder) for name, folder in (("fp32", folders[family]), ("half", compressed / family))
        }
        noise, labels = generators["fp32"].class_noise(max(1, args.images // generators["fp32"].num_classes), 0)
        per_call = 1 if family == "diffusion" else len(labels)
        runs = {name: sampler(generator, noise, labels, per_call) for name, generator in generators.items()}
        seconds = paired(runs, max(1, args.repeats // 2) if family == "diffusion" else args.repeats)
        result[family] = {
            "method": compression_of(compressed / family)["method"],
            "fp32_ms_per_image": round(1000 * seconds["fp32"] / len(labels), 2),
            "compressed_ms_per_image": round(1000 * seconds["half"] / len(labels), 2),
            "size_ratio": round(weight_bytes(compressed / family) / weight_bytes(folders[family]), 4),
            **metric_deltas(metrics[family], ("fid_domain", "fid_domain_delta", "generated_class_accuracy_delta")),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
