"""Linear probes: a classifier on a frozen image tower's embeddings (``data.type=image mode=head_only``).

The image tower runs once per image file; its embeddings go through the disk cache (``cache.dir``) keyed by the
tower's weights, the processor's settings, the precision and each file's path, size and modification time, so
the trials of a search and the folds of a k-fold job read them instead of decoding images again. The head
then trains as on given embeddings (runner.head_fit), and the saved folder is the dual encoder with the head
beside it: ``runner.predict`` gives each image's class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from runner.data import Dataset

log = logging.getLogger("runner")


def frozen_dual(run, vocab_size: int):
    """The dual encoder of the run as loaded (every tower frozen, eval mode), shared by the jobs of a process."""
    from runner import reuse
    from runner.dual import DualModel, load_dual

    cfg = run.cfg.model

    def build():
        model = DualModel(load_dual(cfg, vocab_size), ("text", "vision"))
        model.requires_grad_(False)
        return model.eval()

    # shared even when built from a config: the tower that embedded the images is the one saved with the head
    return reuse.shared("frozen-dual", [cfg, vocab_size, run.cfg.train.seed], build, cfg.name_or_path)


def attach_vectors(run, data: Dataset, vocab_size: int, accelerator) -> dict[str, int]:
    """Every split's image embeddings as its ``vectors`` (what a head on given embeddings trains on); the cache's
    hits and misses."""
    from runner.images import processor_for
    from runner.model import weights_hash

    model = frozen_dual(run, vocab_size).to(accelerator.device)
    processor = processor_for(run.cfg.model)
    tower = [model.tower("vision"), getattr(model.transformers_model, "visual_projection", torch.nn.Identity())]
    setting = hashlib.sha256(json.dumps([weights_hash(torch.nn.ModuleList(tower)), processor.to_json_string(),
                                         accelerator.mixed_precision]).encode()).hexdigest()[:24]
    cfg = run.cfg
    cache = Path(cfg.cache.dir or "outputs/cache").resolve() / "image-features" if cfg.cache.enabled else None
    counts = {"hits": 0, "misses": 0}
    tic = time.perf_counter()
    for split in (data.train, data.validation, data.test):
        if split is not None:
            split.vectors = split_vectors(model, processor, list(split.columns[0]), setting, cache, accelerator,
                                          cfg.train.eval_batch_size or 2 * cfg.train.batch_size, counts)
    log.info("frozen image tower: %d images embedded, %d from the cache (%.1f s)", counts["misses"], counts["hits"],
             time.perf_counter() - tic)
    return counts


def file_key(path: str) -> str:
    stat = os.stat(path)
    return f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"


def split_vectors(model, processor, paths: list[str], setting: str, cache: Path | None, accelerator, batch_size: int,
                  counts: dict) -> np.ndarray:  # noqa: F821
    """Embeddings of ``paths`` in order: one cache file per split's set of files (safetensors), else computed."""
    from safetensors.numpy import load_file, save_file

    from runner.dual import embed_images

    key = hashlib.sha256(("\n".join(file_key(p) for p in paths) + setting).encode()).hexdigest()[:32]
    path = cache / f"{key}.safetensors" if cache else None
    if path is not None and path.is_file():
        counts["hits"] += len(paths)
        return load_file(path)["vectors"]
    with torch.inference_mode(), accelerator.autocast():
        vectors = embed_images(model, processor, paths, batch_size, accelerator.device).numpy()
    counts["misses"] += len(paths)
    if path is not None and accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"vectors": vectors}, str(partial))
        os.replace(partial, path)  # whole or absent: a parallel trial never reads half a file
    return vectors
