"""The MLflow UI as a user opens it (slow): a k-fold Optuna sweep's parent run with its trials nested, and
the sweep's pictures among its artifacts, found in headless Chromium (Debian's chromium + playwright)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import mlflow
import pytest

from tests.conftest import ROOT
from tests.test_mlflow_model import free_port, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_the_sweep_parent_its_trials_and_its_pictures_in_the_mlflow_ui(tmp_path, tokenizer_dir, toy_data):
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium): the UI cannot be opened headless")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev install has it)")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["-m", "hparams_search=head_lr", "model=tiny", f"model.tokenizer={tokenizer_dir}", "data=csv",
            f"data.train={toy_data['train']}", "data.validation=null", "cv.folds=2", "hydra.sweeper.n_trials=3",
            f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", "train.epochs=1", "train.progress=false",
            f"tracking.uri={uri}", "tracking.experiment=ui", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"cache.dir={tmp_path / 'cache'}"]
    subprocess.run([sys.executable, "-m", "runner", *args], cwd=ROOT, check=True, capture_output=True, timeout=600,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("ui")
    [parent] = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'sweep'")
    trials = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) == 3
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "-h", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
    try:
        wait_for(f"http://127.0.0.1:{port}/health")
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{base}/runs")
            page.get_by_text(parent.info.run_name).first.wait_for(timeout=60000)
            trial_name = trials[0].info.run_name
            assert page.inner_text("body").count(trial_name) == 0  # nested: hidden until the parent opens
            page.locator("[role=row]", has_text=parent.info.run_name).locator("button").first.click()
            page.get_by_text(trial_name).first.wait_for(timeout=30000)
            assert page.inner_text("body").count(trial_name) == 3
            page.goto(f"{base}/runs/{parent.info.run_id}/artifacts")
            page.get_by_text("report", exact=True).first.wait_for(timeout=60000)
            page.get_by_text("report", exact=True).first.click()
            page.get_by_text("importances.png").first.wait_for(timeout=30000)
            page.get_by_text("trials.png").first.click()
            page.locator("img[src^='data:image/png']").first.wait_for(timeout=30000)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
