"""Length-grouped batches: every example once per epoch, new order each epoch, far less padding."""

from __future__ import annotations

import numpy as np
import torch

from runner.batching import Collator, Encoded, LengthGroupedBatches, RandomBatches, make_loader, padding_ratio


def test_each_epoch_yields_every_index_once_in_a_new_order():
    lengths = np.random.default_rng(0).integers(1, 100, size=1000)
    sampler = LengthGroupedBatches(lengths, batch_size=32, shuffle=True, seed=3)
    first = list(sampler)
    sampler.start(epoch=1)
    second = list(sampler)
    for epoch in (first, second):
        assert sorted(i for b in epoch for i in b) == list(range(1000))
        assert len(epoch) == len(sampler) == 32
    assert first != second


def test_a_positioned_sampler_replays_the_rest_of_an_epoch():
    """A resumed run: epoch 2 from batch 5 on is exactly what the uninterrupted epoch 2 yielded after 5."""
    lengths = np.random.default_rng(1).integers(1, 60, size=300)
    for cls in (LengthGroupedBatches, RandomBatches):
        sampler = cls(lengths, batch_size=16, shuffle=True, seed=7)
        sampler.start(2)
        whole = list(sampler)
        sampler.start(0)
        list(sampler)
        sampler.start(2, skip=5)
        assert list(sampler) == whole[5:]
        assert len(sampler) == len(whole)


def test_same_seed_same_batches():
    lengths = np.arange(200) % 17
    a = list(LengthGroupedBatches(lengths, 8, shuffle=True, seed=1))
    b = list(LengthGroupedBatches(lengths, 8, shuffle=True, seed=1))
    assert a == b


def test_grouping_cuts_padding_against_random_batches():
    lengths = np.random.default_rng(0).lognormal(3, 0.6, size=4000).astype(int) + 2
    def ratio(sampler):
        total = real = 0
        for batch in sampler:
            total += lengths[batch].max() * len(batch)
            real += lengths[batch].sum()
        return total / real
    grouped = ratio(LengthGroupedBatches(lengths, 32, shuffle=True))
    random = ratio(RandomBatches(lengths, 32, shuffle=True))
    assert grouped < 1.1 < 1.5 < random


def test_collator_pads_left_or_right_and_keeps_indices(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = Encoded(tok, [["good", "the movie was bad"]], np.array([1, 0]), max_length=16)
    right = Collator(data, tok.pad_token_id, "right")([0, 1])
    left = Collator(data, tok.pad_token_id, "left")([0, 1])
    r, lf = right["features"][0], left["features"][0]
    assert r["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0, 0]
    assert lf["attention_mask"].tolist()[0] == [0, 0, 0, 1, 1, 1]
    assert r["input_ids"][0, :3].tolist() == lf["input_ids"][0, 3:].tolist()
    assert right["labels"].tolist() == [1, 0] and right["index"].tolist() == [0, 1]


def test_pair_and_triplet_collation(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    a, b = ["good film", "bad"], ["the film was good", "bad"]
    cross = Collator(Encoded(tok, [a, b], np.array([0.5, 1.0]), 32, joint=True), tok.pad_token_id)([0, 1])
    [joint] = cross["features"]
    assert joint["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]  # [CLS] good film [SEP] | the film was good [SEP]
    assert cross["labels"].tolist() == [0.5, 1.0]

    triplets = Encoded(tok, [a, b, ["awful", "good film"]], None, 32)
    batch = Collator(triplets, tok.pad_token_id)([0, 1])
    assert len(batch["features"]) == 3 and "labels" not in batch
    assert [f["input_ids"].shape[0] for f in batch["features"]] == [2, 2, 2]
    # equal texts share an id across columns: "bad" (anchor 1 = positive 1), "good film" (anchor 0 = negative 1)
    ids = batch["text_ids"]
    assert ids[0, 1] == ids[1, 1] and ids[0, 0] == ids[2, 1] and ids[0, 0] != ids[1, 0]
    assert triplets.lengths.tolist() == [6, 4]  # the longest column of each example


def test_prefix_and_truncation(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = Encoded(tok, [["good " * 50]], np.array([1]), max_length=8, prefix="the ")
    assert len(data.input_ids[0][0]) == 8
    assert data.input_ids[0][0][1] == tok.convert_tokens_to_ids("the")


def test_eval_loader_is_sorted_and_padding_ratio(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = ["good " * n for n in range(1, 40)]
    data = Encoded(tok, [texts], np.zeros(len(texts), dtype=np.int64), max_length=64)
    loader = make_loader(data, tok, 8, train=False)
    seen = torch.cat([b["index"] for b in loader])
    assert sorted(seen.tolist()) == list(range(len(texts)))
    widths = [b["features"][0]["input_ids"].shape[1] for b in loader]
    assert widths == sorted(widths, reverse=True)  # longest first: memory peaks at once, not late
    # lengths 3..41 in batches of 8: the padding left is the spread inside each batch
    assert padding_ratio(loader) < 1.2
