"""One job on 1 vs N CPU processes (DDP over gloo): the same global batch, wall time, peak RSS, dev accuracy.

    nox -s bench                         # or: python benchmarks/bench_processes.py --processes 2 --rows 2000

SST-2 (first --rows rows), all-MiniLM-L6-v2 full fine-tuning, 1 epoch, fp32, global batch 32: one process
with train.batch_size=32 against `accelerate launch --cpu --num_processes N` with 32/N per process. On a
machine whose cores one process already keeps busy, N processes add a gradient all-reduce per step and a
process start each; they pay off with one device (or socket) per process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import ROOT, shared_file, store, timed


def job(rows_file: Path, out: Path, processes: int, batch: int) -> list[str]:
    head = ([str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", str(processes),
             "--main_process_port", "29531", "-m", "runner"] if processes > 1 else [sys.executable, "-m", "runner"])
    return [*head, "data=csv", f"data.train={rows_file}", f"data.validation={shared_file('sst2', 'dev.csv')}",
            "hardware=cpu", "precision=fp32", "train.epochs=1", f"train.batch_size={batch}", "train.progress=false",
            f"hydra.run.dir={out}", f"tracking.uri=sqlite:///{out.parent / 'mlflow.db'}", "tracking.log_model=false",
            "save_model=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.csv"
        lines = shared_file("sst2", "train.csv").read_text().splitlines(keepends=True)
        train.write_text("".join(lines[: args.rows + 1]))
        results = {}
        for n in (1, args.processes):
            out = Path(tmp) / f"p{n}"
            seconds, peak, _ = timed(job(train, out, n, 32 // n), ROOT)
            accuracy = json.loads((out / "metrics.json").read_text())["metrics"]["val/accuracy"]
            results[f"{n} process{'es' if n > 1 else ''}"] = {"seconds": round(seconds, 2), "peak_rss_mb": round(peak),
                                                              "accuracy": round(accuracy, 4)}
    base = results["1 process"]["seconds"]
    print(f"SST-2, {args.rows} rows, 1 epoch, MiniLM full fine-tuning, global batch 32, fp32, CPU")
    print(f"{'processes':<14} {'seconds':>8} {'vs 1 process':>13} {'peak RSS MB':>12} {'dev acc':>8}")
    for name, r in results.items():
        print(f"{name:<14} {r['seconds']:8.1f} {base / r['seconds']:12.2f}x {r['peak_rss_mb']:12.0f} {r['accuracy']:8.4f}")
    store("processes", {"rows": args.rows, **results})


if __name__ == "__main__":
    main()
