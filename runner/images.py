"""Images as inputs: a column of paths (relative to the data file's folder), checked before a run starts, decoded
and preprocessed in the loader workers by the model's own image processor, never all held in memory.

An image the runner cannot read is an input error naming the file, the row and the column
(``data.bad_images=error``), or a skipped row counted in the log and in ``data_sources.json``
(``data.bad_images=skip``). The processor is built from the model folder's ``preprocessor_config.json`` (or
``model.image_processor``) through an explicit table of processor classes: the file names a class, it is
never imported by name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from runner.errors import DataError, RunnerError

log = logging.getLogger("runner")
PROCESSOR_FILE = "preprocessor_config.json"
CONFIG_LIMIT = 1 << 20  # a processor config is a few hundred bytes; a crafted one is not read whole


def processor_classes() -> dict:
    """Processor type (as preprocessor_config.json names it) -> the class that builds it. The PIL versions: the
    torchvision-backed ones need a torchvision build matching torch, and compute the same numbers."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil, ViTImageProcessorPil

    table = {"CLIPImageProcessor": CLIPImageProcessorPil, "SiglipImageProcessor": SiglipImageProcessorPil,
             "ViTImageProcessor": ViTImageProcessorPil}
    table.update({f"{name}Pil": cls for name, cls in list(table.items())})
    table.update({f"{name}Fast": cls for name, cls in list(table.items()) if not name.endswith("Pil")})
    return table


def load_processor(folder: str | None, settings: dict | None):
    """The image processor of a model folder (its preprocessor_config.json), or one built from ``settings``
    (``model.image_processor``: ``type`` plus the processor's arguments) for a model built from a config. A key the
    processor does not take is an error in ``settings`` (it would be ignored); in a folder's file, where other
    transformers versions write keys of their own, it is left out."""
    from runner import trust

    if settings:
        options = dict(settings)
        return built_processor(options.pop("type", None), options, "model.image_processor", strict=True)
    path = Path(os.path.expanduser(folder or "")) / PROCESSOR_FILE
    if not folder or not path.is_file():
        raise RunnerError(f"no {PROCESSOR_FILE} in {folder}: the model folder must hold its image processor's "
                          f"settings, or set model.image_processor (type: CLIPImageProcessor, SiglipImageProcessor or "
                          f"ViTImageProcessor, plus size, image_mean, image_std)")
    options = trust.read_json(path, CONFIG_LIMIT)
    if not isinstance(options, dict):
        raise RunnerError(f"{path} is not a JSON object")
    return built_processor(options.pop("image_processor_type", None), options, str(path), strict=False)


def built_processor(kind, options: dict, where: str, strict: bool):
    """The processor class of ``kind`` (from the table) built with the ``options`` it takes."""
    cls = processor_class(kind, where)
    allowed = set(cls.valid_kwargs.__annotations__)
    unknown = sorted(set(options) - allowed)
    if strict and unknown:
        raise RunnerError(f"{where}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a setting of "
                          f"{kind}; its settings are {', '.join(sorted(allowed))}")
    return cls(**{k: v for k, v in options.items() if k in allowed})


def processor_for(cfg) -> object:
    """The image processor of a run's dual encoder (``cfg``: its ModelConfig): the model folder's, or
    ``model.image_processor``'s (a model built from a config, LiT's vision tower), read once per process."""
    from runner import reuse

    if not cfg.image_processor and (cfg.vision_init or cfg.random_init):
        raise RunnerError("a dual encoder built from a config needs model.image_processor (type and sizes: see "
                          "conf/model/lit.yaml)")
    return reuse.shared("image-processor", [cfg.name_or_path, cfg.image_processor, cfg.vision_init],
                        lambda: load_processor(cfg.name_or_path, cfg.image_processor), cfg.name_or_path)


def processor_class(kind, where: str):
    table = processor_classes()
    if kind not in table:
        raise RunnerError(f"{where}: image processor {str(kind)[:80]!r} is not one the runner offers; use one of "
                          f"{', '.join(sorted(k for k in table if not k.endswith(('Pil', 'Fast'))))}")
    return table[kind]


def processor_type(processor) -> str:
    """The name preprocessor_config.json gives this processor (the class transformers loads it as)."""
    return type(processor).__name__.removesuffix("Pil")


def save_processor(processor, folder: Path) -> None:
    """preprocessor_config.json as transformers writes it, naming the class transformers loads (not its PIL twin)."""
    import json

    processor.save_pretrained(folder)
    path = folder / PROCESSOR_FILE
    saved = json.loads(path.read_text())
    saved["image_processor_type"] = processor_type(processor)
    path.write_text(json.dumps(saved, indent=2))


# ---- images stored inside a dataset (datasets' Image feature: a struct of bytes and path) ---------------------

MAGIC = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"GIF8": ".gif", b"RIFF": ".webp", b"BM": ".bmp"}


def embedded_to_files(table, column: str, cache: Path):
    """``table`` with the image column of a hub or save_to_disk dataset (``{bytes, path}`` structs) turned into
    paths: each image's bytes written once to ``cache/images/<sha256>.<ext>`` (a file of that content is reused),
    a chunk at a time, so the images are never all in memory; rows without bytes keep their path. Other tables
    are returned as they are."""
    import hashlib

    import pyarrow as pa

    if column not in table.column_names:
        return table
    kind = table.schema.field(column).type
    if not (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0):
        return table
    folder = cache / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths, written = [], 0
    for chunk in table.column(column).chunks:
        blobs, names = chunk.field("bytes"), chunk.field("path") if kind.get_field_index("path") >= 0 else None
        for i in range(len(chunk)):
            blob = blobs[i].as_py()
            if blob is None:
                paths.append(names[i].as_py() if names is not None else None)
                continue
            digest = hashlib.sha256(blob).hexdigest()
            target = folder / f"{digest}{next((e for m, e in MAGIC.items() if blob.startswith(m)), '.img')}"
            if not target.exists():
                partial = target.with_suffix(f".{os.getpid()}.tmp")
                partial.write_bytes(blob)
                os.replace(partial, target)  # whole or absent: parallel jobs may write the same image
                written += 1
            paths.append(str(target))
    log.info("data: %d images stored in the dataset's %r column, as files in %s (%d new)", len(paths), column, folder,
             written)
    return table.set_column(table.column_names.index(column), column, pa.array(paths, pa.string()))


# ---- checking the image column of a split ------------------------------------------------------------------

def checked_paths(values: list, base: str, where: str, column, policy: str, row_number) -> tuple[list[str], np.ndarray, dict]:
    """Absolute paths of an image column and the rows to keep. A missing, empty, non-file or unreadable image
    is an error naming file, row and column, or (``policy=skip``) a dropped row counted by reason."""
    from PIL import Image

    paths, keep, skipped = [], np.ones(len(values), dtype=bool), {}
    for row, value in enumerate(values):
        path = os.path.normpath(os.path.join(base, os.path.expanduser(str(value).strip())))
        problem = image_problem(path, Image)
        if problem:
            if policy != "skip":
                raise DataError(f"{where}: row {row_number(row)}, column {column!r}: {value}: {problem} (fix or remove "
                                f"the row, or skip such rows with data.bad_images=skip)")
            keep[row] = False
            reason = f"unreadable images (data.bad_images=skip): {problem.split(':')[0]}"
            skipped[reason] = skipped.get(reason, 0) + 1
        paths.append(path)
    if skipped:
        log.warning("%s: %d rows with unreadable images skipped (%s)", where, int((~keep).sum()),
                    ", ".join(f"{k.split(': ', 1)[1]}: {v}" for k, v in skipped.items()))
    return paths, keep, skipped


def image_problem(path: str, Image) -> str | None:
    """Why ``path`` is not a readable image, or None. Cheap: headers and (PNG) chunk checksums, no decoding."""
    if not os.path.exists(path):
        return f"no such file ({path})"
    if os.path.isdir(path):
        return f"is a directory, not an image file ({path})"
    if not os.path.isfile(path):
        return f"not a regular file ({path})"
    if os.path.getsize(path) == 0:
        return f"empty file, 0 bytes ({path})"
    try:
        with Image.open(path) as image:
            image.verify()  # structure and checksums: a truncated or corrupt PNG fails here
    except Exception as err:  # noqa: BLE001  PIL raises many kinds for a bad file
        return f"not a readable image ({type(err).__name__}: {str(err)[:120]}) ({path})"
    return None


def rgb(image, Image):
    """RGB pixels; transparent ones on white (as transformers' convert_to_rgb): RGBA emoji on black lose shape."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# ---- decoding, in the loader workers -------------------------------------------------------------------------

def pixel_values(processor, paths: list, rows: list[int] | None = None, where: str = "") -> torch.Tensor:
    """The model's input tensor for these images (paths, or an image file's bytes): decoded to RGB, then
    resized/cropped/normalized by ``processor``."""
    import io

    from PIL import Image

    images = []
    for i, path in enumerate(paths):
        try:
            with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:
                image.load()  # the pixels are read here: the file closes at the end of the block
                images.append(rgb(image, Image))
        except Exception as err:  # noqa: BLE001  changed on disk since it was checked, or broken past its header
            row = f"row {rows[i]}: " if rows is not None else ""
            path = f"image {i + 1} of the request" if isinstance(path, bytes) else path
            raise DataError(f"{where}{row}{path}: cannot decode this image ({type(err).__name__}: {str(err)[:120]})") from err
    return processor(images=images, return_tensors="pt")["pixel_values"]
