"""Streaming detokenization (worker/vllm/detokenize.py) on the tiny model's byte-level BPE."""

from __future__ import annotations

import random

import pytest

from worker.vllm.detokenize import TextStream

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tokenizer():
    # The tiny model's tokenizer recipe, trained here: byte-level BPE on a short corpus, so
    # accented letters and emoji are several byte tokens each.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from worker.vllm.tiny_model import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


TEXT = "Le café coûte 3 €, naïve 😀 answer: the order costs sixty. Ünïcödé ✓ done"


def _chunks(ids: list[int], rng: random.Random):
    i = 0
    while i < len(ids):
        n = rng.randint(1, 3)
        yield ids[i:i + n]
        i += n


def test_chunks_join_to_the_whole_text_and_never_split_a_character(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "no split character to test"
    decode = tokenizer.decode
    for seed in range(20):
        stream, pieces = TextStream(decode), []
        chunks = list(_chunks(ids, random.Random(seed)))
        for k, chunk in enumerate(chunks):
            pieces.append(stream.push(chunk, final=k == len(chunks) - 1))
        assert "".join(pieces) == decode(ids)
        assert not any("\ufffd" in p for p in pieces)


def test_one_token_at_a_time_and_an_incomplete_end(tokenizer):
    ids = tokenizer.encode("ok 😀").ids
    stream = TextStream(tokenizer.decode)
    out = [stream.push([i]) for i in ids[:-1]]
    assert "\ufffd" not in "".join(out)  # the emoji's first bytes are held back
    # The stream ends one byte token short of the emoji: what is held is released as is.
    assert "".join(out) + stream.push([], final=True) == tokenizer.decode(ids[:-1])
