"""A single run's pictures: curves, confusion matrix (classification), predicted-vs-true (regression),
report.md showing them, all logged to the run."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import mlflow

from runner import job
from tests.test_predict import pair_file


def drawn(path: Path) -> bool:
    image = matplotlib.image.imread(path)
    return image.ndim == 3 and image[..., :3].std() > 0.05


def test_classifier_run_has_curves_and_confusion_matrices(make_run):
    run = make_run("train.epochs=2")
    job.execute(run)
    folder = Path(run.cfg.output_dir) / "report"
    for name in ("curves.png", "confusion-val.png", "confusion-test.png"):
        assert drawn(folder / name)
        assert f"![{Path(name).stem}]({name})" in (folder / "report.md").read_text()
    run_id = json.loads((Path(run.cfg.output_dir) / "mlflow_run.json").read_text())["run_id"]
    listed = {f.path for f in mlflow.MlflowClient(run.cfg.tracking.uri).list_artifacts(run_id, "report")}
    assert {"report/curves.png", "report/confusion-val.png", "report/report.md"} <= listed


def test_regression_run_has_a_predicted_vs_true_scatter(make_run, tmp_path):
    files = {s: pair_file(tmp_path / f"{s}.csv", n, i) for i, (s, n) in enumerate([("train", 48), ("dev", 24)])}
    run = make_run("data=csv", f"data.train={files['train']}", f"data.validation={files['dev']}", "data.test=null",
                   "data.type=pair", "task.architecture=cross", "task.target=score", "task.score_range=[0,5]",
                   "data.label_field=score", "objective.metric=val/spearman", "train.epochs=1")
    job.execute(run)
    folder = Path(run.cfg.output_dir)
    assert drawn(folder / "report" / "scatter-val.png") and not (folder / "report" / "confusion-val.png").exists()
    points = json.loads((folder / "report.json").read_text())["val"]
    assert len(points["predicted"]) == len(points["true"]) == 24
