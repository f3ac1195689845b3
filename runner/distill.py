"""Knowledge distillation as a loss wrapper: ``(1 - alpha) * task loss + alpha * distillation term``.

- a teacher with a head (a saved runner model folder) and a student with logits: KL divergence of the
  temperature-softened distributions, times ``T^2`` (Hinton et al. 2015);
- otherwise, on sentence embeddings: MSE (or 1 - cosine) between student and teacher embeddings of
  every text column. ``teacher=self`` is the frozen starting model: the term is a drift penalty that
  keeps the fine-tuned encoder close to its base embeddings, logged as ``train/distill``;
- a dual encoder (images and captions): :class:`ImageTextDistillation`, the teacher's in-batch image -> caption
  and caption -> image similarity distributions (CLIP-KD), so teacher and student may embed in other sizes.
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


class ImageTextDistillation(Loss):
    """``(1 - alpha) * image-text loss + alpha * KL(teacher || student)`` on the batch's similarity distributions,
    both directions, softened by ``distill.temperature``: the student learns which captions the teacher finds
    close to each image (and the other way round), whatever the embedding sizes. Teacher and student read the
    same pixels and token ids: the teacher must share the student's image processor settings and tokenizer."""

    family = "image_text"

    def __init__(self, base: Loss, teacher: nn.Module, cfg: DistillConfig) -> None:
        super().__init__()
        from runner.losses import GradCache, ImageTextContrastive

        if not isinstance(base, ImageTextContrastive) or isinstance(base, GradCache):
            raise RunnerError("distillation of a dual encoder works with loss=clip or loss=siglip (not GradCache)")
        self.base, self.cfg = base, cfg
        self.teacher = teacher.eval().requires_grad_(False)

    def prepare(self, train_labels) -> None:
        self.base.prepare(train_labels)

    def forward(self, model, batch) -> torch.Tensor:
        from runner.losses import similarity_matrix, temperature

        images, texts = [model(f).float() for f in batch["features"]]
        scale, bias = temperature(model)
        task_loss = self.base.compute(images, texts, batch["text_ids"], scale, bias)
        with torch.no_grad():
            teacher = similarity_matrix(*[self.teacher(f).float() for f in batch["features"]])
        student = similarity_matrix(images, texts)
        t = self.cfg.temperature * 0.01  # cosines span [-1, 1]: T = 2 softens them as logits at CLIP's scale 100 / 2
        term = sum(F.kl_div(F.log_softmax(s / t, -1), F.softmax(q / t, -1), reduction="batchmean")
                   for s, q in ((student, teacher), (student.T, teacher.T))) / 2
        self.terms = {"train/distill": term.detach(), "train/task_loss": task_loss.detach()}
        return (1 - self.cfg.alpha) * task_loss + self.cfg.alpha * term


def dual_teacher(cfg: DistillConfig, student, processor, tokenizer) -> nn.Module:
    """The teacher of a dual encoder: ``self`` (the starting model: a drift penalty), a saved runner dual folder, or
    a transformers dual encoder folder or hub id; checked to read the student's inputs."""
    if cfg.teacher == "self":
        return copy.deepcopy(student)
    from runner import reuse

    # checked before the run opens (runner.job) and used when training starts: loaded once
    teacher, teacher_processor, teacher_tokenizer = reuse.shared("dual-teacher", [cfg.teacher],
                                                                 lambda: load_dual_teacher(cfg.teacher), cfg.teacher)
    if teacher_processor.to_dict() != processor.to_dict():
        raise RunnerError(f"distill.teacher={cfg.teacher} preprocesses images otherwise than the student (its "
                          f"preprocessor_config.json differs): both must read the same pixels")
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise RunnerError(f"distill.teacher={cfg.teacher} has another tokenizer than the student: both must read the "
                          f"same token ids")
    return copy.deepcopy(teacher)


def load_dual_teacher(name: str):
    """(teacher, its image processor, its tokenizer) of a runner dual folder, a transformers folder or a hub id."""
    from runner import dual
    from runner.images import load_processor
    from runner.schema import ModelConfig

    folder = Path(name)
    if (folder / "runner_model.json").exists():
        from runner.artifact import load_model

        teacher, teacher_tokenizer, meta = load_model(folder)
        if meta.get("kind") != "dual":
            raise RunnerError(f"distill.teacher={name} is a text model: a dual encoder learns from a dual encoder")
        return teacher, teacher.image_processor, teacher_tokenizer
    from transformers import AutoTokenizer

    teacher = dual.DualModel(dual.load_dual(ModelConfig(name_or_path=name), 0))
    return teacher, load_processor(name, None), AutoTokenizer.from_pretrained(name)
