"""Runs that survive: a run killed anywhere and resumed is the run that would have happened.

The matrix kills in-process at exact points (a patched crash point raises instead of SIGKILL, so the
runner's own cleanup is skipped just as a kill skips it) and compares the resumed run with an
uninterrupted one: final weights bit for bit, and the MLflow metric history of the one continued run.
Real SIGKILL and SIGTERM in a subprocess are tested separately below.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from runner import artifact, checkpoint, job, train
from runner.errors import RunnerError
from tests.conftest import ROOT, write_triplets


class SimulatedKill(BaseException):
    """Raised at a crash point: like SIGKILL, nothing in the runner catches it."""


KILLS = {"at step 1": "step:1", "mid-epoch": "step:5", "at an epoch boundary": "step:7",
         "while writing a checkpoint": "checkpoint:8"}


def loss_overrides(loss: str, mode: str, tmp_path: Path) -> list[str]:
    if loss == "ce":
        return []  # the toy single-text task, cross-entropy
    files = {s: write_triplets(tmp_path / f"{s}.jsonl", n, seed) for s, n, seed in (("train", 96, 0), ("dev", 24, 1))}
    # a frozen encoder without a head trains the weights of a weighted layer pooling
    return ["data.type=triplet", f"data.train={files['train']}", f"data.validation={files['dev']}", "data.test=null",
            "loss=mnrl", "objective.metric=val/mrr_at_10", *(["pooling=weighted", "pooling.layers=[-3,-2,-1]"] if mode == "head_only" else [])]


def overrides(mode: str, loss: str, tmp_path: Path, name: str) -> list[str]:
    # 96 rows / batch 16 = 6 steps an epoch, 12 in all; checkpoints at steps 4, 6 (epoch end), 8 and 12
    return [f"mode={mode}", *loss_overrides(loss, mode, tmp_path), "train.epochs=2", "train.checkpoint_every=4",
            "train.log_every=3", "train.deterministic=true", "train.lr=5e-3", "mode.dropout=0.2" if mode == "peft" else
            "train.head_dropout=0.2", f"output_dir={tmp_path / name}", f"tracking.experiment={name}"]


def crash_at(monkeypatch, point: str) -> None:
    def crash(kind: str, step: int) -> None:
        if f"{kind}:{step}" == point:
            raise SimulatedKill(point)
    monkeypatch.setattr(train, "crash_point", crash)
    monkeypatch.setattr(checkpoint, "crash_point", crash)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    model, _, _ = artifact.load_model(out / "model")
    return model.state_dict()


def history(uri: str, experiment: str) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """(run id, metric -> [(step, value)]) of the experiment's one job run; throughput and time are left out."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, "a resumed run continues its MLflow run instead of opening another"
    run = runs[0]
    assert run.info.status == "FINISHED"
    keys = [k for k in run.data.metrics if k not in ("train/samples_per_s", "train/seconds") and not k.startswith("cache/")]
    return run.info.run_id, {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
                             for k in keys}


BASELINES: dict[tuple[str, str], tuple[dict, dict]] = {}


def kill_cases() -> list:
    """Every mode and loss killed at step 1, and every kill point for full fine-tuning with cross-entropy, in the
    default suite; the other combinations in ``nox -s slow`` (the default suite keeps under 10 minutes)."""
    cases = []
    for mode in ("head_only", "full", "peft"):
        for loss in ("ce", "mnrl"):
            for kill in KILLS:
                default = kill == "at step 1" or (mode, loss) == ("full", "ce")
                cases.append(pytest.param(mode, loss, kill, marks=() if default else pytest.mark.slow))
    return cases


@pytest.mark.parametrize(("mode", "loss", "kill"), kill_cases())
def test_a_killed_run_resumes_to_the_same_weights_and_history(make_run, tmp_path, monkeypatch, mode, loss, kill):
    uri = make_run().cfg.tracking.uri
    if (mode, loss) not in BASELINES:
        job.execute(make_run(*overrides(mode, loss, tmp_path, "whole")))
        BASELINES[mode, loss] = final_weights(tmp_path / "whole"), history(uri, "whole")[1]
    weights, metrics = BASELINES[mode, loss]

    args = overrides(mode, loss, tmp_path, "killed")
    crash_at(monkeypatch, KILLS[kill])
    with pytest.raises(SimulatedKill):
        job.execute(make_run(*args))
    monkeypatch.undo()
    assert not (tmp_path / "killed" / "metrics.json").exists()
    job.execute(make_run(*args))  # the same command again: train.resume=auto

    resumed = final_weights(tmp_path / "killed")
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights), "resumed weights differ from the whole run's"
    _, resumed_metrics = history(uri, "killed")
    assert resumed_metrics == metrics  # same steps, same values, nothing logged twice
    assert not (tmp_path / "killed" / "checkpoints").exists()  # a finished run keeps its model, not checkpoints


@pytest.mark.parametrize("extra", [
    ["train.early_stopping.patience=2", "train.eval_every=2", "train.epochs=4"],  # best weights, patience state
    ["train.grad_accum=2", "train.batch_size=8"],  # checkpoints between accumulated micro-batches
    ["train.warmup_ratio=0.3", "train.scheduler=cosine", "train.max_steps=10"],  # scheduler position, max_steps
], ids=["early-stopping", "grad-accum", "warmup-cosine-max-steps"])
def test_resume_is_exact_with_early_stopping_accumulation_and_schedules(make_run, tmp_path, monkeypatch, extra):
    job.execute(make_run(*overrides("full", "ce", tmp_path, "whole"), *extra))
    args = [*overrides("full", "ce", tmp_path, "killed"), *extra]
    crash_at(monkeypatch, "step:7")
    with pytest.raises(SimulatedKill):
        job.execute(make_run(*args))
    monkeypatch.undo()
    job.execute(make_run(*args))
    weights, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)
    uri = make_run().cfg.tracking.uri
    assert history(uri, "killed")[1] == history(uri, "whole")[1]
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    killed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert (killed["steps"], killed["best_step"], killed["metrics"]) == (whole["steps"], whole["best_step"], whole["metrics"])
    if "train.early_stopping.patience=2" in extra:  # it did stop early, on restored best weights
        assert whole["best_step"] < whole["steps"] < 24


def test_a_truncated_checkpoint_is_skipped_for_the_previous_one(make_run, tmp_path, monkeypatch, caplog):
    args = overrides("full", "ce", tmp_path, "run1")
    crash_at(monkeypatch, "step:9")
    with pytest.raises(SimulatedKill):
        job.execute(make_run(*args))
    monkeypatch.undo()
    folders = sorted((tmp_path / "run1" / "checkpoints").glob("step-*"))
    assert [f.name for f in folders] == ["step-00000006", "step-00000008"]  # keep_checkpoints=1 plus the best
    newest = folders[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    caplog.set_level("INFO", logger="runner")
    job.execute(make_run(*args))
    assert f"skipping checkpoint {folders[-1]}: model.safetensors does not match its hash" in caplog.text
    assert f"resuming from {folders[0]}: step 6, epoch 1, batch 0" in caplog.text


def test_a_changed_config_is_a_clear_error_on_resume(make_run, tmp_path, monkeypatch):
    args = overrides("full", "ce", tmp_path, "run1")
    crash_at(monkeypatch, "step:5")
    with pytest.raises(SimulatedKill):
        job.execute(make_run(*args))
    monkeypatch.undo()
    with pytest.raises(RunnerError, match=r"was written by a different config \(train.lr: 0.005 -> 0.001\)"):
        job.execute(make_run(*args, "train.lr=1e-3"))
    job.execute(make_run(*args, "train.progress=false", "train.checkpoint_every=2"))  # neutral keys resume


def test_a_finished_run_folder_is_an_error_unless_overwrite(make_run, tmp_path):
    args = ["train.epochs=1", f"output_dir={tmp_path / 'run1'}"]
    job.execute(make_run(*args))
    with pytest.raises(RunnerError, match="holds a finished run .metrics.json.: choose another hydra.run.dir, or add "
                                          "overwrite=true to replace it"):
        job.execute(make_run(*args))
    job.execute(make_run(*args, "overwrite=true"))


def test_a_killed_k_fold_job_reuses_finished_folds_and_resumes_the_current_one(make_run, tmp_path, monkeypatch, caplog):
    args = ["cv.folds=3", "train.epochs=2", "train.checkpoint_every=2", "train.deterministic=true",
            f"output_dir={tmp_path / 'cv'}", "tracking.experiment=cv"]
    # 96 rows: 64 train per fold = 4 steps an epoch, 8 a fold; global crash at fold 2's step 3
    calls = {"n": 0}

    def crash(kind, step):
        if kind == "step" and step == 3:
            calls["n"] += 1
            if calls["n"] == 2:
                raise SimulatedKill("fold 2")
    monkeypatch.setattr(train, "crash_point", crash)
    with pytest.raises(SimulatedKill):
        job.execute(make_run(*args))
    monkeypatch.undo()
    assert (tmp_path / "cv" / "folds" / "fold-0" / "result.json").exists()
    caplog.set_level("INFO", logger="runner")
    resumed = job.execute(make_run(*args))
    assert "fold-0 (1 of 3) finished before this run was resumed: reusing its metrics" in caplog.text
    assert "resuming from" in caplog.text
    whole = job.execute(make_run(*args, f"output_dir={tmp_path / 'cv2'}", "tracking.experiment=cv2"))
    assert resumed == whole
    client = mlflow.MlflowClient(tracking_uri=make_run().cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("cv").experiment_id])
    assert sorted(r.data.tags.get("fold", "job") for r in runs) == ["0", "1", "2", "job"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_no_pickle_anywhere_in_the_package():
    """Checkpoints and saved models are safetensors and JSON: nothing in the package unpickles."""
    offenders = []
    for path in (ROOT / "runner").rglob("*.py"):
        text = path.read_text()
        for word in ("import pickle", "pickle.load", "cloudpickle", "dill", "joblib.load"):
            if word in text:
                offenders.append(f"{path.name}: {word}")
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.name}: {line.strip()}")
    assert not offenders


# ------------------------------------------------------------------------------------ real signals


def cli(tmp_path: Path, *extra: str, env: dict | None = None, layout: str = "named") -> subprocess.Popen:
    from tests.conftest import make_sentences, write_csv

    train_csv = tmp_path / "train.csv"
    if not train_csv.exists():
        write_csv(train_csv, make_sentences(96, 0))
        write_csv(tmp_path / "dev.csv", make_sentences(32, 1))
    args = [sys.executable, "-m", "runner", "model=tiny", "data=csv", f"data.train={train_csv}",
            f"data.validation={tmp_path / 'dev.csv'}", "hardware=cpu", "precision=fp32", "train.progress=false",
            "train.deterministic=true", "train.epochs=2", "train.batch_size=16", "train.checkpoint_every=4",
            *([f"hydra.run.dir={tmp_path / 'run'}"] if layout == "named" else []),
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    return subprocess.Popen(args, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # the in-process resume matrix kills while writing a checkpoint too
def test_sigkill_while_writing_a_checkpoint_then_the_same_command_resumes(tmp_path):
    killed = cli(tmp_path, env={"RUNNER_CRASH_AT": "checkpoint:8"})
    out, _ = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, out
    assert list((tmp_path / "run" / "checkpoints").glob(".tmp-step-00000008-*"))  # the half-written one
    again = cli(tmp_path)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "was being written when the run stopped: ignoring it" in out
    assert "resuming from" in out and "step-00000006" in out
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")]
    assert steps == sorted(set(steps)) == [0, 6, 12]


def wait_until_training(proc: subprocess.Popen) -> list[str]:
    lines, deadline = [], time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 0:") or time.time() > deadline:
            break
    time.sleep(1.5)
    return lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)], ids=lambda s: s.name)
def test_a_signal_checkpoints_marks_the_run_killed_and_exits_128_plus_it(tmp_path, sig):
    proc = cli(tmp_path, "train.epochs=200")
    lines = wait_until_training(proc)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 128 + sig, out
    assert f"{sig.name} received: stopped at the end of the optimizer step, with a checkpoint" in out
    assert f"stopped by {sig.name} at step" in out and "to resume: python -m runner model=tiny" in out
    assert f"hydra.run.dir={tmp_path / 'run'}" in out.split("to resume:")[1]
    assert "Traceback" not in out
    assert list((tmp_path / "run" / "checkpoints").glob("step-*"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert run.info.status == "KILLED"
    assert json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"] == run.info.run_id


def test_a_second_signal_exits_at_once(monkeypatch, capfd):
    """Standard signals sent back to back merge into one in the kernel, so the handler is driven directly."""
    from runner.signals import StopRequests

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = StopRequests()
    with stop.deferred():  # inside the training loop
        stop.handle(signal.SIGTERM, None)
        assert stop.received == signal.SIGTERM and exits == []
        stop.handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]
    assert "second SIGINT: exiting now, without a checkpoint" in capfd.readouterr().err


def test_a_signal_outside_the_training_loop_stops_at_once():
    from runner.signals import Interrupted, StopRequests

    with pytest.raises(Interrupted, match="stopped by SIGINT outside training: nothing to checkpoint") as stop:
        StopRequests().handle(signal.SIGINT, None)
    assert stop.value.exit_code == 130


@pytest.mark.slow  # the default suite stays under 10 minutes on 2 cores
def test_three_runs_started_at_once_on_a_fresh_outputs_folder_all_finish(tmp_path):
    """The first runs on a new SQLite MLflow store take turns creating it (no 'duplicate column name')."""
    from tests.conftest import make_sentences, write_csv

    write_csv(tmp_path / "train.csv", make_sentences(48, 0))
    args = [sys.executable, "-m", "runner", "model=tiny", "data=csv", f"data.train={tmp_path / 'train.csv'}",
            "hardware=cpu", "precision=fp32", "train.progress=false", "train.epochs=1"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    assert len({r.data.tags["output_dir"] for r in runs}) == 3


@pytest.mark.slow
@pytest.mark.parametrize("kill", list(KILLS))
@pytest.mark.parametrize("loss", ["ce", "mnrl"])
@pytest.mark.parametrize("mode", ["head_only", "full", "peft"])
def test_a_sigkilled_process_resumes_to_the_same_weights_and_history(tmp_path, mode, loss, kill):
    """The matrix above with real SIGKILLs: each run is ``python -m runner`` in its own process."""
    args = [a for a in overrides(mode, loss, tmp_path, "unused") if not a.startswith(("output_dir", "tracking.exp"))]

    def run(name: str, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = cli(tmp_path, *args, f"hydra.run.dir={tmp_path / name}", f"tracking.experiment={name}",
                   f"cache.dir={tmp_path / name / 'cache'}", env=env)
        out, _ = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out)

    assert run("whole").returncode == 0
    killed = run("killed", {"RUNNER_CRASH_AT": KILLS[kill]})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    resumed = run("killed")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    weights, resumed_weights = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert all(torch.equal(resumed_weights[k], weights[k]) for k in weights) and weights.keys() == resumed_weights.keys()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert history(uri, "killed")[1] == history(uri, "whole")[1]


@pytest.mark.slow  # three processes of 40 epochs: the default suite stays under 10 minutes
def test_ctrl_c_in_the_default_layout_then_the_printed_command_finishes_the_same_run(tmp_path):
    """The default timestamped layout: the printed command (and the same command, through train.resume=auto)
    continue the interrupted folder and MLflow run, to the metrics of an uninterrupted run."""
    import re
    import shlex

    proc = cli(tmp_path, "train.epochs=40", "train.eval_every=60", layout="default")
    lines = wait_until_training(proc)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 130 and "SIGINT received" in out, out
    command = re.search(r"to resume: (python -m runner .*)$", out, re.M).group(1)
    [folder] = (tmp_path / "outputs" / "runs").glob("*/*")
    assert f"hydra.run.dir={folder}" in command
    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout
    assert [folder] == list((tmp_path / "outputs" / "runs").glob("*/*"))  # no second folder
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert run.info.status == "FINISHED"
    interrupted = json.loads((folder / "metrics.json").read_text())["metrics"]

    straight = cli(tmp_path, "train.epochs=40", "train.eval_every=60", f"hydra.run.dir={tmp_path / 'straight'}",
                   "tracking.enabled=false", layout="default")
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out
    uninterrupted = json.loads((tmp_path / "straight" / "metrics.json").read_text())["metrics"]
    assert interrupted == pytest.approx(uninterrupted, abs=1e-6)


@pytest.mark.slow  # three CLI processes; the default suite stays under 10 minutes
def test_the_same_command_continues_the_newest_unfinished_run_of_its_config(tmp_path):
    """train.resume=auto (the default) in the default layout: an interrupted run is picked up by the same
    command; a run of another config is not."""
    killed = cli(tmp_path, env={"RUNNER_CRASH_AT": "step:5"}, layout="default")
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    [folder] = (tmp_path / "outputs" / "runs").glob("*/*")
    other = cli(tmp_path, "train.lr=1e-3", "tracking.enabled=false", layout="default")
    out, _ = other.communicate(timeout=300)
    assert other.returncode == 0 and "continuing the unfinished run" not in out, out
    again = cli(tmp_path, layout="default")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert f"continuing the unfinished run of the same config in {folder}" in out and "resuming from" in out
    assert (folder / "metrics.json").exists()
    assert len(list((tmp_path / "outputs" / "runs").glob("*/*"))) == 2  # the other config's run and this one
