"""Sweeps as a user runs them (subprocesses): grid and Optuna searches, failures, resume, MLflow hierarchy."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import optuna
import pandas as pd
import pytest

from tests.conftest import ROOT


@pytest.fixture
def sweep(tmp_path, tokenizer_dir, toy_data):
    """Run ``python -m runner -m ...`` on the tiny model and toy data, with everything under tmp_path."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def launch(*overrides: str, name: str = "sweep", expect_ok: bool = True, env: dict | None = None):
        args = [
            "-m", "model=tiny", f"model.tokenizer={tokenizer_dir}", "data=csv", f"data.train={toy_data['train']}",
            f"data.validation={toy_data['validation']}", "hardware=cpu", "precision=fp32", "train.epochs=1",
            "train.batch_size=16", "train.progress=false", f"tracking.uri={uri}", "tracking.experiment=test",
            f"hydra.sweep.dir={tmp_path / name}", f"cache.dir={tmp_path / 'cache'}", *overrides,
        ]
        out = subprocess.run([sys.executable, "-m", "runner", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        if expect_ok:
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        return out

    launch.uri = uri
    launch.dir = tmp_path
    return launch


def runs_of(uri: str):
    client = mlflow.MlflowClient(tracking_uri=uri)
    return client, client.search_runs([client.get_experiment_by_name("test").experiment_id], max_results=1000)


def tree(uri: str):
    """(sweep parents, {parent id: children}, {child id: grandchildren})."""
    _, runs = runs_of(uri)
    kids: dict[str, list] = {}
    for r in runs:
        kids.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    return parents, kids


def test_grid_sweep_is_one_parent_with_a_child_per_job_and_a_summary(sweep):
    sweep("mode=head_only,full", "pooling=mean,cls")
    parents, kids = tree(sweep.uri)
    [parent] = parents
    assert parent.info.status == "FINISHED"
    jobs = kids[parent.info.run_id]
    assert len(jobs) == 4 and all(j.info.status == "FINISHED" for j in jobs)
    assert {(j.data.tags["mode"], j.data.tags["pooling"]) for j in jobs} == {
        ("head_only", "mean"), ("head_only", "cls"), ("full", "mean"), ("full", "cls")}
    summary = pd.read_csv(sweep.dir / "sweep" / "summary.csv")
    assert len(summary) == 4 and summary["value"].is_monotonic_decreasing
    assert summary["value"].tolist() == pytest.approx(sorted(j.data.metrics["val/accuracy"] for j in jobs)[::-1])
    client, _ = runs_of(sweep.uri)
    assert "summary.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow  # the default suite stays under 10 minutes on 2 cores
def test_a_failed_grid_job_is_failed_and_the_others_keep_their_results(sweep):
    out = sweep("train.lr=1e-3,-1,1e30", "train.max_grad_norm=0", "train.log_every=1", expect_ok=False)
    assert out.returncode != 0  # Hydra reports the failure after every job has run
    printed = out.stdout + out.stderr
    assert "job 1 failed: train.lr=-1.0 must be a positive number (traceback in" in printed
    assert "Traceback" not in printed  # one line per failed job; the traceback is in the job's runner.log
    assert "Traceback" in (sweep.dir / "sweep" / "1" / "runner.log").read_text()
    parents, kids = tree(sweep.uri)
    jobs = {j.data.tags["job_num"]: j for j in kids[parents[0].info.run_id]}
    assert jobs["0"].info.status == "FINISHED"
    assert jobs["1"].info.status == "FAILED" and "train.lr=-1.0 must be a positive number" in jobs["1"].data.tags["error"]
    assert jobs["2"].info.status == "FAILED"  # NaN loss: TrainingDiverged inside the job's own run
    summary = pd.read_csv(sweep.dir / "sweep" / "summary.csv")
    assert summary["status"].tolist() == ["FINISHED", "FAILED", "FAILED"]
    assert summary["value"].iloc[0] == pytest.approx(jobs["0"].data.metrics["val/accuracy"])


def optuna_args(storage: str, n_trials: int, *extra: str) -> list[str]:
    return ["hparams_search=head_lr", "cv.folds=2", f"hydra.sweeper.n_trials={n_trials}",
            f"hydra.sweeper.storage={storage}", *extra]


def test_optuna_search_sweep_trials_folds_and_resume(sweep):
    storage = f"sqlite:///{sweep.dir / 'optuna.db'}"
    sweep(*optuna_args(storage, 2, "tracking.pictures=all"), name="first")  # trial and fold pictures too, when asked
    study = optuna.load_study(study_name="test-head_lr", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]

    parents, kids = tree(sweep.uri)
    [parent] = parents
    trials = kids[parent.info.run_id]
    assert len(trials) == 2
    for trial in trials:
        folds = kids[trial.info.run_id]
        assert sorted(f.data.tags["fold"] for f in folds) == ["0", "1"]
        assert trial.data.metrics["cv/val/accuracy_mean"] == pytest.approx(
            sum(f.data.metrics["val/accuracy"] for f in folds) / 2)
    values = sorted(t.value for t in study.trials)
    assert values == pytest.approx(sorted(t.data.metrics["cv/val/accuracy_mean"] for t in trials))
    assert (sweep.dir / "first" / "optimization_results.yaml").exists()
    assert len(pd.read_csv(sweep.dir / "first" / "trials.csv")) == 2
    client, _ = runs_of(sweep.uri)  # tracking.log_model=auto: the pyfunc model of the best trial only
    with_model = [t for t in trials if client.list_artifacts(t.info.run_id, "model")]
    best = max(t.data.metrics["cv/val/accuracy_mean"] for t in trials)
    assert len(with_model) == 1 and with_model[0].data.metrics["cv/val/accuracy_mean"] == best
    check_reports(sweep.uri, sweep.dir / "first", parent, trials, kids)

    # a trial left RUNNING by a worker that died before its first heartbeat (in Optuna and MLflow), then the
    # same command, target 3 trials: the trial is found stale after 2 heartbeat intervals
    dead = study.ask()
    dead.set_user_attr("job_dir", str(sweep.dir / "gone" / "9"))
    client, _ = runs_of(sweep.uri)
    killed = client.create_run(parent.info.experiment_id, run_name="killed-trial",
                               tags={"mlflow.parentRunId": parent.info.run_id, "output_dir": str(sweep.dir / "gone" / "9")})
    sweep(*optuna_args(storage, 3, "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=5"), name="second")
    trials = optuna.load_study(study_name="test-head_lr", storage=storage).trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1 and "RUNNING" not in states
    lrs = [t.params["train.head_lr"] for t in trials if t.state.name == "COMPLETE"]
    assert len(set(lrs)) == 3  # the resumed search drew a new point, not the first trial's again
    parents, kids = tree(sweep.uri)
    children = kids[parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 4  # one study, one parent: 3 trials + the killed one
    assert parents[0].info.status == "FINISHED"
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    new = sweep.dir / "second" / str(max(t.number for t in trials))  # tracking.pictures=auto: none per trial
    assert (new / "metrics.json").exists() and not (new / "report").exists()
    assert not list(new.glob("folds/fold-*/report")) and (sweep.dir / "second" / "report" / "trials.png").exists()


@pytest.mark.slow  # the default suite stays under 10 minutes on 2 cores
def test_a_killed_trial_is_retried_first_from_its_own_checkpoint(sweep):
    import json

    storage = f"sqlite:///{sweep.dir / 'optuna.db'}"
    # 2 folds of 48 rows, batch 16: 3 steps an epoch; SIGKILL at step 5 of fold 0, checkpoint at step 4
    args = optuna_args(storage, 2, "mode=full", "train.epochs=2", "train.checkpoint_every=2",
                       "train.deterministic=true",  # full: folds one by one, each checkpointed
                       "hydra.sweeper.pruner=null")  # both trials to their end (retry with pruning: the next test)
    killed = sweep(*args, name="first", expect_ok=False, env={"RUNNER_CRASH_AT": "step:5"})
    assert killed.returncode == -9
    [trial] = optuna.load_study(study_name="test-head_lr", storage=storage).trials
    assert trial.state.name == "RUNNING" and trial.user_attrs["job_dir"] == str(sweep.dir / "first" / "0")
    killed_run = json.loads((sweep.dir / "first" / "0" / "mlflow_run.json").read_text())["run_id"]

    again = sweep(*args, name="second")
    log = again.stdout + again.stderr
    assert "retries an interrupted trial from its checkpoints in" in log
    assert "resuming from" in log and "fold-0/checkpoints/step-00000004" in log
    trials = optuna.load_study(study_name="test-head_lr", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params == trials[0].params  # the retry is the same trial, continued
    # the retry is trial 1, so job 1 (job numbers are trial numbers: unique across workers)
    assert json.loads((sweep.dir / "second" / "1" / "mlflow_run.json").read_text())["run_id"] == killed_run
    client, _ = runs_of(sweep.uri)
    assert client.get_run(killed_run).info.status == "FINISHED"


@pytest.mark.slow  # the default suite stays under 10 minutes on 2 cores
def test_a_trial_killed_between_folds_resumes_and_can_still_be_pruned(sweep):
    """After one complete trial, every trial is pruned after its second fold (a threshold no accuracy reaches,
    warm-up 1): the worker is killed between fold 0 and fold 1; the rerun retries the trial, reuses fold 0,
    trains fold 1 and prunes it there; a further run launches nothing (a PRUNED trial is done)."""
    import json

    storage = f"sqlite:///{sweep.dir / 'optuna.db'}"
    common = ["hparams_search=head_lr", "mode=full", "cv.folds=3", f"hydra.sweeper.storage={storage}"]
    sweep(*common, "hydra.sweeper.n_trials=1", "hydra.sweeper.pruner=null", name="first")
    args = [*common, "hydra.sweeper.n_trials=2",
            "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, lower: 1.1, n_warmup_steps: 1}"]
    killed = sweep(*args, name="second", expect_ok=False, env={"RUNNER_CRASH_AT": "fold:0"})
    assert killed.returncode == -9
    trial = optuna.load_study(study_name="test-head_lr", storage=storage).trials[1]
    assert trial.state.name == "RUNNING" and list(trial.intermediate_values) == [0]
    assert (sweep.dir / "second" / "1" / "folds" / "fold-0" / "result.json").exists()

    again = sweep(*args, name="third")
    log = again.stdout + again.stderr
    assert "retries an interrupted trial" in log and "fold-0 (1 of 3) finished before this run was resumed" in log
    trials = optuna.load_study(study_name="test-head_lr", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "PRUNED"] and trials[2].params == trials[1].params
    assert sorted(trials[2].intermediate_values) == [0, 1] and trials[2].user_attrs["pruned_at"] == 1
    assert json.loads((sweep.dir / "third" / "2" / "pruned.json").read_text())["pruned_at"] == 1

    fourth = sweep(*args, name="fourth")
    assert "Launching" not in fourth.stdout + fourth.stderr
    assert len(optuna.load_study(study_name="test-head_lr", storage=storage).trials) == 3


@pytest.mark.slow  # the default suite stays under 10 minutes on 2 cores (test_reuse, test_features cover sharing)
def test_a_head_only_search_encodes_each_text_once_in_the_whole_sweep(sweep, toy_data):
    storage = f"sqlite:///{sweep.dir / 'optuna.db'}"
    sweep(*optuna_args(storage, 3), name="cached")  # head_lr: head lr, dropout and pooling (mean, cls, max)
    parents, kids = tree(sweep.uri)
    trials = kids[parents[0].info.run_id]
    misses = sorted(t.data.metrics["cache/misses"] for t in trials)
    texts = len(set(pd.read_csv(toy_data["train"])["text"]))
    assert misses == [0, 0, texts]  # the first trial encodes every text; the others read them all
    assert sorted(t.data.metrics["cache/hits"] for t in trials) == [0, texts, texts]


FAILING_SEARCH = """# @package _global_
defaults:
  - override /mode: head_only
  - override /hydra/sweeper: runner_optuna
  - override /hydra/sweeper/sampler: random
hydra:
  sweeper:
    sampler:
      seed: 1
    study_name: failing
    storage: STORAGE
    direction: maximize
    n_trials: 4
    n_jobs: 1
    max_failure_rate: 0.5
    params:
      train.head_lr: choice(-1.0, 0.001, 0.01)
"""


@pytest.mark.slow  # the default suite stays under 10 minutes on 2 cores
def test_a_failing_trial_is_recorded_and_the_search_goes_on(sweep):
    """A search space with an invalid value: trials that draw it fail, the search completes the others."""
    storage = f"sqlite:///{sweep.dir / 'optuna.db'}"
    (sweep.dir / "conf" / "hparams_search").mkdir(parents=True)
    (sweep.dir / "conf" / "hparams_search" / "failing.yaml").write_text(FAILING_SEARCH.replace("STORAGE", storage))
    sweep(f"hydra.searchpath=[file://{sweep.dir / 'conf'}]", "hparams_search=failing")
    trials = optuna.load_study(study_name="failing", storage=storage).trials
    assert [t.state.name for t in trials].count("COMPLETE") == 4  # n_trials counts COMPLETE trials
    states = {(t.params["train.head_lr"] > 0, t.state.name) for t in trials}
    assert states == {(False, "FAIL"), (True, "COMPLETE")}  # seed 1 draws -1.0 for trial 2
    parents, kids = tree(sweep.uri)
    statuses = sorted(j.info.status for j in kids[parents[0].info.run_id])
    assert statuses == sorted("FAILED" if t.state.name == "FAIL" else "FINISHED" for t in trials)


@pytest.mark.slow  # the default suite stays under 10 minutes on 2 cores
def test_parallel_trials_with_joblib_share_one_fresh_store(sweep):
    storage = f"sqlite:///{sweep.dir / 'optuna.db'}"
    out = sweep(*optuna_args(storage, 4, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"))
    assert "is launching 2 jobs" in out.stdout + out.stderr  # two trials at a time
    trials = optuna.load_study(study_name="test-head_lr", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    parents, kids = tree(sweep.uri)
    trial_runs = kids[parents[0].info.run_id]
    assert len(trial_runs) == 4 and all(len(kids[t.info.run_id]) == 2 for t in trial_runs)


def picture(path) -> None:
    """A real PNG with something drawn on it (not a blank canvas)."""
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image[..., :3].std() > 0.05, path


def check_reports(uri, sweep_dir, parent, trials, kids) -> None:
    """The k-fold sweep's pictures: in the sweep, trial and fold folders, and as artifacts of their runs."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    listed = lambda run_id: {f.path for f in client.list_artifacts(run_id, "report")}  # noqa: E731
    for name in ("trials.png", "importances.png", "report.md"):
        assert (sweep_dir / "report" / name).exists()
    picture(sweep_dir / "report" / "trials.png")
    assert {"report/trials.png", "report/importances.png"} <= listed(parent.info.run_id)
    for trial in trials:
        folder = sweep_dir / trial.data.tags["job_num"]
        picture(folder / "report" / "folds.png")
        assert "report/folds.png" in listed(trial.info.run_id)
        for fold in kids[trial.info.run_id]:
            fold_dir = folder / "folds" / f"fold-{fold.data.tags['fold']}" / "report"
            picture(fold_dir / "curves.png")
            picture(fold_dir / "confusion-val.png")
            assert {"report/curves.png", "report/confusion-val.png"} <= listed(fold.info.run_id)



@pytest.mark.slow
def test_a_search_whose_every_trial_fails_stops_even_at_max_failure_rate_1(sweep):
    """n_trials counts COMPLETE trials; with max_failure_rate=1.0 a search that can never complete one would
    retry forever: it stops once as many trials as n_trials have failed."""
    storage = f"sqlite:///{sweep.dir / 'optuna.db'}"
    (sweep.dir / "conf" / "hparams_search").mkdir(parents=True)
    search = FAILING_SEARCH.replace("STORAGE", storage).replace("choice(-1.0, 0.001, 0.01)", "choice(-1.0, -2.0)")
    (sweep.dir / "conf" / "hparams_search" / "failing.yaml").write_text(search.replace("max_failure_rate: 0.5",
                                                                                        "max_failure_rate: 1.0"))
    out = sweep(f"hydra.searchpath=[file://{sweep.dir / 'conf'}]", "hparams_search=failing", expect_ok=False)
    assert out.returncode == 1 and "4 of 4 trials failed" in out.stdout + out.stderr
    assert [t.state.name for t in optuna.load_study(study_name="failing", storage=storage).trials] == ["FAIL"] * 4
