"""Images and text: preprocessing and LiT training throughput with 10,000 image files on disk, against what a
user writes by hand, and the runner job's peak RSS (images are decoded per batch, never held).

    python benchmarks/bench_images.py [--images 10000]

Data: scikit-learn's digits, 64x64 RGB PNGs with per-file noise (10,000 distinct files) and captions ("a
handwritten digit seven") in pairs.csv; the runner splits 10% off for validation.

- preprocessing: the runner's ``runner.images.pixel_values`` (a batch of 64 paths -> one processor call) against
  the per-example transform of the transformers examples (open, convert, ``processor(images=one)``, stack), on
  the same 2,000 files, alternating in one process, median of 3 after a warm-up;
- training: ``python -m runner model=lit ... train.epochs=1 precision=fp32 hardware.num_workers=2`` against a
  hand-written loop (``bench_images_baseline.py``: the same VisionTextDualEncoderModel, frozen text tower,
  AdamW, batch 64, DataLoader with 2 workers and the per-example transform, ``return_loss=True``), each its own
  process: wall time, training images/s (the runner's train/samples_per_s; the loop's own timing), peak RSS.
Results go to ``benchmarks/results.json`` under ``images``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, store, timed  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def make_images(root: Path, count: int) -> Path:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(count):
        k = i % len(digits.images)
        grey = np.kron(255 - digits.images[k] * 255 / 16, np.ones((8, 8)))  # 8x8 -> 64x64
        pixels = np.clip(grey[..., None] + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i:05d}.png")
        rows.append([f"img/{i:05d}.png", f"a handwritten digit {WORDS[digits.target[k]]}"])
    with open(root / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], *rows])
    return root / "pairs.csv"


def preprocessing(root: Path) -> dict:
    import torch
    from PIL import Image

    from runner.images import load_processor, pixel_values

    lit = json.loads(json.dumps(LIT_PROCESSOR))
    processor = load_processor(None, lit)
    paths = [str(p) for p in sorted((root / "img").glob("*.png"))[:2000]]

    def runner_side():
        for i in range(0, len(paths), 64):
            pixel_values(processor, paths[i:i + 64])

    def by_hand():
        for i in range(0, len(paths), 64):
            torch.stack([processor(images=Image.open(p).convert("RGB"), return_tensors="pt")["pixel_values"][0]
                         for p in paths[i:i + 64]])

    times = {"runner": [], "by_hand": []}
    for fn in (runner_side, by_hand):
        fn()  # warm-up: page cache, first-call allocations
    for _ in range(3):
        for name, fn in (("runner", runner_side), ("by_hand", by_hand)):
            tic = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tic)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"images": len(paths), "runner_images_per_s": round(len(paths) / median["runner"]),
            "by_hand_images_per_s": round(len(paths) / median["by_hand"]),
            "speedup": round(median["by_hand"] / median["runner"], 2)}


LIT_PROCESSOR = {"type": "ViTImageProcessor", "size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3}


def training(root: Path, pairs: Path) -> dict:
    import mlflow

    store_uri = f"sqlite:///{root / 'mlflow.db'}"
    seconds, peak, _ = timed([sys.executable, "-m", "runner", "model=lit", "data=csv", "data.type=image_text",
                              f"data.train={pairs}", "data.text_field=caption", "train.epochs=1", "precision=fp32",
                              "hardware.num_workers=2", "train.progress=false", "train.log_every=10",
                              f"output_dir={root / 'run'}", f"tracking.uri={store_uri}"], ROOT)
    client = mlflow.MlflowClient(store_uri)
    run = client.search_runs([client.get_experiment_by_name("runner").experiment_id])[0]
    speeds = [m.value for m in client.get_metric_history(run.info.run_id, "train/samples_per_s")]
    metrics = json.loads((root / "run" / "metrics.json").read_text())["metrics"]
    base_seconds, base_peak, out = timed([sys.executable, str(ROOT / "benchmarks" / "bench_images_baseline.py"),
                                          str(pairs)], ROOT)
    baseline = json.loads(out.strip().splitlines()[-1])
    return {"runner": {"seconds": round(seconds, 1), "peak_rss_mb": round(peak), "train_images_per_s":
                       round(statistics.median(speeds[1:] or speeds)), "val_i2t_recall_at_1": metrics["val/i2t_recall_at_1"]},
            "by_hand": {"seconds": round(base_seconds, 1), "peak_rss_mb": round(base_peak),
                        "train_images_per_s": round(baseline["images_per_s"])},
            "train_speed_ratio": round(statistics.median(speeds[1:] or speeds) / baseline["images_per_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = make_images(root, args.images)
        results = {"images_on_disk": args.images, "preprocessing": preprocessing(root), "training": training(root, pairs)}
    print(json.dumps(results, indent=2))
    store("images", results)


if __name__ == "__main__":
    main()
