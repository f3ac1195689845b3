"""The typed run object: what ``runner.run`` builds from the composed config and every layer below reads.

A leaf module: it imports only the schema and the component base classes, so ``job``, ``cv`` and
``experiment`` all annotate ``run: Run`` and imports run one way (entry -> job -> cv -> experiment ->
train), never back up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runner.distributed import Single, Strategy
from runner.losses import Loss
from runner.modes import Mode
from runner.pooling import Pooling
from runner.schema import RunConfig
from runner.tasks import Task
from runner.tracking import flatten

# Keys that do not change what a run computes: a checkpoint written under other values still resumes.
RESUME_NEUTRAL = (
    "train.resume", "train.progress", "train.checkpoint_every", "train.keep_checkpoints",
    "train.keep_checkpoints_after_run", "train.log_every", "train.eval_batch_size", "hardware.num_workers",
    "tracking.", "output_dir", "overwrite", "save_model", "cv.keep_models", "cache.", "mode.merge",
)


@dataclass
class Run:
    """The composed run: typed config plus the components the config chose."""

    cfg: RunConfig
    make_pooling: Callable[[], Pooling]  # a fresh (possibly trainable) pooling per model built
    mode: Mode
    task: Task  # what is learned: batch layout, head or not, metrics (runner.tasks)
    make_loss: Callable[[], Loss]  # the configured loss, or the task's default
    choices: dict[str, str]  # config group -> chosen option, for tags and run names
    config_yaml: str
    parent_run_id: str | None = None  # the sweep's MLflow run, when this job is part of one
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (sweep id, job number, overrides)
    strategy: Strategy = field(default_factory=Single)  # how several processes share the model (hardware.strategy)
    precision: str = "fp32"  # what precision=auto resolved to on this machine (fp32, bf16, fp16): saved with models
    pruning: Any = None  # runner.pruning.Pruning: this job is a trial of a search that prunes

    @property
    def draws_pictures(self) -> bool:
        """Whether this job draws report pictures (tracking.pictures: auto skips them in sweep trials)."""
        choice = self.cfg.tracking.pictures
        return choice == "all" or (choice == "auto" and "sweep_id" not in self.tags)

    def fingerprint(self) -> dict[str, str]:
        """The flattened config values that decide what is computed (a checkpoint must match them)."""
        tree = json.loads(json.dumps(dataclasses.asdict(self.cfg), default=enum_value))
        return {k: json.dumps(v) for k, v in flatten(tree).items() if not k.startswith(RESUME_NEUTRAL)}

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def enum_value(value):
    return getattr(value, "value", str(value))

