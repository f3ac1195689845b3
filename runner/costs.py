"""What a trained model costs, as metrics a search can trade against accuracy (``objective.metrics``).

- ``model/parameters``, ``model/trainable_parameters``: counts of the trained model (encoder, pooling, head);
- ``model/size_mb``: its weights in MB as held in memory (what serving it loads);
- ``model/latency_ms``: median milliseconds per example at batch 1, and ``model/latency_ms_batch32`` per example at
  batch 32, of tokenizing and running the whole model (encoder included, even when training used cached
  features) on a fixed sample of the validation texts (the first 32), on this machine, in inference mode;
- ``train/seconds``: wall time of the job's training and evaluation (logged by the job).

Latency is a property of the machine as much as of the model: compare trials of one search run on one kind
of machine.
"""

from __future__ import annotations

import statistics
import time

import torch

COSTS = ("model/latency_ms", "model/latency_ms_batch32", "model/parameters", "model/trainable_parameters",
         "model/size_mb", "train/seconds")
SAMPLE = 32
REPEATS = 3


def model_costs(model, tokenizer, texts: list[str], max_length: int, prefix: str, latency: bool) -> dict[str, float]:
    """The model's size metrics, and its latency when ``latency`` (it runs the model: about a second)."""
    params = list(model.parameters())
    costs = {"model/parameters": float(sum(p.numel() for p in params)),
             "model/trainable_parameters": float(sum(p.numel() for p in params if p.requires_grad)),
             "model/size_mb": sum(p.numel() * p.element_size() for p in params) / 1e6}
    if latency:
        costs.update(measure_latency(model, tokenizer, texts[:SAMPLE], max_length, prefix))
    return costs


@torch.inference_mode()
def measure_latency(model, tokenizer, texts: list[str], max_length: int, prefix: str) -> dict[str, float]:
    was_training = model.training
    model.eval()

    def run(batch: list[str]) -> float:
        start = time.perf_counter()
        features = tokenizer([prefix + t for t in batch], padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")
        model(dict(features)) if getattr(model, "head_outputs", None) is not None else model.embed(dict(features))
        return (time.perf_counter() - start) * 1000

    run(texts[:2])  # warm-up: first-call allocations are not the model's cost
    single = [run([t]) for t in texts[:16]]
    batched = [run(texts) / len(texts) for _ in range(REPEATS)]
    model.train(was_training)
    return {"model/latency_ms": statistics.median(single), "model/latency_ms_batch32": statistics.median(batched)}
