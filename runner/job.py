"""The generic runner: data -> model(s) -> metrics -> saved model -> MLflow, for one job.

A job is a single fit, or a k-fold cross-validation (``cv.folds``) whose folds are nested MLflow runs.
Everything a user can get wrong (config values, the run folder, data files, the objective, the model
and tokenizer) is checked before the MLflow run opens, so a bad input leaves no FAILED run behind.
Nothing here reads a ``DictConfig``: ``runner.run`` hands over a typed :class:`Run`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from runner import artifact, cv, reuse, runfolder
from runner.data import Dataset, load_dataset
from runner.distributed import agree_on, finish
from runner.errors import RunnerError, TrialPruned
from runner.experiment import FitResult, fit_and_evaluate, job_features, resume_point, uses_frozen_features
from runner.hardware import make_accelerator, precision_name
from runner.model import check_model, load_tokenizer, quiet_libraries
from runner.report import run_report
from runner.schema import DataConfig
from runner.signals import STOP
from runner.spec import Run
from runner.tasks import LinearProbe
from runner.tracking import Tracker, check_backends, default_uri, make_mirrors

log = logging.getLogger("runner")
PRUNED_FILE = "pruned.json"  # a trial the search's pruner stopped: where and at what value


def execute(run: Run) -> float:
    """Run one job and return the objective (``cfg.objective.metric``, or its fold mean under k-fold)."""
    cfg = run.cfg
    quiet_libraries()
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    accelerator = make_accelerator(cfg.hardware.device, cfg.precision.dtype, cfg.train.grad_accum, run.strategy,
                                   cfg.train.max_grad_norm)
    run.mode.check_device(accelerator.device.type)
    run = dataclasses.replace(run, precision=precision_name(accelerator.mixed_precision))
    if accelerator.num_processes > 1:  # one job on N processes: rank 0's run folder is the job's
        own, agreed = Path(cfg.output_dir), agree_on(cfg.output_dir, accelerator)
        if not accelerator.is_main_process:
            runfolder.leave(own, Path(agreed))
        run = dataclasses.replace(run, cfg=dataclasses.replace(cfg, output_dir=agreed))
        cfg = run.cfg
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        runfolder.prepare(out, cfg.overwrite, cfg.train.resume)
    accelerator.wait_for_everyone()  # the folder is ready (cleared for overwrite) before any rank reads it
    if cfg.train.resume not in ("auto", "never") and runfolder.is_run_folder(Path(cfg.train.resume)):
        if accelerator.is_main_process:  # a retried sweep trial: the interrupted trial's work comes here
            runfolder.adopt(out, Path(cfg.train.resume))
        run = resume_here(run)
        cfg = run.cfg
    if accelerator.is_main_process and cfg.train.resume == "auto":
        runfolder.check_checkpoints(out, run.fingerprint())  # before MLflow is touched: a changed config is an input error
    k_fold = cfg.cv.folds > 1
    data = load_dataset(cfg.data, run.task.target, need_validation=not k_fold, score_range=cfg.task.score_range)
    run.task.check_labels(data.label_names)
    check_objective(run, data)
    log.info("data: %d train%s%s, %d labels", len(data.train),
             f", {len(data.validation)} validation" if data.validation and not k_fold else "",
             f", {len(data.test)} test" if data.test else "", len(data.label_names))
    if k_fold:
        cv.check_folds(data, cfg.cv)
    if cfg.train.resume not in ("auto", "never"):
        if k_fold:
            raise RunnerError(f"train.resume={cfg.train.resume} names one checkpoint, but a k-fold job has one per "
                              f"fold: give the run folder of the interrupted job instead")
        named = resume_point(cfg.train.resume, out / "checkpoints")
        if named is not None and accelerator.is_main_process:  # a changed config is an input error: before MLflow
            runfolder.check_checkpoint(named, run.fingerprint())
    tokenizer = None  # given embeddings need no tokenizer and no encoder
    if data.train.vectors is None:
        # the trials of a search in one process load and check these once (runner/reuse.py)
        source = cfg.model.tokenizer or cfg.model.name_or_path
        tokenizer = reuse.shared("tokenizer", cfg.model, lambda: load_tokenizer(cfg.model), source)
        reuse.shared("checked-model", [cfg.model, cfg.mode, len(tokenizer), run.make_pooling().layers, run.task.images],
                     lambda: check_any_model(run, len(tokenizer)) or True, cfg.model.name_or_path)
    if isinstance(run.task, LinearProbe):  # a head on the frozen image tower's embeddings, through the cache
        from runner.image_features import attach_vectors

        attach_vectors(run, data, len(tokenizer), accelerator)
    check_teacher(cfg.distill.teacher)
    if cfg.tracking.enabled and accelerator.is_main_process:
        check_backends(cfg.tracking.backends)
    tracker = open_tracker(run, out, accelerator.is_main_process)
    if data.sources and accelerator.is_main_process:  # rows read and skipped per file, folder and class
        (out / "data_sources.json").write_text(json.dumps(data.sources, indent=2))
        tracker.log_artifact(out / "data_sources.json")
    STOP.install()
    try:
        with tracker.closing():
            objective = train_and_report(run, data, tokenizer, accelerator, tracker, out)
    except TrialPruned as pruned:  # the search's pruner stopped it: what it finished stays in its folder
        log.info("trial %s", pruned)
        if accelerator.is_main_process:
            (out / PRUNED_FILE).write_text(json.dumps({"pruned_at": pruned.step, "unit": pruned.unit,
                                                       "value": pruned.value}))
        objective = pruned.value
    finally:
        STOP.uninstall()
        if (out / "runner.log").exists():  # the job's log beside its metrics, whatever the outcome
            tracker.log_artifact(out / "runner.log")
    finish(accelerator)  # a finished or pruned job's processes end together
    return objective


def check_any_model(run: Run, vocab_size: int) -> None:
    """A text encoder for text data, a dual encoder for images (runner/dual.py), each checked as far as it can
    be before the run opens."""
    from runner import dual

    cfg = run.cfg
    if dual.is_dual(cfg.model) != run.task.images:
        raise RunnerError(f"data.type={cfg.data.type.value} needs a dual encoder (model=clip, model=siglip, model=lit)"
                          if run.task.images else f"model {cfg.model.name_or_path or cfg.model.random_init.get('model_type')} "
                          f"is a dual image-text encoder: use it with data.type=image_text or data.type=image")
    if run.mode.towers is not None and not run.task.images:
        raise RunnerError("mode.towers applies to dual image-text encoders; a text encoder has one tower")
    if run.task.images:
        dual.check_mode(run.mode)
        dual.check(cfg.model, vocab_size)
        from runner.images import processor_for

        processor = processor_for(cfg.model)  # a folder without processor settings is an input error, found before MLflow opens
        if cfg.distill.teacher not in (None, "self"):
            from runner.distill import dual_teacher
            from runner.model import load_tokenizer

            dual_teacher(cfg.distill, None, processor, load_tokenizer(cfg.model))
        return
    check_model(cfg.model, vocab_size, run.mode, run.make_pooling().layers)


def check_teacher(teacher: str | None) -> None:
    """A distillation teacher that cannot load is an input error, found before the MLflow run opens."""
    if teacher in (None, "self"):
        return
    from runner.artifact import read_meta
    from runner.model import load_config, looks_like_path
    from runner.schema import ModelConfig

    if os.path.isfile(os.path.join(teacher, "runner_model.json")):
        read_meta(Path(teacher))  # checked as data, like any shared folder
    elif looks_like_path(teacher) and not os.path.isdir(os.path.expanduser(teacher)):
        raise RunnerError(f"distill.teacher={teacher}: no such folder (a runner model folder, a model folder or a hub "
                          f"id)")
    else:
        load_config(ModelConfig(name_or_path=teacher), 0)  # the hub id or folder resolves, without loading weights


def train_and_report(run: Run, data: Dataset, tokenizer, accelerator, tracker: Tracker, out: Path) -> float:
    """The work of a checked job: train (k-fold or once), save, write the outputs; the objective (a list of
    values when ``objective.metrics`` names several)."""
    cfg = run.cfg
    started = time.perf_counter()
    tracker.log_params(dataclasses.asdict(cfg))
    frozen = job_features(run, data, tokenizer, accelerator) if uses_frozen_features(run, data) else None
    if frozen is not None:
        tracker.log_metrics({"cache/hits": frozen.hits, "cache/misses": frozen.misses})
    if cfg.cv.folds > 1:
        summary = cv.cross_validate(run, data, tokenizer, accelerator, tracker, out, frozen)
        model = summary.pop("model")
    else:
        result = fit_and_evaluate(run, data, tokenizer, accelerator, tracker, out, frozen)
        summary, model = single_summary(run, result), result.model
        if accelerator.is_main_process and cfg.save_model:
            artifact.save_trained(run, result.model, tokenizer, data.label_names, out / "model", result.metrics)
    # what the model costs (runner/costs.py): in MLflow and metrics.json's "costs", apart from the metrics, which
    # are the same whenever the same job runs again (a resumed job, a cached one); train/seconds never is
    summary["costs"] = {"train/seconds": time.perf_counter() - started, **job_costs(run, model, tokenizer, data)}
    tracker.log_metrics(summary["costs"], summary.get("steps", 0))  # at the last step: W&B steps only go forward
    if accelerator.is_main_process:
        in_sweep = "sweep_id" in run.tags  # auto: a sweep logs its best trial's model as it ends (runner/sweep.py)
        if cfg.export_onnx and (out / "model" / "runner_model.json").exists():  # before logging: the MLflow model carries it
            from runner.export import export_onnx

            export_onnx(out / "model", out / "model" / "onnx")
        wanted = cfg.tracking.log_model is True or (cfg.tracking.log_model == "auto" and not in_sweep)
        if cfg.save_model and wanted and (out / "model" / "runner_model.json").exists():
            if tracker.run_id:
                from runner.mlflow_model import log_pyfunc

                log_pyfunc(tracker.client, tracker.run_id, out / "model", cfg.tracking.register)
        write_outputs(run, data, summary, out, tracker)
    objective = summary["objective"]["value"]
    log.info("objective %s = %.4f", summary["objective"]["metric"], objective)
    if cfg.objective.metrics:  # a Pareto search: every objective, the first as above
        values = [objective, *(objective_value({**summary["metrics"], **summary["costs"]}, m)
                               for m in cfg.objective.metrics[1:])]
        log.info("objectives %s", "  ".join(f"{m}={v:.4g}" for m, v in zip(cfg.objective.metrics, values)))
        return values
    return objective


def objective_value(metrics: dict[str, float], name: str) -> float:
    """An objective's value in a job's metrics: the fold mean under k-fold, else the metric itself."""
    return metrics.get(f"cv/{name}_mean", metrics.get(name))


def job_costs(run: Run, model, tokenizer, data: Dataset) -> dict[str, float]:
    """The trained model's cost metrics (runner.costs); latency only when an objective asks for it."""
    from runner.costs import model_costs

    if model is None:  # every fold was finished before this resumed job: no model in this process
        if any(m.startswith("model/") for m in run.cfg.objective.metrics or []):
            raise RunnerError("the cost objectives need a model trained in this process, and every fold of this "
                              "resumed job had finished: rerun it with train.resume=never")
        return {}
    latency = any(m.startswith("model/latency") for m in run.cfg.objective.metrics or [])
    if latency and tokenizer is None:
        raise RunnerError("model/latency_ms measures the encoder on texts; this model reads given embeddings")
    split = data.validation or data.train
    texts = split.columns[0][:64] if tokenizer is not None else []
    texts = [t if isinstance(t, str) else str(t) for t in texts]
    return model_costs(model, tokenizer, texts, run.cfg.model.max_length, run.cfg.model.text_prefix, latency)


def resume_here(run: Run) -> Run:
    """The same run, resuming from its own folder (``train.resume=auto``)."""
    train = dataclasses.replace(run.cfg.train, resume="auto")
    return dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, train=train))


def open_tracker(run: Run, out: Path, main_process: bool) -> Tracker:
    """The job's MLflow run: the one this folder already reports to (a resumed run), or a new one."""
    cfg = run.cfg
    enabled = cfg.tracking.enabled and main_process
    name = cfg.tracking.run_name or "-".join([*(run.choices.get(g, "?") for g in ("model", "mode", "pooling")),
                                              data_name(cfg.data)])
    mirrors = make_mirrors(cfg.tracking.backends, out, cfg.tracking.experiment, name) if enabled else []
    tracker = Tracker(cfg.tracking.uri or default_uri(), cfg.tracking.experiment, enabled, mirrors)
    tags = {**run.choices, **run.tags, "output_dir": str(out), "objective": cfg.objective.metric,
            "config_hash": run.config_hash()}
    resume_id = runfolder.previous_run_id(out) if cfg.train.resume != "never" else None
    tracker.start(name, tags=tags, parent_id=run.parent_run_id, resume_id=resume_id)
    if main_process:
        runfolder.record_run_id(out, tracker.run_id, run.config_hash())
    return tracker


def data_name(data: DataConfig) -> str:
    """How a run name shows its data: the hub dataset, or the training file (with its folder when the file
    is just called train.csv or the like; the labels of a mapping label -> source)."""
    if isinstance(data.train, Mapping):
        return "_".join(str(k) for k in data.train)[:40]
    if data.hub and not os.path.exists(data.train or ""):
        return Path(data.hub).name if os.path.isdir(data.hub) else data.hub.rsplit("/", 1)[-1]
    path = Path(data.train or data.train_embeddings or "data")
    generic = path.stem.lower() in ("train", "training", "data", "dataset", "all", "full")
    return f"{path.parent.name}_{path.stem}" if generic and path.parent.name else path.stem


def single_summary(run: Run, result: FitResult) -> dict:
    metric = run.cfg.objective.metric
    return {"objective": {"metric": metric, "value": result.metrics[metric]}, "metrics": result.metrics,
            "reports": result.reports, "steps": result.steps, "best_step": result.best_step}


def check_objective(run: Run, data: Dataset) -> None:
    """``objective.metric`` must be one this run produces (e.g. ``val/f1`` exists for two classes only)."""
    cfg = run.cfg
    splits = ["val"] + (["test"] if data.test is not None else [])
    known = [f"{s}/{m}" for s in splits for m in run.task.metrics_for(data.label_names)]
    from runner.costs import COSTS

    extra = [m for m in (cfg.objective.metrics or [])[1:] if m not in known and m not in COSTS]
    if extra:
        raise RunnerError(f"objective.metrics: {', '.join(extra)} is not a metric of this run; choose among "
                          f"{', '.join(known)} or the costs {', '.join(COSTS)}")
    if cfg.objective.metric not in known:
        raise RunnerError(f"objective.metric={cfg.objective.metric} is not a metric of this run; choose one of "
                          f"{', '.join(known)}")


def seed_everything(seed: int, deterministic: bool) -> None:
    from accelerate.utils import set_seed

    set_seed(seed, deterministic=deterministic)


def write_outputs(run: Run, data: Dataset, summary: dict, out: Path, tracker: Tracker) -> None:
    """metrics.json (written last: it marks the run finished), report.json, labels.json, config.yaml."""
    reports = summary.pop("reports", {})
    if run.draws_pictures:
        for picture in run_report(out, tracker.metric_history(), summary, reports, summary["objective"]["metric"]):
            tracker.log_artifact(picture, "report")
    files = {
        "report.json": json.dumps(reports, indent=2),
        "labels.json": json.dumps(data.label_names),
        "config.yaml": run.config_yaml,
        "metrics.json": json.dumps(summary, indent=2),
    }
    for filename, text in files.items():
        (out / filename).write_text(text)
        tracker.log_artifact(out / filename)
