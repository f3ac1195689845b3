"""Pruning: which trial each pruner stops at which step, on a deterministic fake objective (the values a job
would report), through the same storage and Trial calls a job makes; then a real pruned search end to end."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from runner.errors import RunnerError
from runner.pruning import Pruning, TrialPruned, make_pruner, prune_warmup

optuna.logging.set_verbosity(optuna.logging.WARNING)


def search(tmp_path: Path, spec: dict, curves: list[list[float]], unit: str = "fold",
           warmup: dict | None = None) -> list[int | None]:
    """Run ``curves`` (trial -> value per step) as trials of one study: for each, the step it was pruned at
    (None: it completed). Values are maximized, like accuracy."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize", pruner=make_pruner(spec))
    outcome = []
    for curve in curves:
        trial = study.ask()
        job = Pruning(storage, "s", spec, trial.number, warmup=prune_warmup(warmup))
        try:
            for i, value in enumerate(curve):
                step = i if unit == "fold" else 10 * (i + 1)  # a single split reports optimizer steps
                job.report(step, value, unit, units=(i + 1, len(curve)))
        except TrialPruned as pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            outcome.append(pruned.step)
            continue
        study.tell(trial, sum(curve) / len(curve))
        outcome.append(None)
    return outcome


GOOD, FAIR, BAD = [0.8] * 5, [0.7] * 5, [0.4] * 5


@pytest.mark.parametrize("spec,curves,expected", [
    ({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2}, [GOOD, FAIR, BAD, GOOD], [None, None, 0, None]),
    ({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2, "n_warmup_steps": 2},
     [GOOD, FAIR, BAD], [None, None, 2]),
    ({"_target_": "optuna.pruners.PercentilePruner", "percentile": 75.0, "n_startup_trials": 2},
     [GOOD, FAIR, [0.75] * 5, BAD], [None, None, None, 0]),
    ({"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5}, [GOOD, BAD], [None, 0]),
    ({"_target_": "optuna.pruners.PatientPruner", "patience": 1,
      "wrapped_pruner": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 1}},
     [GOOD, [0.4, 0.3, 0.2, 0.1, 0.0]], [None, 2]),
    ({"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 1, "reduction_factor": 2},
     [GOOD, FAIR, BAD, GOOD], [None, 1, 1, None]),  # the first rung is at step 1 (min_resource)
    ({"_target_": "optuna.pruners.NopPruner"}, [GOOD, BAD], [None, None]),
])
def test_which_trial_each_pruner_stops_and_when(tmp_path, spec, curves, expected):
    assert search(tmp_path, spec, curves) == expected


@pytest.mark.parametrize("unit,warmup,expected", [
    ("fold", None, 0), ("fold", {"folds": 2}, 1), ("step", {"folds": 1, "evaluations": 2}, 20),
    ("step", {"evaluations": 3}, 30), ("fold", {"evaluations": 3}, 0)])
def test_prune_after_counts_folds_or_evaluations(tmp_path, unit, warmup, expected):
    """One preset serves k-fold and single-split searches: its warm-up is in reports of the trial's own unit."""
    median = {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2}
    assert search(tmp_path, median, [GOOD, FAIR, BAD], unit, warmup) == [None, None, expected]


@pytest.mark.parametrize("given", [{"folds": 0}, {"epochs": 2}, {"evaluations": 1.5}, {"folds": True}])
def test_a_bad_prune_after_is_one_line(given):
    with pytest.raises(RunnerError, match=r"hydra.sweeper.prune_after=.*give folds and/or evaluations"):
        prune_warmup(given)


def test_wilcoxon_compares_fold_by_fold(tmp_path):
    """Wilcoxon gets each fold's own value: a trial worse on every fold than the best is stopped once the
    signed-rank test is sure; one that is better on some folds and worse on others is not."""
    best = [0.80, 0.82, 0.78, 0.81, 0.79, 0.83, 0.80, 0.77, 0.82, 0.80]
    worse = [v - 0.1 for v in best]
    mixed = [v + (0.02 if i % 2 else -0.02) for i, v in enumerate(best)]
    spec = {"_target_": "optuna.pruners.WilcoxonPruner", "p_threshold": 0.1, "n_startup_steps": 2}
    outcome = search(tmp_path, spec, [best, mixed, worse])
    assert outcome[:2] == [None, None]
    assert outcome[2] is not None and outcome[2] >= 2


@pytest.mark.parametrize("target,expected", [("MedianPruner", {0: 0.9, 1: 0.65, 2: 0.9 / 3 + 0.8 / 3}),
                                             ("WilcoxonPruner", {0: 0.9, 1: 0.4, 2: 0.4})])
def test_fold_values_are_reported_as_each_pruner_expects(tmp_path, target, expected):
    """Step pruners see the running mean over the folds so far, Wilcoxon each fold's own value."""
    search(tmp_path, {"_target_": f"optuna.pruners.{target}"}, [[0.9, 0.4, 0.4]])
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.trials[0].intermediate_values == pytest.approx(expected)


@pytest.mark.parametrize("spec,message", [
    ({"_target_": "optuna.pruners.NoSuchPruner"}, "is not a pruner this runner offers"),
    ({"_target_": "os.system", "command": "true"}, "is not a pruner this runner offers"),
    ({"_target_": "optuna.pruners.MedianPruner", "warmup": 1}, "MedianPruner has no argument warmup"),
    ({"_target_": "optuna.pruners.PatientPruner", "patience": 1, "wrapped_pruner": {"_target_": "x"}},
     "hydra.sweeper.pruner.wrapped_pruner: _target_='x'"),
])
def test_a_bad_pruner_is_one_line(spec, message):
    with pytest.raises(RunnerError, match=message.replace("(", r"\(").replace(".", r"\.")):
        make_pruner(spec)


# ------------------------------------------------------------------------------------ a real pruned search


def cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    from tests.conftest import make_sentences, write_csv

    if not (tmp_path / "train.csv").exists():
        write_csv(tmp_path / "train.csv", make_sentences(90, 0, labels=("pos", "neg", "meh")))
    return subprocess.run(
        # mode=full: folds train one after another (head_only's cached folds train together: nothing to prune)
        [sys.executable, "-m", "runner", "-m", "hparams_search=head_lr", "mode=full", "model=tiny", "data=csv",
         "data.train=train.csv",
         "cv.folds=3", "train.epochs=1", "train.progress=false", "hydra.sweeper.study_name=pruned",
         f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=pruning", *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_a_pruned_trial_is_a_first_class_outcome(tmp_path):
    # a ThresholdPruner with an unreachable floor prunes every trial after its first fold, except that the
    # first trials complete (n_warmup_steps): a deterministic search to check what a pruned trial leaves
    pruner = "hydra.sweeper.pruner={_target_: optuna.pruners.PercentilePruner, percentile: 99.0, n_startup_trials: 2}"
    done = cli(tmp_path, "hydra.sweeper.n_trials=5", pruner)
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="pruned", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") >= 2 and "PRUNED" in states and len(states) == 5
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    for trial in pruned:
        folder = tmp_path / "sweep" / str(trial.number)
        record = json.loads((folder / "pruned.json").read_text())
        assert record["pruned_at"] == trial.user_attrs["pruned_at"] == max(trial.intermediate_values)
        finished_folds = sorted(p.parent.name for p in folder.glob("folds/fold-*/result.json"))
        assert finished_folds == [f"fold-{i}" for i in range(record["pruned_at"] + 1)]  # what it ran is kept
        assert not (folder / "metrics.json").exists()
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        rows = con.execute("select r.run_uuid, r.status, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
                           "where t.key = 'pruned_at'").fetchall()
        assert len(rows) == len(pruned) and all(status == "FINISHED" for _, status, _ in rows)
        for run_id, _, at in rows:
            nested = con.execute("select count(*) from tags where key = 'mlflow.parentRunId' and value = ?",
                                 (run_id,)).fetchone()[0]
            assert nested == int(at) + 1  # the folds it ran, nested under it
        metrics = dict(con.execute("select key, value from latest_metrics where key like 'sweep/%'").fetchall())
    assert metrics["sweep/trials_pruned"] == len(pruned)
    assert metrics["sweep/trainings_saved"] == sum(3 - (t.user_attrs["pruned_at"] + 1) for t in pruned)
    summary = (tmp_path / "sweep" / "summary.csv").read_text()
    assert summary.count(",PRUNED,") == len(pruned)
    assert (tmp_path / "sweep" / "report" / "trials.png").exists()

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert all(sorted(t.intermediate_values) == [0, 1, 2] for t in complete)  # every fold reported
    assert metrics["sweep/trainings_run"] == 3 * len(complete) + sum(t.user_attrs["pruned_at"] + 1 for t in pruned)
    again = cli(tmp_path, "hydra.sweeper.n_trials=5", pruner)  # the same command: the study is done
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Launching" not in again.stdout + again.stderr  # no trial runs again, pruned ones included
    assert len(optuna.load_study(study_name="pruned", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 5


def test_a_pruner_with_two_objectives_is_refused_before_any_trial(tmp_path):
    done = cli(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=[maximize,minimize]",
               "hydra.sweeper.pruner={_target_: optuna.pruners.MedianPruner}")
    assert done.returncode == 1
    assert "Optuna prunes single-objective searches only" in done.stdout + done.stderr
    assert not list((tmp_path / "sweep").glob("0"))


# ------------------------------------------------------------------------------------------ Pareto searches


def dominated(a: list[float], b: list[float], maximize: list[bool]) -> bool:
    """Whether ``a`` is dominated by ``b``: no worse in every objective, better in one."""
    better = [(y > x) if up else (y < x) for x, y, up in zip(a, b, maximize)]
    worse = [(y < x) if up else (y > x) for x, y, up in zip(a, b, maximize)]
    return any(better) and not any(worse)


@pytest.mark.slow  # a 6-trial search; the front's logic is checked in the default suite by the unit tests above
def test_a_two_objective_search_marks_its_pareto_front(tmp_path):
    from tests.conftest import make_sentences, write_csv

    write_csv(tmp_path / "train.csv", make_sentences(90, 0, labels=("pos", "neg", "meh")))
    done = subprocess.run(
        [sys.executable, "-m", "runner", "-m", "hparams_search=head_pareto", "model=tiny", "data=csv",
         "data.train=train.csv", "cv.folds=2", "train.epochs=1", "train.progress=false", "hydra.sweeper.n_trials=6",
         f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=pareto"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="pareto-head_pareto", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6 and all(len(t.values) == 2 and t.values[1] > 0 for t in complete)
    brute = sorted(t.number for t in complete
                   if not any(dominated(t.values, o.values, [True, False]) for o in complete if o is not t))
    assert brute and sorted(t.number for t in study.best_trials) == brute
    import pandas as pd

    summary = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert sorted(summary.loc[summary["pareto"], "job"]) == brute
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        tagged = dict(con.execute("select key, value from tags where key in ('pareto_trials', 'objectives')").fetchall())
        pareto_runs = con.execute("select count(*) from tags where key = 'pareto' and value = 'true'").fetchone()[0]
        costs = [r[0] for r in con.execute("select distinct key from latest_metrics where key like 'model/%'")]
    assert tagged == {"pareto_trials": ",".join(map(str, brute)), "objectives": "val/accuracy,model/latency_ms"}
    assert pareto_runs == len(brute)
    assert {"model/latency_ms", "model/latency_ms_batch32", "model/parameters", "model/size_mb"} <= set(costs)
    assert (tmp_path / "sweep" / "report" / "pareto.png").stat().st_size > 10_000


def test_objectives_and_directions_must_pair(make_run):
    with pytest.raises(RunnerError, match="must name as many distinct metrics as directions"):
        make_run("objective.metrics=[val/accuracy,model/latency_ms]", "objective.directions=[maximize]")
    run = make_run("objective.metrics=[val/f1_macro,model/latency_ms]", "objective.directions=[maximize,minimize]")
    assert (run.cfg.objective.metric, run.cfg.objective.direction.value) == ("val/f1_macro", "maximize")


def test_the_pareto_front_is_what_no_other_trial_dominates():
    """The front the sweeper reports (Optuna's best_trials) against a brute-force computation."""
    import random

    study = optuna.create_study(directions=["maximize", "minimize"])
    rng = random.Random(0)
    for _ in range(40):
        trial = study.ask()
        study.tell(trial, [round(rng.random(), 2), round(rng.random(), 2)])
    complete = study.trials
    brute = sorted(t.number for t in complete
                   if not any(dominated(t.values, o.values, [True, False]) for o in complete if o is not t))
    assert len(brute) >= 2 and sorted(t.number for t in study.best_trials) == brute
