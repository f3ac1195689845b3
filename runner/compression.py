"""Compressed inputs read as their inner format: ``train.csv.gz`` is a csv, ``reviews.txt.zst`` a lines file.

The compression is recognised by the file's first bytes (a gzip file named ``.csv`` is still gzip), and
by its extension for ``.zip`` (whose signature is also that of .xlsx/.docx files, which are refused). A
zip archive must hold exactly one file. Every raw read of a data file goes through :func:`open_binary`.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import zipfile
from pathlib import Path

from runner.errors import DataError

ZIP_MAGIC = b"PK\x03\x04"


def open_zstd(path: str):
    try:
        import zstandard
    except ImportError as err:  # a dependency of the runner; only a broken install lacks it
        raise DataError(f"{path} is zstd-compressed and the zstandard package is missing: pip install zstandard") from err
    # buffered: the stream reader alone cannot iterate lines
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), 1 << 20)


# signature -> (name, opener): what a compressed file's first bytes say it is
MAGIC = {b"\x1f\x8b": ("gzip", lambda p: gzip.open(p, "rb")), b"BZh": ("bzip2", lambda p: bz2.open(p, "rb")),
         b"\xfd7zXZ\x00": ("xz", lambda p: lzma.open(p, "rb")), b"\x28\xb5\x2f\xfd": ("zstd", open_zstd)}
SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd", ".zip": "zip"}


def compression(path: str) -> str | None:
    """gzip, bzip2, xz, zstd, zip, or None for a plain file."""
    with open(path, "rb") as f:
        head = f.read(6)
    kind = next((name for magic, (name, _) in MAGIC.items() if head.startswith(magic)), None)
    if kind is None and head.startswith(ZIP_MAGIC) and Path(path).suffix.lower() == ".zip":
        kind = "zip"
    return kind


def zip_member(path: str, archive: zipfile.ZipFile | None = None) -> str:
    """The one file of a single-file zip archive (folders and macOS resource forks aside)."""
    if archive is None:
        try:
            with zipfile.ZipFile(path) as archive:
                return zip_member(path, archive)
        except zipfile.BadZipFile as err:
            raise DataError(f"{path} is not a readable zip archive ({err})") from err
    names = [i.filename for i in archive.infolist()
             if not i.is_dir() and not i.filename.startswith("__MACOSX/") and not Path(i.filename).name.startswith(".")]
    if len(names) != 1:
        raise DataError(f"{path}: a zip archive is read when it holds exactly one file; it holds {len(names)} "
                        f"({names[:5]}): extract it and give the file (or the folder) instead")
    return names[0]


def open_binary(path: str):
    """The file's bytes, decompressed when it is compressed (a readable binary stream; close it)."""
    kind = compression(path)
    if kind == "zip":
        with zipfile.ZipFile(path) as archive:  # the open member keeps the file open (zipfile counts its users)
            return archive.open(zip_member(path, archive))
    if kind is not None:
        return next(opener for name, opener in MAGIC.values() if name == kind)(path)
    return open(path, "rb")


def inner_name(path: str) -> str:
    """The name whose extension says the format: ``a.csv.gz`` -> ``a.csv``; a zip's member name."""
    kind = compression(path)
    if kind == "zip":
        return zip_member(path)
    if kind is not None and Path(path).suffix.lower() in SUFFIXES:
        return str(Path(path).with_suffix(""))
    return path


def decompress_bytes(data: bytes) -> bytes:
    """An in-memory file (one file of a folder) decompressed when its first bytes say it is."""
    for magic, (name, _) in MAGIC.items():
        if data.startswith(magic):
            if name == "zstd":
                import zstandard

                return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
            return {"gzip": gzip.decompress, "bzip2": bz2.decompress, "xz": lzma.decompress}[name](data)
    return data


def plain_file(path: str, cache: Path) -> str:
    """A file as readers that map or parse a path need it: a plain file itself; a compressed one's plain copy in
    ``cache``, made once per file version (name, size and modification time)."""
    if compression(path) is None:
        return path
    stat = os.stat(path)
    import hashlib

    key = hashlib.sha256(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache / "decompressed" / f"{key}-{Path(inner_name(path)).name}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".{os.getpid()}.part")
        with open_binary(path) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(partial, target)
    return str(target)
