"""The run folder's life: new, unfinished (resume it), or finished (an error unless ``overwrite=true``).

A run folder holds ``mlflow_run.json`` (the MLflow run this folder reports to, so a resumed run continues
the same MLflow run) from the moment tracking starts, checkpoints while it trains, and ``metrics.json``
once it has finished. Hydra picks a new timestamped folder per run by default; a fixed
``hydra.run.dir`` (a SLURM job that is requeued, say) makes the same command land in the same folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from runner.errors import RunnerError

log = logging.getLogger("runner")

MLFLOW_FILE = "mlflow_run.json"
FINISHED_FILE = "metrics.json"
RESULTS = ("model", "checkpoints", "folds", "metrics.json", "report.json", "labels.json", "folds.csv", MLFLOW_FILE)
HYDRA_ONLY = {".hydra", "runner.log"}  # what Hydra writes before the job starts


class RunFolderCheck(Callback):
    """Hydra creates the run folder before the job starts: an unwritable one is reported here, in one
    line, instead of as Hydra's traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable(Path(config.hydra.run.dir))
        except RunnerError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunnerError(f"cannot write to the run folder {out}: {err.strerror}; set hydra.run.dir to a "
                          f"writable folder") from err


def prepare(out: Path, overwrite: bool, resume: str) -> None:
    """Check the folder is writable and not a finished run; clear it for ``overwrite`` / ``resume=never``."""
    check_writable(out)
    if (out / FINISHED_FILE).exists():
        if not overwrite:
            raise RunnerError(f"{out} holds a finished run ({FINISHED_FILE}): choose another hydra.run.dir, or add "
                              f"overwrite=true to replace it")
        log.warning("overwrite=true: replacing the finished run in %s", out)
        clear(out)
    elif resume == "never" and any((out / name).exists() for name in ("checkpoints", "folds")):
        log.warning("train.resume=never: discarding the unfinished run's checkpoints in %s", out)
        clear(out)


def check_checkpoints(out: Path, fingerprint: dict[str, str]) -> None:
    """The checkpoints this folder would resume from must come from the same config."""
    from runner import checkpoint

    for root in [out / "checkpoints", *sorted((out / "folds").glob("fold-*/checkpoints"))]:
        found = checkpoint.find_latest(root)
        if found is not None:
            check_checkpoint(found, fingerprint)


def check_checkpoint(found: Path, fingerprint: dict[str, str]) -> None:
    """One checkpoint against this run's config fingerprint (its state.json read as capped, checked data)."""
    from runner import checkpoint, trust
    from runner.errors import RunnerError

    document = trust.read_json(found / "state.json", limit=64 << 20)
    saved = document.get("fingerprint") if isinstance(document, dict) else None
    if not isinstance(saved, dict):
        raise RunnerError(f"checkpoint {found}: state.json is not a runner checkpoint state")
    checkpoint.check_fingerprint(found, saved, fingerprint)


def is_run_folder(path: Path) -> bool:
    """A folder an earlier run worked in (as opposed to one checkpoint folder)."""
    return path.is_dir() and any((path / name).exists() for name in ("checkpoints", "folds", MLFLOW_FILE))


def adopt(out: Path, source: Path) -> None:
    """Continue the unfinished run of ``source`` in ``out``: its checkpoints, finished folds and MLflow run
    move here (moved, not copied: one run goes on, and a second retry finds them here)."""
    if source.resolve() == out.resolve():
        return
    if (source / FINISHED_FILE).exists():
        raise RunnerError(f"train.resume={source}: that run has finished; nothing to resume")
    log.info("continuing the interrupted run of %s in %s", source, out)
    for name in ("checkpoints", "folds"):
        if (source / name).exists() and not (out / name).exists():
            shutil.move(str(source / name), str(out / name))
    if (source / MLFLOW_FILE).exists() and not (out / MLFLOW_FILE).exists():
        shutil.copy(source / MLFLOW_FILE, out / MLFLOW_FILE)


def clear(out: Path) -> None:
    for name in RESULTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def previous_run_id(folder: Path) -> str | None:
    path = folder / MLFLOW_FILE
    return json.loads(path.read_text()).get("run_id") if path.exists() else None


def record_run_id(folder: Path, run_id: str | None, config_hash: str | None = None) -> None:
    if run_id:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MLFLOW_FILE).write_text(json.dumps({"run_id": run_id, "config_hash": config_hash}))


def newest_unfinished(out: Path, config_hash: str, look_at: int = 200) -> Path | None:
    """In the default layout (``outputs/runs/<date>/<time>``), the newest other run folder of the same config
    (``Run.config_hash``) that stopped before finishing and left work to continue: what ``train.resume=auto``
    continues, so that the same command resumes an interrupted run."""
    from runner import checkpoint

    candidates = sorted((p for p in out.parent.parent.glob("*/*") if p.is_dir() and p.resolve() != out.resolve()),
                        key=lambda p: p.parent.name + p.name, reverse=True)[:look_at]
    for folder in candidates:
        if (folder / FINISHED_FILE).exists() or not is_run_folder(folder):
            continue
        try:
            recorded = json.loads((folder / MLFLOW_FILE).read_text()).get("config_hash")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded is None:  # tracking was off: the newest checkpoint's state says which config wrote it
            for root in [folder / "checkpoints", *sorted((folder / "folds").glob("fold-*/checkpoints"))]:
                steps = sorted(root.glob(f"{checkpoint.PREFIX}*"), reverse=True)
                if steps and checkpoint.verify(steps[0]) is None:
                    document = json.loads((steps[0] / "state.json").read_text())
                    recorded = document.get("config_hash") if isinstance(document, dict) else None
                    break
        if recorded == config_hash:
            return folder
    return None


def move_log(own: Path, target: Path) -> None:
    """This process's runner.log goes on in ``target`` (appended) instead of the folder Hydra made."""
    for old in close_log_in(own):
        moved = logging.FileHandler(target / "runner.log", mode="a", encoding=old.encoding)
        moved.setFormatter(old.formatter)
        moved.setLevel(old.level)
        logging.getLogger().addHandler(moved)


def close_log_in(own: Path) -> list[logging.FileHandler]:
    """Close and detach the root logger's file handlers writing into ``own``; returns them."""
    root, closed = logging.getLogger(), []
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent.resolve() == own.resolve():
            root.removeHandler(handler)
            handler.close()
            closed.append(handler)
    return closed


def leave(own: Path, agreed: Path) -> None:
    """A rank other than 0 of a launched job: its log file closes and the folder its own Hydra made (with a
    timestamp of its own) goes; the job's files are in rank 0's folder ``agreed``."""
    close_log_in(own)
    if own.resolve() != agreed.resolve():
        remove_if_unused(own)


def resume_command(out: Path) -> str:
    """The command that continues the run in ``out``: this command, with its folder named."""
    import shlex

    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "train.resume="))]
    return " ".join(["python -m runner", *map(shlex.quote, args), shlex.quote(f"hydra.run.dir={out}")])


def remove_if_unused(out: Path) -> bool:
    """Delete a folder in which a run failed before doing any work (Hydra's files alone); True if done."""
    if not out.is_dir() or not {p.name for p in out.iterdir()} <= HYDRA_ONLY:
        return False
    shutil.rmtree(out, ignore_errors=True)
    return True
