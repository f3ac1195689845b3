"""Hydra launchers beyond one process: submitit (local and SLURM) composed, a local 2-job sweep run, and the
SLURM pre-emption path (SIGUSR2: checkpoint, then submitit's requeue)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, compose_config


@pytest.mark.parametrize("launcher", ["slurm", "submitit_local", "joblib"])
def test_launchers_compose(launcher):
    cfg = compose_config([f"hydra/launcher={launcher}", "hparams_search=head_lr"], with_hydra=True)
    target = cfg.hydra.launcher._target_
    assert {"slurm": "SlurmLauncher", "submitit_local": "LocalLauncher", "joblib": "JoblibLauncher"}[launcher] in target
    if launcher == "slurm":  # the documented options
        assert cfg.hydra.launcher.signal_delay_s == 120 and cfg.hydra.launcher.max_num_timeout == 3
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 240


def test_a_pre_emption_signal_checkpoints_then_reaches_the_launchers_handler():
    """submitit requeues a SLURM job from its SIGUSR2 handler: the runner takes the signal first (finish the
    step, checkpoint), and hands it on when the job ends."""
    from runner.signals import StopRequests

    calls = []
    earlier = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        stop = StopRequests()
        stop.install()
        with stop.deferred():
            stop.handle(signal.SIGUSR2, None)  # inside training: only noted, the loop checkpoints and stops
        assert stop.received == signal.SIGUSR2 and calls == []
        stop.uninstall()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, earlier)


@pytest.mark.slow
def test_a_two_job_sweep_runs_on_submitit_local(tmp_path, tiny_overrides):
    import mlflow

    keep = [a for a in tiny_overrides if not a.startswith("output_dir=")]
    done = subprocess.run([sys.executable, "-m", "runner", "-m", "hydra/launcher=submitit_local", *keep,
                           "train.lr=1e-3,2e-3", "train.epochs=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "metrics.json").exists()
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))  # really run by submitit's executor
    uri = next(a for a in keep if a.startswith("tracking.uri=")).split("=", 1)[1]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"]


@pytest.mark.slow
def test_a_pre_empted_submitit_job_checkpoints_is_requeued_and_resumes(tmp_path, tiny_overrides):
    """SIGUSR2 (what SLURM sends before pre-emption or the time limit) to a running submitit job: the runner
    checkpoints, submitit requeues the job, and the requeued job resumes from that checkpoint to the end,
    in the same folder and the same MLflow run."""
    import time

    import mlflow

    keep = [a for a in tiny_overrides if not a.startswith(("output_dir=", "train.epochs="))]
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "runner", "-m", "hydra/launcher=submitit_local", *keep,
                             "train.max_steps=600", "train.checkpoint_every=20", f"hydra.sweep.dir={sweep}"], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 240
    while not list((sweep / "0" / "checkpoints").glob("step-*")) and time.time() < deadline:
        time.sleep(0.3)
    job = subprocess.run(["pgrep", "-f", f"submitit.core._submit {sweep}"], capture_output=True, text=True).stdout.split()
    assert job, "no submitit job process"
    os.kill(int(job[0]), signal.SIGUSR2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "SIGUSR2 received: stopped at the end of the optimizer step, with a checkpoint" in logs
    assert "Requeued job" in logs and "resuming from" in logs
    assert (sweep / "0" / "metrics.json").exists()
    uri = next(a for a in keep if a.startswith("tracking.uri=")).split("=", 1)[1]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id],
                              filter_string="tags.job_num = '0'")
    assert [r.info.status for r in runs] == ["FINISHED"]  # the requeued job went on with the same run
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 600
