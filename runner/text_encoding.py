"""Bytes to text: ``data.encoding`` names the codec, or ``auto`` detects the encoding of files that are not UTF-8.

Detection: text that is not UTF-8 is most often Western European in Windows-1252 (a superset of
Latin-1's letters), which statistical detectors confuse with Baltic and Central European code pages on
short texts (charset-normalizer reads "naïve" as cp1257's "naļve"). So a sample that decodes as cp1252 to
mostly ASCII letters with a few accented ones is cp1252; anything else (Cyrillic, Greek, ... where every
letter is outside ASCII) is charset-normalizer's best guess. What was assumed is logged with a confidence.
An undecodable byte is named by its offset and line, with the likely encoding to set.
"""

from __future__ import annotations

import codecs
import logging

from runner.errors import DataError

log = logging.getLogger("runner")
AUTO = "auto"
CHUNK = 1 << 22


def normalized(encoding: str) -> str:
    """The codec name as Python knows it (``UTF8`` -> ``utf-8``, ``latin1`` -> ``iso8859-1``)."""
    try:
        return codecs.lookup(encoding).name
    except LookupError as err:
        raise DataError(f"data.encoding={encoding!r} is not an encoding Python knows: use utf-8, latin-1, cp1252, "
                        f"utf-16, ... or auto (detected)") from err


def reading_codec(encoding: str) -> str:
    """UTF-8 is read as utf-8-sig: a byte-order mark is not text."""
    return "utf-8-sig" if normalized(encoding) == "utf-8" else encoding


def first_undecodable(stream, encoding: str) -> tuple[int, int, bytes] | None:
    """(byte offset, 1-based line, the bad bytes) of the first byte sequence ``encoding`` cannot decode, or None.

    Offsets count from the start of the (decompressed) file; the decoder's pending bytes (a sequence split
    between two reads) are accounted for, so the offset is exact however the file is read.
    """
    decoder = codecs.getincrementaldecoder(reading_codec(encoding))()
    consumed, newlines = 0, 0
    while True:
        chunk = stream.read(CHUNK)
        pending = decoder.getstate()[0] if hasattr(decoder, "getstate") else b""
        try:
            decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as err:
            window = bytes(pending) + chunk
            offset = consumed - len(pending) + err.start
            return offset, newlines + window[:err.start].count(b"\n") + 1, window[err.start:err.end]
        if not chunk:
            return None
        consumed += len(chunk)
        newlines += chunk.count(b"\n")


def western(sample: bytes) -> tuple[str, float] | None:
    """(cp1252 or latin-1, the share of ASCII among the letters) when ``sample`` reads as Western European text:
    at least half its letters ASCII. cp1252 first (curly quotes, dashes, the euro sign); latin-1 when a byte
    is unassigned in cp1252 (0x81, 0x8D, 0x8F, 0x90, 0x9D: Latin-1 files with stray control bytes, as in old
    Usenet posts). None otherwise: Cyrillic or Greek bytes read this way give words of accented letters only
    ("Ïðèâåò"), a share near 0."""
    for encoding in ("cp1252", "latin-1"):
        try:
            text = sample.decode(encoding)
        except UnicodeDecodeError:
            continue
        letters = [c for c in text if c.isalpha()]
        if not letters:
            return None
        share = sum(c.isascii() for c in letters) / len(letters)
        return (encoding, share) if share >= 0.5 else None
    return None


def guess(sample: bytes) -> tuple[str, float]:
    """(encoding, confidence in 0..1) of bytes that are not UTF-8."""
    found = western(sample)
    if found is not None:
        return found[0], round(found[1], 3)
    import charset_normalizer

    best = charset_normalizer.from_bytes(sample).best()
    if best is None:
        return "latin-1", 0.0  # every byte is a latin-1 character: the only codec that cannot fail
    return best.encoding, round(1.0 - best.chaos, 3)


def sample_around(read_at, offset: int) -> bytes:
    """The file's first MB and 64 KB around ``offset``: what detection sees (the bad bytes may come late)."""
    head = read_at(0, 1 << 20)
    return head if offset < len(head) else head + b"\n" + read_at(max(0, offset - 32768), 65536)


def detect(name: str, open_stream) -> str:
    """The encoding of a file for ``data.encoding=auto``: utf-8 when it decodes as such, else a guess that must
    decode the whole file. ``open_stream()`` gives a fresh binary stream of the (decompressed) file."""
    with open_stream() as stream:
        bad = first_undecodable(stream, "utf-8")
    if bad is None:
        return "utf-8"

    def read_at(start: int, size: int) -> bytes:
        with open_stream() as stream:
            stream.read(start)  # compressed streams cannot seek cheaply; skipping is a read
            return stream.read(size)

    encoding, confidence = guess(sample_around(read_at, bad[0]))
    with open_stream() as stream:
        still = first_undecodable(stream, encoding)
    if still is not None:
        raise DataError(f"{name}: data.encoding=auto guessed {encoding} (from the bytes at offset {bad[0]:,}), but byte "
                        f"{still[0]:,} (line {still[1]}) is not valid {encoding} either ({still[2]!r}): set "
                        f"data.encoding to the file's encoding")
    log.info("%s: not UTF-8 (byte %s, line %d); read as %s (data.encoding=auto, confidence %.2f)", name,
             f"{bad[0]:,}", bad[1], encoding, confidence)
    return encoding


def not_decodable(name: str, encoding: str, open_stream) -> DataError:
    """The error for a file that does not decode: where (byte offset and line), and what to set."""
    with open_stream() as stream:
        bad = first_undecodable(stream, encoding)
    if bad is None:  # the parser failed elsewhere (it decodes in chunks): no offset to give
        return DataError(f"{name}: is not valid {encoding} text; set data.encoding (or data.encoding=auto)")
    offset, line, raw = bad
    with open_stream() as stream:
        stream.read(max(0, offset - 32768))
        nearby = stream.read(65536)
    return undecodable(name, encoding, offset, line, raw, nearby)


def undecodable(name: str, encoding: str, offset: int, line: int, raw: bytes, nearby: bytes) -> DataError:
    """Where a file stops decoding, and the encoding its bytes there look like."""
    likely, _ = guess(nearby)
    return DataError(f"{name}: byte {offset:,} (line {line}) is not valid {encoding} ({raw!r}); it looks like "
                     f"{likely}: set data.encoding={likely} (or data.encoding=auto to detect it)")


def decode(data: bytes, encoding: str, name: str) -> str:
    """One in-memory file (a file of a folder) as text; the error names the byte offset and line."""
    try:
        return data.decode(reading_codec(encoding))
    except UnicodeDecodeError as err:
        raise undecodable(name, encoding, err.start, data[:err.start].count(b"\n") + 1, data[err.start:err.end],
                          data[max(0, err.start - 32768): err.start + 32768]) from err
