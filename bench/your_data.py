"""The whole `dvc repro`, default params, on a user-shaped `key[value]` corpus instead of the demo text.

    python bench/your_data.py                      # 1 400 records x 3 references = 4 200 rows, bracket syntax
    python bench/your_data.py --records 2000 --syntax json --keep /tmp/run

Builds the corpus with the tests' data builders (a restaurant domain, none of the demo's fields), copies the
pipeline into a temporary git + DVC repo with `ingest.text.path` pointing at it, runs `dvc repro` there and
prints one JSON object: wall time, the record schema's syntax and keys, the data accounting and the text
metrics. The image and restore stages run on their default data. Needs the project's venv (dvc on PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    import yaml

    from components.records import BRACKET, JSON, PIPE, PROMPT
    from tests.conftest import copy_repo
    from tests.user_data import corpus, write_text

    parser = argparse.ArgumentParser(prog="python bench/your_data.py", description=__doc__)
    parser.add_argument("--records", type=int, default=1400)
    parser.add_argument("--refs", type=int, default=3)
    parser.add_argument("--syntax", choices=[PIPE, BRACKET, JSON, PROMPT], default=BRACKET)
    parser.add_argument("--keep", type=Path, default=None, help="run here and keep it (default: a temp dir, removed)")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="your-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = corpus(args.syntax, args.records, args.refs)
        text = write_text(rows, "csv", work / "corpus", args.syntax)
        params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        params["ingest"]["text"].update(path=str(text), source_column="mr", reference_column="ref")
        repo = copy_repo(work / "repo", params)
        env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        start = time.perf_counter()
        run = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if run.returncode != 0:
            sys.exit(f"dvc repro failed after {seconds:.0f} s:\n{(run.stdout + run.stderr)[-4000:]}")
        schema = json.loads((repo / "models" / "text" / "schema.json").read_text(encoding="utf-8"))
        text_metrics = json.loads((repo / "metrics" / "text.json").read_text(encoding="utf-8"))
        print(
            json.dumps(
                {
                    "rows": len(rows),
                    "syntax": args.syntax,
                    "cpu_count": os.cpu_count(),
                    "dvc_repro_seconds": round(seconds, 1),
                    "schema_syntax": schema["syntax"],
                    "schema_keys": {key: entry["kind"] for key, entry in schema["keys"].items()},
                    "data": json.loads((repo / "metrics" / "data.json").read_text(encoding="utf-8"))["text"],
                    "text_metrics": {
                        k: text_metrics.get(k)
                        for k in (
                            "bleu",
                            "chrf",
                            "value_coverage",
                            "slot_error_rate",
                            "hallucinated_names",
                            "perplexity",
                            "bleu_retrieval_baseline",
                            "value_coverage_retrieval_baseline",
                            "split",
                        )
                    },
                },
                indent=2,
            )
        )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
