"""Tokenize once, then batch with dynamic padding and length grouping.

Random batches of 32 on SST-2 carry ~3 padded tokens per real token; grouping texts of similar
length (shuffled groups, as the Hugging Face Trainer's ``group_by_length``) brings that to ~1.05,
which is most of the training time on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader


class Encoded(torch.utils.data.Dataset):
    """Token ids (unpadded) of one split's text columns, and its targets.

    ``joint=True`` (cross-encoder pairs) tokenizes the two columns as one sequence; otherwise each column
    is tokenized alone (single texts, bi-encoder pairs, triplets). Every text also gets an id, equal for
    equal texts across columns, so in-batch negatives can skip duplicates of the positive.
    Items are indices, so outputs can be put back in dataset order after length-sorted batching.
    """

    def __init__(self, tokenizer, columns: Sequence[Sequence[str]], labels, max_length: int,
                 prefix: str = "", joint: bool = False):
        self.labels = None if labels is None else torch.as_tensor(labels)
        if any(hasattr(col, "take") for col in columns):  # texts on disk (runner.streaming): tokenized per batch
            self.lazy(tokenizer, columns, max_length, prefix, joint)
            return
        prefixed = [[prefix + t for t in col] for col in columns]
        if joint:
            encodings = [tokenizer(prefixed[0], prefixed[1], truncation=True, max_length=max_length)]
        else:
            encodings = [tokenizer(col, truncation=True, max_length=max_length) for col in prefixed]
        self.input_ids: list[list[list[int]]] = [e["input_ids"] for e in encodings]
        self.token_type_ids = [e.get("token_type_ids") for e in encodings]
        self.lengths = np.max([[len(ids) for ids in col] for col in self.input_ids], axis=0)
        vocabulary: dict[str, int] = {}
        self.text_ids = torch.as_tensor([[vocabulary.setdefault(t, len(vocabulary)) for t in col] for col in columns])

    def lazy(self, tokenizer, columns, max_length: int, prefix: str, joint: bool) -> None:
        """Token ids on demand, token lengths on demand too (:class:`LazyLengths`: the batches a job uses are
        grouped exactly as in memory, without tokenizing ten million rows for a hundred steps); text ids from
        hashes, also on demand (:class:`LazyTextIds`)."""
        groups = [list(columns)] if joint else [[col] for col in columns]
        self.input_ids = [LazyTokens(tokenizer, g, max_length, prefix, "input_ids") for g in groups]
        probe = tokenizer(*(["x"] * len(groups[0])))
        self.token_type_ids = [LazyTokens(tokenizer, g, max_length, prefix, "token_type_ids") if "token_type_ids" in probe
                               else None for g in groups]
        self.lengths = LazyLengths(tokenizer, groups, max_length, prefix)
        self.text_ids = LazyTextIds(list(columns))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> int:
        return i

    def collator(self, tokenizer) -> Collator:
        return Collator(self, tokenizer.pad_token_id, tokenizer.padding_side)


class LazyTokens(Sequence):
    """Token ids (or token type ids) of row ``i`` of texts on disk, tokenized when the loader asks."""

    def __init__(self, tokenizer, columns: list, max_length: int, prefix: str, field: str) -> None:
        self.tokenizer, self.columns, self.max_length, self.prefix, self.field = tokenizer, columns, max_length, prefix, field

    def __len__(self) -> int:
        return len(self.columns[0])

    def __getitem__(self, i: int) -> list[int]:
        texts = [self.prefix + col[i] for col in self.columns]
        return self.tokenizer(*texts, truncation=True, max_length=self.max_length)[self.field]


class LazyLengths:
    """Token lengths of texts on disk, tokenized the first time a row's length is asked for (the longest of a
    row's columns when they are tokenized apart). Indexing gives an array, as indexing the in-memory lengths
    does; ``np.asarray`` computes every row (evaluation sorts a whole split)."""

    def __init__(self, tokenizer, groups: list[list], max_length: int, prefix: str) -> None:
        self.tokenizer, self.groups, self.max_length, self.prefix = tokenizer, groups, max_length, prefix
        self.known = np.full(len(groups[0][0]), -1, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.known)

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index)
        missing = np.unique(index[self.known[index] < 0])
        for start in range(0, len(missing), 1000):  # rows spread over a file on disk: released every 1,000
            rows = missing[start:start + 1000]
            self.known[rows] = np.max([self.count([col.take(rows) for col in group]) for group in self.groups], axis=0)
        return self.known[index]

    def count(self, columns: list) -> list[int]:
        texts = [[self.prefix + t for t in next(col.chunks(len(col)), [])] for col in columns]
        encoded = self.tokenizer(*texts, truncation=True, max_length=self.max_length, return_attention_mask=False,
                                 return_token_type_ids=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = self[np.arange(len(self))]
        return values if dtype is None else values.astype(dtype)

    def __neg__(self) -> np.ndarray:
        return -np.asarray(self)


class LazyTextIds:
    """Text ids of texts on disk (runner.streaming.text_ids: a hash of the text, so equal texts get equal ids
    whichever rows are asked for), computed for the rows a batch holds; ``.numpy()`` gives every row's."""

    def __init__(self, columns: list) -> None:
        self.columns = columns

    def __getitem__(self, key) -> torch.Tensor:
        from runner.streaming import text_ids

        columns, index = key
        index = np.atleast_1d(np.asarray(index))
        return torch.as_tensor(np.stack([text_ids(col.take(index)) for col in self.columns[columns]]))

    def numpy(self) -> np.ndarray:
        from runner.streaming import text_ids

        return np.stack([text_ids(col) for col in self.columns])


class FrozenSplit(torch.utils.data.Dataset):
    """A split whose texts a frozen encoder has already encoded (``runner.features``): rows of the
    feature matrix instead of token ids. Batches carry ``{"frozen": (batch, parts, hidden)}`` per column,
    which the model pools without running its encoder. Equal texts share a row, hence a text id."""

    def __init__(self, vectors: torch.Tensor, rows: torch.Tensor, labels, key: str = "frozen") -> None:
        self.vectors, self.rows, self.key = vectors, rows, key  # rows: (columns, n); key: frozen (layout) or pooled
        self.labels = None if labels is None else torch.as_tensor(labels)
        self.text_ids = rows
        self.lengths = np.ones(rows.shape[1], dtype=np.int64)  # all the same size: batches need no grouping

    def __len__(self) -> int:
        return self.rows.shape[1]

    def __getitem__(self, i: int) -> int:
        return i

    def collator(self, tokenizer=None):
        return self.collate

    def collate(self, index: list[int]) -> dict:
        batch = {"features": [{self.key: self.vectors[column[index]]} for column in self.rows],
                 "index": torch.as_tensor(index), "text_ids": self.rows[:, index]}
        if self.labels is not None:
            batch["labels"] = self.labels[index]
        return batch


class Collator:
    """Pads a list of item indices into tensors: right or left, as the tokenizer is configured.

    Batch layout: ``features`` (one dict of input_ids / attention_mask / token_type_ids per text
    column), ``labels`` (absent for triplets), ``index`` (dataset positions), ``text_ids`` (columns, batch).
    """

    def __init__(self, data: Encoded, pad_id: int, padding_side: str = "right", width: int | None = None):
        self.data, self.pad_id, self.left, self.width = data, pad_id, padding_side == "left", width

    def pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = self.width or max(len(r) for r in rows)  # width: every batch as long (SigLIP pools the last position)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if self.left:
                out[i, width - len(r) :] = torch.as_tensor(r)
            else:
                out[i, : len(r)] = torch.as_tensor(r)
        return out

    def features(self, column: int, index: list[int]) -> dict[str, torch.Tensor]:
        ids = [self.data.input_ids[column][i] for i in index]
        out = {"input_ids": self.pad(ids, self.pad_id), "attention_mask": self.pad([[1] * len(r) for r in ids], 0)}
        if self.data.token_type_ids[column] is not None:
            out["token_type_ids"] = self.pad([self.data.token_type_ids[column][i] for i in index], 0)
        return out

    def __call__(self, index: list[int]) -> dict:
        batch = {
            "features": [self.features(c, index) for c in range(len(self.data.input_ids))],
            "index": torch.as_tensor(index),
            "text_ids": self.data.text_ids[:, index],
        }
        if self.data.labels is not None:
            batch["labels"] = self.data.labels[index]
        return batch


class ImageSplit(torch.utils.data.Dataset):
    """Image paths and their captions (tokenized once, like :class:`Encoded`); the images are decoded and
    preprocessed by the collator, in the loader workers (``hardware.num_workers``), a batch at a time.

    Batch layout: ``features`` = [``{"pixel_values"}``, caption token ids], ``text_ids`` = (image ids, caption
    ids): equal for the same file and for equal captions (in-batch repeats are not negatives), ``labels`` (class
    ids of data.type=image), ``index``.
    """

    def __init__(self, processor, tokenizer, paths: list[str], captions: list[str], labels, max_length: int,
                 prefix: str = "", padding: str = "longest", where: str = "") -> None:
        self.processor, self.paths, self.where = processor, list(paths), where
        self.text = Encoded(tokenizer, [captions], None, max_length, prefix)
        self.labels = None if labels is None else torch.as_tensor(labels)
        _, image_ids = np.unique(np.asarray(self.paths), return_inverse=True)
        self.text_ids = torch.stack([torch.as_tensor(image_ids, dtype=torch.long).reshape(-1), self.text.text_ids[0]])
        self.lengths = self.text.lengths  # captions of similar length batch together: the images are all one size
        self.width = max_length if padding == "max_length" else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> int:
        return i

    def collator(self, tokenizer) -> ImageCollator:
        return ImageCollator(self, Collator(self.text, tokenizer.pad_token_id, tokenizer.padding_side, self.width))


class ImageCollator:
    """Pixels of a batch's images (runner.images.pixel_values) and its padded captions."""

    def __init__(self, data: ImageSplit, captions: Collator) -> None:
        self.data, self.captions = data, captions

    def __call__(self, index: list[int]) -> dict:
        from runner.images import pixel_values

        pixels = pixel_values(self.data.processor, [self.data.paths[i] for i in index], [i + 1 for i in index],
                              self.data.where)
        batch = {"features": [{"pixel_values": pixels}, self.captions.features(0, index)],
                 "index": torch.as_tensor(index), "text_ids": self.data.text_ids[:, index]}
        if self.data.labels is not None:
            batch["labels"] = self.data.labels[index]
        return batch


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar-length examples in random order, different every epoch, seeded.

    Shuffle, cut into mega-batches of ``group`` batches, sort each by length, split into batches and
    shuffle the batches. Without ``shuffle`` (evaluation) batches are simply sorted by length.
    The order of an epoch is a pure function of ``(seed, epoch)``; the training loop positions the
    sampler with :meth:`start` before every pass, so a resumed run replays the same order and skips
    the batches the killed run had already consumed.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0, group: int = 50):
        self.lengths, self.batch_size, self.shuffle, self.seed, self.group = lengths, batch_size, shuffle, seed, group
        self.epoch, self.skip = 0, 0

    def start(self, epoch: int, skip: int = 0) -> None:
        """The next pass yields epoch ``epoch``'s batches from number ``skip`` on."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches(self.skip) if self.shuffle else self.sorted_batches()[self.skip :]

    def epoch_batches(self, skip: int = 0) -> Iterator[list[int]]:
        order, (starts, ks) = self.plan()
        sorted_chunks: dict[int, np.ndarray] = {}
        for start, k in zip(starts[skip:].tolist(), ks[skip:].tolist()):  # a mega-batch is sorted when first used
            if start not in sorted_chunks:
                chunk = order[start : start + self.batch_size * self.group]
                sorted_chunks[start] = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            yield sorted_chunks[start][k * self.batch_size : (k + 1) * self.batch_size].tolist()

    def sorted_batches(self) -> list[list[int]]:
        order = np.argsort(-np.asarray(self.lengths), kind="stable")
        return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]

    def plan(self) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """The epoch's row order and its batches as (mega-batch start, batch within it) arrays, in the order they
        are used: which rows a batch holds needs the lengths of its mega-batch only."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        mega = self.batch_size * self.group
        per_mega = [-(-min(mega, len(order) - start) // self.batch_size) for start in range(0, len(order), mega)]
        starts = np.repeat(np.arange(len(per_mega), dtype=np.int64) * mega, per_mega)
        ks = np.concatenate([np.arange(n) for n in per_mega]) if per_mega else np.zeros(0, dtype=np.int64)
        shuffled = rng.permutation(len(starts))
        return order, (starts[shuffled], ks[shuffled])

    def batches(self) -> list[list[int]]:
        """Every batch of the epoch, in order."""
        return list(self.epoch_batches())


class RandomBatches(LengthGroupedBatches):
    """Plain shuffled batches (``train.group_by_length=false``), for comparison and benchmarks."""

    def epoch_batches(self, skip: int = 0) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.lengths))
        yield from (order[i : i + self.batch_size].tolist() for i in range(skip * self.batch_size, len(order), self.batch_size))


class TokenBudgetBatches(torch.utils.data.Sampler):
    """Inference batches, longest texts first, each holding at most ``batch_size`` texts and at most ``max_tokens``
    padded tokens: long texts go in small batches, short ones in full ones, so that little of the work is padding
    (a random batch of 64 SST-2 sentences is mostly padding: 3x slower than the same texts sorted)."""

    def __init__(self, lengths, batch_size: int, max_tokens: int) -> None:
        self.lengths, self.batch_size, self.max_tokens = np.asarray(lengths), batch_size, max_tokens
        self.batches = self.plan()

    def plan(self) -> list[list[int]]:
        order = np.argsort(-self.lengths, kind="stable")
        batches, start = [], 0
        while start < len(order):
            size = min(self.batch_size, max(1, self.max_tokens // max(int(self.lengths[order[start]]), 1)))
            batches.append(order[start:start + size].tolist())
            start += size
        return batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches


class ShardedBatches(torch.utils.data.Sampler):
    """This process's share of every batch of ``batches`` when ``world`` processes train one model.

    ``batches`` yields the batches of the whole job (``world`` times the per-process batch size): with the
    same seed, exactly the batches one process would see with that batch size. Each is cut into ``world``
    interleaved slices (similar lengths per slice when batches are length-grouped). A batch whose size
    is not a multiple of ``world`` is topped up with its own first items, so every process gets the same
    number of items and a mean over a slice weighs like a mean over the batch; evaluation drops the
    repeats by dataset index. Accelerate's own sharding skips short batches that are not the last one,
    and length-grouped epochs have them anywhere, so the runner shards itself.
    """

    def __init__(self, batches, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            short = -len(batch) % self.world
            if short:
                batch = batch + (batch * self.world)[:short]
            yield batch[self.rank :: self.world]


def for_processes(loader: DataLoader, accelerator) -> DataLoader:
    """``loader`` for this process of ``accelerator``: its share of each batch (:class:`ShardedBatches`), moved
    to the device, and tracked by accelerate (gradient accumulation syncs at the end of an epoch). One path
    for one process and for N: with one process the shard is the whole batch."""
    from accelerate.data_loader import DataLoaderShard

    sampler = ShardedBatches(loader.batch_sampler, accelerator.process_index, accelerator.num_processes)
    return DataLoaderShard(loader.dataset, device=accelerator.device, batch_sampler=sampler, collate_fn=loader.collate_fn,
                           num_workers=loader.num_workers, generator=loader.generator)


def make_loader(
    data: Encoded | FrozenSplit, tokenizer, batch_size: int, train: bool, seed: int = 0, group_by_length: bool = True, workers: int = 0,
    max_tokens: int | None = None,
) -> DataLoader:
    """A loader over ``data``; its batch sampler is ``loader.batch_sampler`` (positioned by the loop).

    The loader gets a generator of its own: PyTorch draws a seed for every pass over a loader, and from
    the global generator that would shift every dropout mask after a resumed pass.
    """
    sampler_cls = LengthGroupedBatches if (group_by_length or not train) else RandomBatches
    sampler = (TokenBudgetBatches(data.lengths, batch_size, max_tokens) if max_tokens and not train else
               sampler_cls(data.lengths, batch_size, shuffle=train, seed=seed))
    return DataLoader(data, batch_sampler=sampler, collate_fn=data.collator(tokenizer), num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))


def padding_ratio(loader: DataLoader) -> float:
    """Padded tokens per real token over one pass of ``loader`` (1.0 = no padding)."""
    real = padded = 0
    for batch in loader:
        for features in batch["features"]:
            real += int(features["attention_mask"].sum())
            padded += features["attention_mask"].numel()
    return padded / max(real, 1)
