"""A saved dual encoder on files: ``runner.evaluate`` (retrieval, or zero-shot classes from ``task.prompt``) and
``runner.predict`` (image and text embeddings, zero-shot labels), through the same batches, task and metric code
as training: the numbers of a training run's test split come back on the same file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from runner.errors import RunnerError

log = logging.getLogger("runner")


def accelerator_for(meta: dict, precision: str):
    """One process on the best device, under the autocast training evaluated with (``precision=auto``)."""
    from runner.hardware import make_accelerator
    from runner.schema import Device, Precision

    chosen = meta.get("precision", "fp32") if precision == "auto" else precision
    if chosen not in ("fp32", "bf16", "fp16"):
        raise RunnerError(f"precision={precision}: use auto, fp32, bf16 or fp16")
    return make_accelerator(Device.auto, Precision(chosen), 1)


def read_split(folder: Path, meta: dict, source: str, overrides: dict, data_type: str, with_labels: bool):
    """The checked frame of an image file (``text0`` absolute image paths, ``text1`` captions, ``label``) read with
    the training run's options and ``overrides``; and how messages name it."""
    from runner.data import image_rows, read_source, reading_config, select, text_fields
    from runner.schema import IMAGE_TYPES

    data = reading_config(folder, meta, source, {**overrides, "type": data_type})
    frame, where = read_source(data, "train")
    fields = text_fields(data)
    selected = select(data, frame, where, fields, data.label_field if with_labels else None, [])
    if data.type in IMAGE_TYPES:
        selected = image_rows(data, selected, source, where, None)
    return selected, where, data


def class_names(meta: dict, frame, where: str) -> list:
    """The classes a zero-shot evaluation picks among: the saved ones (a model trained on data.type=image), or
    every distinct label of the file (a model trained on captions)."""
    saved = meta.get("labels") or []
    found = sorted({str(v).strip() for v in frame["label"].tolist()})
    if saved:
        unknown = sorted(set(found) - {str(s) for s in saved})
        if unknown:
            raise RunnerError(f"{where}: labels {unknown[:10]} are not among the model's classes {saved[:20]}")
        return list(saved)
    if len(found) < 2:
        raise RunnerError(f"{where}: zero-shot classification needs at least two classes in the label column")
    log.info("zero-shot over the file's %d classes: %s", len(found), ", ".join(found[:20]))
    return found


def evaluate(cfg, folder: Path, meta: dict, model, tokenizer) -> dict:
    """``runner.evaluate`` for a dual encoder: data.type (default: the training run's) decides retrieval
    (image_text) or zero-shot classification (image, with ``task.prompt``)."""
    import torch

    from runner import batching
    from runner.schema import DataType, TaskConfig
    from runner.tasks import make_task

    data_type = DataType(cfg.data.get("type", meta["data_type"]))
    prompt = cfg.task.get("prompt", meta.get("prompt") or TaskConfig.prompt)
    task = make_task(data_type, TaskConfig(prompt=prompt))
    overrides = {k: v for k, v in cfg.data.items() if k not in ("test", "type")}
    if not cfg.data.get("test"):
        raise RunnerError("data.test=FILE is required: the file to evaluate on")
    frame, where, data = read_split(folder, meta, cfg.data["test"], overrides, data_type.value,
                                    with_labels=data_type == DataType.image)
    labels, names = None, []
    if data_type == DataType.image:
        names = class_names(meta, frame, where)
        index = {str(n): i for i, n in enumerate(names)}
        labels = np.array([index[str(v).strip()] for v in frame["label"].tolist()], dtype=np.int64)
        captions = task.prompts(names)
        captions = [captions[i] for i in labels]
    else:
        captions = frame["text1"].tolist()
    if model.head is not None:  # a linear probe: the head on the image embeddings
        return evaluate_probe(cfg, folder, meta, model, frame, labels, names)
    settings = TextSettings(meta)
    task.prepare(tokenizer, names, settings)
    split = batching.ImageSplit(model.image_processor, tokenizer, frame["text0"].tolist(), captions, labels,
                                settings.max_length, settings.text_prefix, settings.text_padding, f"{where}: ")
    accelerator = accelerator_for(meta, cfg.precision)
    loader = batching.for_processes(batching.make_loader(split, tokenizer, cfg.batch_size or 64, train=False), accelerator)
    model = accelerator.prepare(model)
    with torch.inference_mode():
        metrics, report = task.evaluate(model, loader, accelerator, cfg.split, names, split.text_ids.numpy())
    return {"metrics": metrics, "report": report, "model_dir": str(folder), "rows": len(split)}


def evaluate_probe(cfg, folder: Path, meta: dict, model, frame, labels, names) -> dict:
    from runner.schema import TaskConfig
    from runner.tasks import LinearProbe

    predictor = DualPredictor(model, None, meta, cfg.precision)
    logits = predictor.probe_logits(predictor.embed_images(frame["text0"].tolist(), cfg.batch_size or 64))
    metrics, report = LinearProbe(TaskConfig()).score([logits.numpy()], labels, cfg.split, names)
    return {"metrics": metrics, "report": report, "model_dir": str(folder), "rows": len(frame)}


class TextSettings:
    """How the model's texts were tokenized (runner_model.json), in the shape tasks read from model.*."""

    def __init__(self, meta: dict) -> None:
        self.max_length, self.text_prefix = meta["max_length"], meta.get("text_prefix", "")
        self.text_padding = meta.get("text_padding", "longest")


class DualPredictor:
    """A saved dual encoder answering rows of images and/or texts: ``runner.predict`` and the MLflow pyfunc.

    Each row gets ``image_embedding`` / ``text_embedding``, and with classes (the model's, or given) the zero-shot
    ``label`` and ``probabilities`` of its image: a softmax over the class prompts at the model's learned
    temperature (a linear probe: over its head's classes). Images are paths or encoded image bytes (a PNG or JPEG
    file's content)."""

    def __init__(self, model, tokenizer, meta: dict, precision: str = "auto") -> None:
        self.tokenizer, self.meta, self.settings = tokenizer, meta, TextSettings(meta)
        self.accelerator = accelerator_for(meta, precision)
        self.model = model.to(self.accelerator.device)

    @classmethod
    def load(cls, folder: Path, precision: str = "auto") -> DualPredictor:
        from runner.artifact import load_model
        from runner.model import quiet_libraries

        quiet_libraries()
        model, tokenizer, meta = load_model(folder)
        return cls(model, tokenizer, meta, precision)

    def embed_images(self, images: list, batch_size: int):
        import torch

        from runner.dual import embed_images

        with torch.inference_mode(), self.accelerator.autocast():
            return embed_images(self.model, self.model.image_processor, images, batch_size, self.accelerator.device)

    def embed_texts(self, texts: list[str], batch_size: int):
        import torch

        from runner.dual import text_features

        out = []
        with torch.inference_mode(), self.accelerator.autocast():
            for i in range(0, len(texts), batch_size):
                features = text_features(self.tokenizer, texts[i:i + batch_size], self.settings.max_length,
                                         self.settings.text_padding, self.settings.text_prefix)
                out.append(self.model({k: v.to(self.accelerator.device) for k, v in features.items()}).float().cpu())
        return torch.cat(out)

    def probe_logits(self, vectors):
        """A linear probe's class logits for image embeddings (its head on them)."""
        import torch

        if self.meta.get("normalize"):
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        with torch.inference_mode():
            return self.model.head.to(vectors.device)(vectors)

    def run(self, images: list | None, texts: list[str] | None, classes: list | None = None, prompt: str | None = None,
            embeddings: bool = False, batch_size: int = 64) -> list[dict]:
        from runner.errors import check_finite_outputs
        from runner.losses import ImageTextContrastive, similarity_matrix

        probe = self.model.head is not None  # a linear probe: its own classes, from its head
        if probe and (classes or prompt):
            raise RunnerError("this model is a linear probe: its classes are its head's; drop classes= and prompt=")
        if probe and (images is None or texts is not None):
            raise RunnerError("a linear probe classifies images: give an image column, not texts")
        names = list(classes or self.meta.get("labels") or [])
        rows: list[dict] = [{} for _ in range(len(images if images is not None else texts or []))]
        if images is not None:
            vectors = self.embed_images(images, batch_size)
            check_finite_outputs([vectors.float()])
            if embeddings or not names:
                for row, vector in zip(rows, vectors):
                    row["image_embedding"] = [round(float(x), 6) for x in vector]
            if probe:
                logits = self.probe_logits(vectors).float()
            elif names:
                template = prompt or self.meta.get("prompt") or "a photo of a {}"
                if template.count("{}") != 1:
                    raise RunnerError(f"prompt={template!r}: a text with one {{}} for the class name")
                prompts = self.embed_texts([template.format(n) for n in names], batch_size)
                scale = float(self.model.logit_scale.float().exp().clamp(max=ImageTextContrastive.MAX_SCALE))
                logits = similarity_matrix(vectors, prompts) * scale
            if names:
                check_finite_outputs([logits.float()])
                for row, p in zip(rows, logits.softmax(-1)):
                    row["label"] = names[int(p.argmax())]
                    row["probabilities"] = {str(n): round(float(x), 6) for n, x in zip(names, p)}
        if texts is not None:
            text_vectors = self.embed_texts(texts, batch_size)
            check_finite_outputs([text_vectors.float()])
            for row, vector in zip(rows, text_vectors):
                row["text_embedding"] = [round(float(x), 6) for x in vector]
        return rows


def predict(cfg, folder: Path, meta: dict) -> list[dict]:
    """``runner.predict`` for a dual encoder: ``input`` (image paths in data.image_field and/or texts in
    data.text_field) or ``text=``; rows as :class:`DualPredictor` gives them, with their image path and text."""
    if cfg.text is not None:
        if cfg.input is not None:
            raise RunnerError("give input=FILE or text=..., not both")
        images, texts = None, [cfg.text]
    elif cfg.input is None:
        raise RunnerError("give input=FILE (a table with an image column, a text column, or both) or text=...")
    else:
        images, texts = columns_of(folder, meta, cfg)
        if meta.get("head") and images is not None:
            texts = None  # a linear probe reads the images only (a caption column beside them is not its input)
    rows = DualPredictor.load(folder, cfg.precision).run(images, texts, cfg.classes, cfg.prompt, cfg.embeddings,
                                                   cfg.batch_size)
    given = [("image", images), ("text", texts)]
    return [{**{k: v[i] for k, v in given if v is not None}, **row} for i, row in enumerate(rows)]


def columns_of(folder: Path, meta: dict, cfg) -> tuple[list[str] | None, list[str] | None]:
    """The image paths and/or texts of a predict input: whichever of data.image_field / data.text_field it has,
    read once; with both, a row skipped for its image (data.bad_images=skip) drops its text too."""
    from runner.data import image_rows, read_source, reading_config, select, text_fields
    from runner.schema import DataType

    data = reading_config(folder, meta, cfg.input, {**cfg.data, "type": "image_text"})
    frame, where = read_source(data, "train")
    has_images, has_texts = data.image_field in frame.columns, data.text_field in frame.columns
    if not (has_images or has_texts):
        raise RunnerError(f"{where}: no column {data.image_field!r} (data.image_field) or {data.text_field!r} "
                          f"(data.text_field); the file has columns {list(frame.columns)}")
    data.type = DataType.image_text if has_images and has_texts else DataType.image if has_images else DataType.single
    selected = select(data, frame, where, text_fields(data), None, [])
    if has_images:
        selected = image_rows(data, selected, cfg.input, where, None)
    columns = [selected[f"text{i}"].tolist() for i in range(len(text_fields(data)))]
    return (columns[0] if has_images else None), (columns[-1] if has_texts else None)
