"""Components import neither orchestration nor serving libraries; the shared helpers not even pyarrow."""

from __future__ import annotations

import subprocess
import sys

from components.pipeline import load_stages
from tests.conftest import REPO_ROOT


def loaded_after_import(modules: list[str], watched: list[str]) -> list[str]:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print(','.join(w for w in {watched!r} if w in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [name for name in out.stdout.strip().split(",") if name]


def test_stages_do_not_import_prefect_dvc_ge_evidently_or_bentoml() -> None:
    watched = ["prefect", "dvc", "great_expectations", "evidently", "bentoml", "dvclive"]
    # `package` is serving code (serving/package.py): BentoML is its job.
    modules = sorted({stage.module for stage in load_stages(REPO_ROOT).values() if stage.module.startswith("components.")})
    assert loaded_after_import(modules, watched) == []


def test_shared_helpers_run_on_a_machine_with_only_torch_and_transformers() -> None:
    # Training stages (GPU machine: torch, transformers, tokenizers, safetensors, numpy, yaml) import these.
    watched = ["pyarrow", "pandas", "PIL", "sklearn", "prefect", "dvc", "great_expectations"]
    shared = ["common", "textgen", "feature_defs", "records", "pipeline", "runtime", "checkpoints", "training", "metrics",
              "text_model", "model_io", "image_io"]  # fmt: skip
    assert loaded_after_import([f"components.{m}" for m in shared], watched) == []


def test_image_training_and_evaluation_need_only_torch_safetensors_and_torchmetrics() -> None:
    # What the GPU machine has: no torchvision (grids are skipped there), pyarrow, PIL or scikit-learn.
    modules = ["components.train_image", "components.train_feature_net", "components.train_restore",
               "components.evaluate_image", "components.evaluate_restore", "components.train_diffusion"]  # fmt: skip
    watched = ["torchvision", "pyarrow", "pandas", "PIL", "sklearn", "skimage", "transformers", "prefect", "dvc", "diffusers"]
    assert loaded_after_import(modules, watched) == []  # diffusers: imported when a diffusion model is built
