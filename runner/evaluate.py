"""Re-evaluate a saved model on labelled data.

    python -m runner.evaluate model_dir=DIR data.test=FILE [data.KEY=VALUE ...] [output_dir=DIR]

The same metrics and per-class report as the training run's ``test/`` split (identical numbers on the
same file: the same task, batching and metric code), printed, written to ``output_dir`` (default
``outputs/evaluations/<date>/<time>``) and logged to MLflow as a run tagged with the training run's id.
The file is read with the training run's reading options, which ``data.*`` overrides.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from runner.data import reading_config
from runner.errors import DataError, RunnerError
from runner.predict import Predictor, check_writable, parse_args, resolve_model_dir

log = logging.getLogger("runner")


@dataclass
class EvaluateConfig:
    model_dir: str = ""
    output_dir: str | None = None
    batch_size: int | None = None  # default: the training run's evaluation batch size (same batches)
    precision: str = "auto"  # auto: the training run's evaluation precision (bf16 autocast if it used it), fp32, bf16
    backend: str = "torch"  # torch: the training run's numbers; onnx | onnx-int8: the exported graphs' (runner.export)
    split: str = "test"  # the metric prefix (test/accuracy, ...)
    progress: bool = True
    tracking: bool = True
    tracking_uri: str | None = None
    experiment: str | None = None  # default: the training run's
    data: dict = field(default_factory=dict)  # data.test=FILE and reading options
    task: dict = field(default_factory=dict)  # dual encoders: task.prompt for zero-shot classes (data.type=image)


def training_config(folder: Path) -> dict:
    from runner import trust

    return trust.read_saved_config(folder)


def labelled_inputs(folder: Path, meta: dict, trained: dict, overrides: dict, target: str):
    """(inputs, targets) of the labelled file: text columns (or vectors), targets encoded with the saved
    label map as ``target`` (the task's: class, score, multi_label or none)."""
    from runner.data import encode_targets, read_source, read_vectors, select, text_fields

    overrides = dict(overrides)
    test = overrides.pop("test", None)
    if not test:
        raise RunnerError("data.test=FILE is required: the labelled file to evaluate on")
    from runner.sources import splits_of

    inner = splits_of(test)
    if "test" in inner:  # a folder of splits (class folders, a saved DatasetDict): its test split
        log.info("data.test=%s holds splits %s: evaluating on %s", test, sorted(inner), inner["test"])
        test = inner["test"]
    data = reading_config(folder, meta, test, overrides)
    frame, where = read_source(data, "train")
    label = None if target == "none" else data.label_field
    vector_input = meta.get("input") == "embeddings"
    fields = [] if vector_input else text_fields(data)
    frame = select(data, frame, where, fields, label, [data.embedding_field] if vector_input else [])
    try:
        targets = None if label is None else encode_targets(frame["label"], target, saved_codes(meta, trained), "train", data)
    except DataError as err:
        raise DataError(f"{err} (labels are read against the model's label map)") from err
    if vector_input:
        return read_vectors(data, frame, "train"), targets
    return [frame[f"text{i}"].tolist() for i in range(len(fields))], targets


def saved_codes(meta: dict, trained: dict) -> list:
    """The labels as they appear in data files: the saved names, or their codes when the training run
    renamed them (data.label_names={1: World})."""
    names = meta.get("labels") or []
    renamed = (trained.get("data") or {}).get("label_names")
    if not renamed:
        return names
    code_of = {str(v): k for k, v in renamed.items()}
    return [code_of.get(str(n), n) for n in names]


def evaluate(cfg: EvaluateConfig) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from runner.artifact import read_meta
    from runner.schema import DataType, TaskConfig
    from runner.tasks import make_task

    if cfg.output_dir:
        check_writable(cfg.output_dir, "folder", "output_dir")
    folder = resolve_model_dir(cfg.model_dir, cfg.tracking_uri)
    meta = read_meta(folder)
    trained = training_config(folder)
    if meta.get("kind") == "dual":
        from runner import dual_inference

        if cfg.backend != "torch":
            raise RunnerError(f"backend={cfg.backend}: a dual encoder evaluates with backend=torch")
        from runner.artifact import load_model

        model, tokenizer, meta = load_model(folder)
        return dual_inference.evaluate(cfg, folder, meta, model, tokenizer)
    if cfg.task:
        raise RunnerError("task.* applies to dual encoders (task.prompt); this model's task is fixed by its training")
    try:
        task_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskConfig), trained.get("task") or {}))
    except (OmegaConfBaseException, ValueError) as err:
        raise RunnerError(f"{folder}/config.yaml: its task settings are not valid ({str(err).splitlines()[0]})") from err
    task = make_task(DataType(meta.get("data_type", "single")), task_cfg)
    inputs, targets = labelled_inputs(folder, meta, trained, cfg.data, task.target)
    train = trained.get("train") or {}
    saved = [v for v in (train.get("eval_batch_size"), 2 * train["batch_size"] if type(train.get("batch_size")) is int else None)
             if type(v) is int and v >= 1]
    batch_size = cfg.batch_size or (saved[0] if saved else 64)
    predictor = Predictor(folder, cfg.backend, cfg.precision)
    outputs = predictor.run(inputs, batch_size, cfg.progress, embeddings=not task.has_head)
    columns = [outputs["head"]] if task.has_head else outputs["columns"]
    metrics, report = task.score(columns, task.scale_targets(targets), cfg.split, meta.get("labels") or [],
                                 outputs["text_ids"])
    return {"metrics": metrics, "report": report, "model_dir": str(folder), "rows": len(columns[0])}


def training_run_id(folder: Path) -> str | None:
    record = folder.parent / "mlflow_run.json"
    return json.loads(record.read_text()).get("run_id") if record.exists() else None


def write_and_log(cfg: EvaluateConfig, result: dict, trained: dict) -> Path:
    out = Path(cfg.output_dir or f"outputs/evaluations/{time.strftime('%Y-%m-%d/%H-%M-%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=2))
    if result["report"]:
        (out / "report.json").write_text(json.dumps(result["report"], indent=2))
    if cfg.tracking:
        from runner.tracking import Tracker, default_uri

        folder = Path(result["model_dir"])
        experiment = cfg.experiment or (trained.get("tracking") or {}).get("experiment") or "runner"
        tags = {"role": "evaluation", "model_dir": str(folder.resolve()), "data.test": str(cfg.data.get("test")),
                "output_dir": str(out.resolve())}
        parent = training_run_id(folder)
        if parent:
            tags["evaluated_run_id"] = parent
        tracker = Tracker(cfg.tracking_uri or (trained.get("tracking") or {}).get("uri") or default_uri(), experiment)
        with tracker.start(f"evaluate-{Path(str(cfg.data.get('test'))).stem}", tags=tags).closing():
            tracker.log_metrics(result["metrics"])
            for name in ("metrics.json", "report.json"):
                if (out / name).exists():
                    tracker.log_artifact(out / name)
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv, EvaluateConfig)
        result = evaluate(cfg)
        out = write_and_log(cfg, result, training_config(Path(result["model_dir"])))
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)  # one line, whatever the logging setup
        sys.exit(err.exit_code)
    for key, value in result["metrics"].items():
        print(f"{key}={value:.6g}")
    log.info("%d rows; metrics and report in %s", result["rows"], out)


if __name__ == "__main__":
    main()
