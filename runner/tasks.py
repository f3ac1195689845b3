"""Tasks: what a run learns from its data. A task decides the batch layout (one joint sequence or one
sequence per text), whether the model has a head, the default loss and the metrics.

=================  ==============  ==========  ============  ======================================
data.type          architecture    target      task          metrics (``split/name``)
=================  ==============  ==========  ============  ======================================
single             -               class       Classify      accuracy, f1/precision/recall, mcc, loss
single             -               multi       MultiLabel    f1_micro/macro, precision, recall, exact match
single / pair      cross           score       Regress       pearson, spearman, mse
pair               cross           class       Classify      as single
pair               bi              score/0-1   PairSimilar   pearson, spearman (of the similarity)
triplet            -               -           Retrieve      triplet_accuracy, mrr_at_10, recall_at_1/10, ndcg_at_10
image_text         dual encoder    -           ImageText     i2t/t2i recall_at_1/5/10, mrr, mean_recall
image              dual encoder    class       ZeroShot      accuracy, f1 ... (class prompts, task.prompt)
image, head_only   dual encoder    class       LinearProbe   as single (a linear head on frozen image embeddings)
=================  ==============  ==========  ============  ======================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runner.errors import RunnerError
from runner.schema import Architecture, DataType, Target, TaskConfig


@dataclass
class Task:
    cfg: TaskConfig
    # class attributes, not dataclass fields: subclasses set them
    target = "class"  # how data.py encodes labels: class, score, multi_label or none
    joint = True  # pairs tokenized as one sequence (cross-encoder)
    has_head = True
    loss_family = "logits"
    default_loss = None  # a conf/loss-style node, used when loss=null
    default_objective = None  # the objective when objective.metric is the default and not a metric of this task
    metric_names = ()
    images = False  # the first column holds images (a dual encoder, runner/dual.py)

    @property
    def output_columns(self) -> int | None:
        """How many input columns evaluation runs the model on: the first (a head on it), or all (None)."""
        return 1 if self.has_head else None

    def num_outputs(self, label_names: list) -> int | None:
        return len(label_names)

    def metrics_for(self, label_names: list) -> tuple[str, ...]:
        """The metric names this task reports for these labels (without the ``split/`` prefix)."""
        return self.metric_names

    def prepare(self, tokenizer, label_names: list, model_cfg) -> None:
        """Anything evaluation needs besides the split itself, computed once per model (zero-shot class prompts)."""

    def check_labels(self, label_names: list) -> None:
        """Raise if a task setting does not fit the data's labels (before any model loads)."""

    def scale_targets(self, labels: np.ndarray | None) -> np.ndarray | None:
        return labels

    @torch.no_grad()
    def outputs(self, model, loader, accelerator) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Model outputs per text column (logits, or embeddings) and targets, in dataset order."""
        was_training = model.training
        model.eval()
        columns, labels, index, has_labels = None, [], [], False
        for batch in loader:
            has_labels = "labels" in batch  # triplets have none: their positives are the targets
            outs = [model(f).float().cpu() for f in batch["features"][: self.output_columns]]
            columns = [[] for _ in outs] if columns is None else columns
            for store, out in zip(columns, outs):
                store.append(out)
            labels.append((batch["labels"] if has_labels else batch["index"]).cpu())
            index.append(batch["index"].cpu())
        model.train(was_training)
        # each process scored its share of every batch (runner.batching.ShardedBatches): gathered once,
        # the repeats that topped up a short batch dropped by dataset index, back in dataset order
        shards = [(torch.cat(index), torch.cat(labels), [torch.cat(c) for c in columns])]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            shards = gather_object(shards)
        index = torch.cat([s[0] for s in shards]).numpy()
        _, first = np.unique(index, return_index=True)  # sorted by dataset index, each row once
        columns = [torch.cat([s[2][c] for s in shards]).numpy()[first] for c in range(len(shards[0][2]))]
        return columns, (torch.cat([s[1] for s in shards]).numpy()[first] if has_labels else None)

    def evaluate(self, model, loader, accelerator, split: str, label_names: list, text_ids=None, report: bool = True):
        """(metrics keyed ``split/name``, per-class report or None) of a model on a loader; ``report=False``
        skips the per-class report (an evaluation during training: only the final one is kept)."""
        columns, labels = self.outputs(model, loader, accelerator)
        return self.score(columns, labels, split, label_names, text_ids, report=report)

    def score(self, columns: list[np.ndarray], labels, split: str, label_names: list, text_ids=None, report: bool = True):
        """Metrics of model outputs (head outputs, or one embedding per text column) against the targets;
        shared by training's evaluations and ``runner.evaluate``."""
        raise NotImplementedError


class Classify(Task):
    default_loss = {"_target_": "runner.losses.CrossEntropy"}
    metric_names = ("accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro", "mcc", "loss")

    def metrics_for(self, label_names):
        return self.metric_names + (("f1", "precision", "recall") if len(label_names) == 2 else ())  # of the positive class

    def check_labels(self, label_names: list) -> None:
        self.positive_index(label_names)

    def positive_index(self, label_names: list) -> int:
        """The class whose binary F1/precision/recall are reported: task.positive_label, else the second."""
        wanted = self.cfg.positive_label
        if wanted is None:
            return 1
        if len(label_names) != 2:
            raise RunnerError(f"task.positive_label={wanted!r} applies to two classes; this data has {len(label_names)} "
                              f"({label_names}): drop it (macro averages are reported)")
        names = [str(n) for n in label_names]
        if str(wanted).strip() not in names:
            raise RunnerError(f"task.positive_label={wanted!r} is not a label of the training data: {label_names}")
        return names.index(str(wanted).strip())

    def score(self, columns, labels, split, label_names, text_ids=None, report=True):
        from runner.metrics import class_report, classification_metrics

        [logits] = columns
        positive = self.positive_index(label_names) if len(label_names) == 2 else None
        return (classification_metrics(logits, labels, split, positive),
                class_report(logits, labels, label_names) if report else None)


class MultiLabel(Task):
    target = "multi_label"
    default_loss = {"_target_": "runner.losses.BinaryCrossEntropy"}
    metric_names = ("f1_micro", "f1_macro", "precision_micro", "recall_micro", "exact_match", "loss")

    def score(self, columns, labels, split, label_names, text_ids=None, report=True):
        from runner.metrics import multilabel_metrics

        [logits] = columns
        return multilabel_metrics(logits, labels, self.cfg.threshold, split), None


class Regress(Task):
    target = "score"
    default_loss = {"_target_": "runner.losses.MeanSquaredError"}
    metric_names = ("pearson", "spearman", "mse")

    def num_outputs(self, label_names):
        return 1

    def scale_targets(self, labels):
        return scale_scores(labels, self.cfg.score_range)

    def score(self, columns, labels, split, label_names, text_ids=None, report=True):
        from runner.metrics import correlation_metrics

        [scores] = columns
        return correlation_metrics(scores[:, 0], labels, split, mse=True), scatter_points(scores[:, 0], labels, "predicted")


class EmbeddingTask(Task):
    """No head: the model's output is the sentence embedding; each text column is encoded alone."""

    joint = False
    has_head = False

    def num_outputs(self, label_names):
        return None


class PairSimilarity(EmbeddingTask):
    target = "score"
    loss_family = "pair"
    default_loss = {"_target_": "runner.losses.CoSENT"}
    metric_names = ("pearson", "spearman")

    def scale_targets(self, labels):
        return scale_scores(labels, self.cfg.score_range)

    def score(self, columns, labels, split, label_names, text_ids=None, report=True):
        from runner.losses import paired_similarity
        from runner.metrics import correlation_metrics

        a, b = columns
        sims = paired_similarity(torch.from_numpy(a), torch.from_numpy(b), self.cfg.similarity.value).numpy()
        return correlation_metrics(sims, labels, split), scatter_points(sims, labels, f"{self.cfg.similarity.value} similarity")


class Retrieve(EmbeddingTask):
    target = "none"
    loss_family = "triplet"
    default_loss = {"_target_": "runner.losses.MultipleNegativesRanking"}
    metric_names = ("triplet_accuracy", "mrr_at_10", "recall_at_1", "recall_at_10", "ndcg_at_10")

    def score(self, columns, labels, split, label_names, text_ids=None, report=True):
        from runner.metrics import retrieval_metrics

        return retrieval_metrics(columns, text_ids, self.cfg.similarity.value, split), None


class ImageText(EmbeddingTask):
    """Images and captions (a dual encoder): retrieval of each image's caption among the split's distinct
    captions and back (runner.metrics.image_text_metrics)."""

    target = "none"
    loss_family = "image_text"
    images = True
    default_loss = {"_target_": "runner.losses.ImageTextContrastive", "kind": "auto", "gather_across_ranks": True}
    default_objective = "val/mean_recall"
    metric_names = ("i2t_recall_at_1", "i2t_recall_at_5", "i2t_recall_at_10", "i2t_mrr", "t2i_recall_at_1",
                    "t2i_recall_at_5", "t2i_recall_at_10", "t2i_mrr", "mean_recall")

    def score(self, columns, labels, split, label_names, text_ids=None, report=True):
        from runner.metrics import image_text_metrics

        return image_text_metrics(columns[0], columns[1], text_ids, split), None


class ZeroShot(ImageText):
    """Images and their classes: trained as images against their class prompts (``task.prompt``, "a photo of a
    {}" with the class name), scored by picking, for each image, the most similar of every class's prompt."""

    target = "class"
    default_objective = None  # accuracy, the default objective, is a metric of this task
    metric_names = Classify.metric_names

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__(cfg)
        self.class_texts = None  # the tokenized prompt of every class, set by prepare()

    @property
    def output_columns(self) -> int | None:
        return 1  # the images: the class prompts are embedded once per evaluation

    def metrics_for(self, label_names):
        return Classify.metrics_for(self, label_names)

    def prompts(self, label_names: list) -> list[str]:
        return [self.cfg.prompt.format(name) for name in label_names]

    def prepare(self, tokenizer, label_names: list, model_cfg) -> None:
        """The tokenized prompt of every class, in label order."""
        from runner.dual import text_features

        self.class_texts = text_features(tokenizer, self.prompts(label_names), model_cfg.max_length,
                                         model_cfg.text_padding, model_cfg.text_prefix)

    def outputs(self, model, loader, accelerator):
        (images,), labels = super().outputs(model, loader, accelerator)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            classes = model({k: v.to(accelerator.device) for k, v in self.class_texts.items()}).float().cpu()
        model.train(was_training)
        from runner.losses import similarity_matrix

        # cosine similarities as logits, at CLIP's scale of 100: the reported loss is then comparable across runs
        return [(similarity_matrix(torch.from_numpy(images), classes) * 100).numpy()], labels

    def score(self, columns, labels, split, label_names, text_ids=None, report=True):
        return Classify.score(self, columns, labels, split, label_names, text_ids, report)

    def positive_index(self, label_names: list) -> int:
        return Classify.positive_index(self, label_names)


class LinearProbe(Classify):
    """Images and their classes with every tower frozen (``mode=head_only``): a linear classifier on the image
    tower's embeddings, computed once per image through the feature cache (runner.image_features)."""

    images = True


def scatter_points(predicted: np.ndarray, true: np.ndarray, name: str) -> dict:
    """What the predicted-vs-true picture of a split needs (runner/report.py)."""
    return {"predicted": [round(float(x), 5) for x in predicted], "true": [round(float(x), 5) for x in true],
            "predicted_name": name}


def scale_scores(labels: np.ndarray | None, score_range) -> np.ndarray | None:
    """Map scores from ``task.score_range`` (e.g. [0, 5]) to [0, 1]."""
    if labels is None or not score_range:
        return labels
    low, high = score_range
    return ((labels - low) / (high - low)).astype(np.float32)


def make_task(data_type: DataType, cfg: TaskConfig, frozen: bool = False) -> Task:
    """The task for a data type, architecture and target (a lookup table, see the module docstring); ``frozen``:
    the mode trains no encoder weight (image classes are then a linear probe)."""
    if data_type == DataType.triplet:
        return Retrieve(cfg)
    if data_type == DataType.image_text:
        return ImageText(cfg)
    if data_type == DataType.image:
        if cfg.multi_label or cfg.target == Target.score:
            raise RunnerError("data.type=image is classification by class prompts: drop task.multi_label / task.target")
        return LinearProbe(cfg) if frozen else ZeroShot(cfg)
    if data_type == DataType.pair and cfg.architecture == Architecture.bi:
        if cfg.multi_label:
            raise RunnerError("task.multi_label needs a head: use task.architecture=cross for pairs")
        return PairSimilarity(cfg)
    if cfg.target == Target.score:
        return Regress(cfg)
    return MultiLabel(cfg) if cfg.multi_label else Classify(cfg)
