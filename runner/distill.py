"""Knowledge distillation as a loss wrapper: ``(1 - alpha) * task loss + alpha * distillation term``.

- a teacher with a head (a saved runner model folder) and a student with logits: KL divergence of the
  temperature-softened distributions, times ``T^2`` (Hinton et al. 2015);
- otherwise, on sentence embeddings: MSE (or 1 - cosine) between student and teacher embeddings of
  every text column. ``teacher=self`` is the frozen starting model: the term is a drift penalty that
  keeps the fine-tuned encoder close to its base embeddings, logged as ``train/distill``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from runner.errors import RunnerError
from runner.losses import Loss
from runner.schema import DistillConfig


class Distillation(Loss):
    def __init__(self, base: Loss, teacher: nn.Module, cfg: DistillConfig, on_logits: bool) -> None:
        super().__init__()
        self.base, self.cfg, self.on_logits = base, cfg, on_logits
        self.family = base.family
        self.teacher = teacher.eval().requires_grad_(False)

    def prepare(self, train_labels) -> None:
        self.base.prepare(train_labels)

    def forward(self, model, batch) -> torch.Tensor:
        task_loss = self.base(model, batch)
        student = getattr(model, "module", model)  # DDP wraps the model; embed() lives on ours
        if self.on_logits:
            features = batch["features"][0]
            with torch.no_grad():
                teacher_logits = self.teacher(features).float()
            t = self.cfg.temperature
            term = F.kl_div(F.log_softmax(student(features).float() / t, -1), F.softmax(teacher_logits / t, -1),
                            reduction="batchmean") * t * t
        else:
            terms = []
            for features in batch["features"]:
                with torch.no_grad():
                    target = self.teacher.embed(features).float()
                out = student.embed(features).float()
                terms.append(F.mse_loss(out, target) if self.cfg.embedding_loss == "mse"
                             else (1 - F.cosine_similarity(out, target, dim=-1)).mean())
            term = torch.stack(terms).mean()
        self.terms = {"train/distill": term.detach(), "train/task_loss": task_loss.detach()}
        return (1 - self.cfg.alpha) * task_loss + self.cfg.alpha * term


def make_teacher(cfg: DistillConfig, student, build_encoder_model) -> tuple[nn.Module, bool]:
    """(teacher module, distil on logits?). ``build_encoder_model(name)`` builds an encoder + pooling."""
    if cfg.teacher == "self":
        return copy.deepcopy(student), False
    folder = Path(cfg.teacher)
    if (folder / "runner_model.json").exists():
        from runner.artifact import load_model

        teacher, _, meta = load_model(folder)
        has_head = meta["head"] is not None
        if has_head and student.head_outputs != meta["head"]["out_features"]:
            raise RunnerError(f"distill.teacher={cfg.teacher} has {meta['head']['out_features']} outputs, "
                              f"the student {student.head_outputs}: their label sets must match")
        return teacher, has_head and student.head_outputs is not None
    teacher = build_encoder_model(cfg.teacher)
    if teacher.encoder.config.hidden_size != student.encoder.config.hidden_size:
        raise RunnerError(f"distill.teacher={cfg.teacher}: embedding size {teacher.encoder.config.hidden_size} "
                          f"differs from the student's {student.encoder.config.hidden_size}")
    return teacher, False
