"""Several sweep workers on one study: three processes started at once run ``n_trials=12`` in total against
one PostgreSQL (or journal file) storage and one MLflow store; one is SIGKILLed mid-trial. Slow (minutes)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from tests.conftest import ROOT
from tests.test_mlflow_model import free_port

pytestmark = pytest.mark.slow


def postgres_bin(name: str) -> str:
    found = shutil.which(name) or next((str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if found is None:
        pytest.skip(f"PostgreSQL's {name} is not installed (apt install postgresql)")
    return found


@pytest.fixture
def postgres():
    """A PostgreSQL server on loopback for this test; initdb refuses root, so it runs as ``nobody`` then
    (in a folder of its own: pytest's temporary folders are private to their user)."""
    root = Path(tempfile.mkdtemp(prefix="runner-pg-"))
    os.chmod(root, 0o755)
    data = root / "data"
    data.mkdir()
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(data, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    port = free_port()
    run = lambda *args: subprocess.run([*as_user, *args], check=True, capture_output=True, cwd=root)  # noqa: E731
    run(postgres_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "runner")
    run(postgres_bin("pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w", "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
    yield f"postgresql+psycopg2://runner@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, postgres_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                   cwd=root)
    shutil.rmtree(root, ignore_errors=True)


def worker(tmp_path: Path, tokenizer_dir: str, toy_data: dict, storage: str, k: int, *extra: str,
           pruner: str = "null") -> subprocess.Popen:
    """A sweep worker; ``pruner=null`` by default: every trial to its end (pruning across workers: the last test)."""
    args = [
        "-m", "hparams_search=head_lr", "model=tiny", f"model.tokenizer={tokenizer_dir}", "data=csv",
        f"data.train={toy_data['train']}", f"data.validation={toy_data['validation']}", "hardware=cpu", "precision=fp32",
        "train.epochs=3", "train.batch_size=16", "train.progress=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=test", f"cache.dir={tmp_path / 'cache'}", "tracking.log_model=false", "save_model=false",
        "hydra.sweeper.n_trials=12", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=shared",
        "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=8", f"hydra.sweep.dir={tmp_path / f'worker{k}'}",
        f"hydra.sweeper.pruner={pruner}", *extra,
    ]
    log = open(tmp_path / f"worker{k}.log", "w")  # noqa: SIM115  (the child holds it)
    return subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def running_trial_of(storage, pid: int):
    try:
        study = optuna.load_study(study_name="shared", storage=storage)
    except KeyError:
        return None
    for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("heartbeat", {}).get("pid") == pid:
            return t
    return None


def three_workers_one_killed(tmp_path, tokenizer_dir, toy_data, storage_url: str) -> None:
    from runner.study_storage import make_storage

    workers = [worker(tmp_path, tokenizer_dir, toy_data, storage_url, k) for k in range(3)]
    storage = None
    deadline = time.time() + 300
    victim = None
    while victim is None and time.time() < deadline:  # SIGKILL worker 1 in the middle of one of its trials
        time.sleep(0.5)
        storage = storage or (make_storage(storage_url) if storage_url.startswith("postgres") or
                              Path(storage_url.split(":", 1)[1]).exists() else None)
        if storage is not None:
            victim = running_trial_of(storage, workers[1].pid)
    assert victim is not None, (tmp_path / "worker1.log").read_text()[-3000:]
    time.sleep(1.0)
    workers[1].send_signal(signal.SIGKILL)
    for k in (0, 2):
        assert workers[k].wait(timeout=600) == 0, (tmp_path / f"worker{k}.log").read_text()[-4000:]
    workers[1].wait()

    trials = optuna.load_study(study_name="shared", storage=make_storage(storage_url)).trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 12 and "RUNNING" not in states and "WAITING" not in states, states
    assert trials[victim.number].state.name == "FAIL"  # found stale by a surviving worker
    logs = "".join((tmp_path / f"worker{k}.log").read_text() for k in (0, 2))
    assert f"trial {victim.number} stopped beating" in logs

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    assert len(parents) == 1  # three workers, one study, one parent
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    finished = [r for r in trial_runs if r.info.status == "FINISHED"]
    assert len(finished) == 12
    assert {r.info.status for r in trial_runs} <= {"FINISHED", "KILLED"}  # the killed trial's run, if it opened one
    assert client.get_run(parents[0].info.run_id).info.status == "FINISHED"
    values = sorted(t.value for t in trials if t.state.name == "COMPLETE")
    objective = parents[0].data.tags["objective"]
    assert values == pytest.approx(sorted(r.data.metrics[objective] for r in finished))


def test_three_workers_share_a_postgresql_study_and_survive_a_killed_one(tmp_path, tokenizer_dir, toy_data, postgres):
    three_workers_one_killed(tmp_path, tokenizer_dir, toy_data, postgres)


def test_three_workers_share_a_journal_file_study_and_survive_a_killed_one(tmp_path, tokenizer_dir, toy_data):
    three_workers_one_killed(tmp_path, tokenizer_dir, toy_data, f"journal:{tmp_path / 'study.log'}")


def test_workers_prune_their_trials_through_the_shared_study(tmp_path, tokenizer_dir, toy_data):
    """One finished trial, then two worker processes whose pruner stops every trial at its second evaluation
    (a threshold no accuracy reaches): each decision is made in a worker against the journal file, every later
    trial ends PRUNED with its MLflow run FINISHED and tagged, nothing is left RUNNING or run twice."""
    from runner.study_storage import make_storage

    storage = f"journal:{tmp_path / 'study.log'}"
    first = worker(tmp_path, tokenizer_dir, toy_data, storage, 0, "hydra.sweeper.n_trials=1")
    assert first.wait(timeout=300) == 0, (tmp_path / "worker0.log").read_text()[-3000:]
    threshold = "{_target_: optuna.pruners.ThresholdPruner, lower: 1.1}"
    workers = [worker(tmp_path, tokenizer_dir, toy_data, storage, k, "hydra.sweeper.n_trials=7", pruner=threshold)
               for k in (1, 2)]
    for k, w in zip((1, 2), workers):
        assert w.wait(timeout=600) == 0, (tmp_path / f"worker{k}.log").read_text()[-4000:]

    trials = optuna.load_study(study_name="shared", storage=make_storage(storage)).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] + ["PRUNED"] * 6
    # 96 rows, batch 16: evaluations at steps 6, 12 and 18; asked from the second (prune_after.evaluations=2)
    assert all(t.user_attrs["pruned_at"] == 12 for t in trials[1:])

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id], max_results=1000)
    pruned_runs = [r for r in runs if "pruned_at" in r.data.tags]
    assert len(pruned_runs) == 6 and {r.info.status for r in pruned_runs} == {"FINISHED"}
    assert {r.info.status for r in runs} == {"FINISHED"}
