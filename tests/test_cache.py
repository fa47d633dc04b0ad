"""The image-embedding cache: LRU bookkeeping, size limits, thread safety, and its use by the pipeline."""

from __future__ import annotations

import random
import sys
import threading
import time

import pytest
import torch

from llava_cache import EmbeddingCache
from llava_pipeline import LlavaPipeline, VisionSettings
from tiny_llava import make_test_image


def tensor_of(nbytes: int, fill: float = 0.0) -> torch.Tensor:
    """A float32 tensor of exactly ``nbytes`` bytes (a multiple of 4)."""
    return torch.full((nbytes // 4,), fill, dtype=torch.float32)


def accounted_bytes(cache: EmbeddingCache) -> int:
    """Bytes of the entries actually held (white box: the sum ``bytes_used`` must always equal)."""
    return sum(EmbeddingCache.size_of(t) for t in cache._entries.values())


# ---------------------------------------------------------------------------------------------------------
# The cache alone


def test_hit_returns_the_stored_tensor_and_counts():
    cache = EmbeddingCache(1000)
    stored = tensor_of(400, 1.0)
    assert cache.get("a") is None
    cache.put("a", stored)
    assert cache.get("a") is stored
    assert (cache.hits, cache.misses, len(cache), cache.bytes_used) == (1, 1, 1, 400)


def test_eviction_is_least_recently_used_first():
    cache = EmbeddingCache(1200)
    for key in "abc":
        cache.put(key, tensor_of(400))
    assert cache.get("a") is not None  # "a" is now the most recent; "b" the oldest
    cache.put("d", tensor_of(400))
    assert cache.get("b") is None
    assert all(cache.get(key) is not None for key in "acd")
    assert cache.bytes_used == 1200 == accounted_bytes(cache)


def test_eviction_frees_enough_for_a_large_entry():
    cache = EmbeddingCache(1000)
    for key in "abcd":
        cache.put(key, tensor_of(200))
    cache.put("big", tensor_of(800))  # needs 3 of the 4 small entries to go, oldest first
    assert [key for key in "abcd" if cache.get(key) is not None] == ["d"]
    assert cache.get("big") is not None
    assert cache.bytes_used == 1000 == accounted_bytes(cache)


def test_entry_larger_than_the_budget_is_not_stored_and_evicts_nothing():
    cache = EmbeddingCache(1000)
    cache.put("a", tensor_of(600))
    cache.put("huge", tensor_of(1004))
    assert cache.get("huge") is None
    assert cache.get("a") is not None
    assert cache.bytes_used == 600


def test_replacing_a_key_keeps_the_accounting_exact():
    cache = EmbeddingCache(1000)
    cache.put("a", tensor_of(600))
    cache.put("a", tensor_of(200, 2.0))
    assert cache.bytes_used == 200 == accounted_bytes(cache) and len(cache) == 1
    assert cache.get("a")[0].item() == 2.0
    cache.put("a", tensor_of(2000))  # too large: the old value is gone too, never a stale hit
    assert cache.get("a") is None and cache.bytes_used == 0


def test_size_counts_dtype_and_all_elements():
    assert EmbeddingCache.size_of(torch.zeros(16, 64, dtype=torch.float32)) == 4096
    assert EmbeddingCache.size_of(torch.zeros(16, 64, dtype=torch.bfloat16)) == 2048


def test_clear_and_zero_budget():
    cache = EmbeddingCache(1000)
    cache.put("a", tensor_of(400))
    cache.clear()
    assert (len(cache), cache.bytes_used, cache.get("a")) == (0, 0, None)
    disabled = EmbeddingCache(0)
    disabled.put("a", tensor_of(4))
    assert disabled.get("a") is None and disabled.bytes_used == 0
    with pytest.raises(ValueError, match="-1"):
        EmbeddingCache(-1)


def test_concurrent_put_and_get_keep_exact_accounting_within_budget():
    budget = 4000
    cache = EmbeddingCache(budget)
    errors: list[str] = []
    gets = [0] * 8
    stop = threading.Event()

    def worker(index: int) -> None:
        rng = random.Random(index)
        try:
            while not stop.is_set():
                key = rng.randrange(24)
                if rng.random() < 0.5:
                    cache.put(key, tensor_of(4 * rng.randrange(1, 1100)))  # sometimes over the budget
                else:
                    gets[index] += 1
                    tensor = cache.get(key)
                    if tensor is not None and EmbeddingCache.size_of(tensor) > budget:
                        errors.append("an entry over the budget was stored")
        except Exception as exc:  # noqa: BLE001 - a dying thread would otherwise only print
            errors.append(f"{type(exc).__name__}: {exc}")

    def monitor() -> None:
        while not stop.is_set():
            used = cache.bytes_used
            if not 0 <= used <= budget:
                errors.append(f"bytes_used {used} outside [0, {budget}]")

    # Switch threads as often as possible so that unsynchronised updates would interleave and show up.
    previous_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)] + [threading.Thread(target=monitor)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(previous_interval)
    assert not errors, errors[:3]
    assert sum(gets) > 1000 and cache.hits > 0 and cache.misses > 0
    assert cache.hits + cache.misses == sum(gets)
    assert cache.bytes_used == accounted_bytes(cache) <= budget


# ---------------------------------------------------------------------------------------------------------
# Through the pipeline

EMBEDDING_BYTES = 16 * 64 * 4  # tokens_per_image x LM hidden size x float32


def _load(tiny, cache_bytes: int) -> tuple[LlavaPipeline, list[int]]:
    """The hf pipeline with a cache of ``cache_bytes`` and a list that records each tower batch size."""
    settings = VisionSettings(clip_device="cpu", projector_device="cpu", cache_mb=cache_bytes / (1024 * 1024))
    pipeline = LlavaPipeline.load(tiny.hf, settings)
    tower_batches: list[int] = []
    pipeline.tower.register_forward_hook(lambda module, args, output: tower_batches.append(args[0].shape[0]))
    return pipeline, tower_batches


def _image(seed: int):
    return make_test_image(48, 40, seed=seed)


def test_same_image_twice_runs_the_tower_once(tiny_checkpoints):
    pipeline, tower_batches = _load(tiny_checkpoints, 2 * EMBEDDING_BYTES)
    assert pipeline.tokens_per_image * 64 * 4 == EMBEDDING_BYTES
    [first] = pipeline.encode_images([_image(1)])
    [second] = pipeline.encode_images([_image(1)])  # a new PIL object with the same pixels
    assert tower_batches == [1]
    assert torch.equal(first, second)
    assert first.shape == (tiny_checkpoints.tokens_per_image, 64)
    [other] = pipeline.encode_images([_image(2)])
    assert tower_batches == [1, 1]
    assert not torch.equal(other, first)


def test_cached_embedding_equals_uncached(tiny_checkpoints):
    cached_pipeline, cached_batches = _load(tiny_checkpoints, 2 * EMBEDDING_BYTES)
    uncached_pipeline, uncached_batches = _load(tiny_checkpoints, 0)
    cached_pipeline.encode_images([_image(3)])
    [from_cache] = cached_pipeline.encode_images([_image(3)])
    [fresh] = uncached_pipeline.encode_images([_image(3)])
    [fresh_again] = uncached_pipeline.encode_images([_image(3)])
    assert cached_batches == [1] and uncached_batches == [1, 1]  # a zero budget caches nothing
    assert torch.equal(from_cache, fresh) and torch.equal(fresh, fresh_again)


def test_mixed_batch_encodes_only_the_new_images_in_order(tiny_checkpoints):
    pipeline, tower_batches = _load(tiny_checkpoints, 4 * EMBEDDING_BYTES)
    [a] = pipeline.encode_images([_image(4)])
    results = pipeline.encode_images([_image(5), _image(4), _image(6)])
    assert tower_batches == [1, 2]
    assert torch.equal(results[1], a)
    reference, _ = _load(tiny_checkpoints, 0)
    for image_seed, result in ((5, results[0]), (6, results[2])):
        torch.testing.assert_close(result, reference.encode_images([_image(image_seed)])[0], atol=1e-6, rtol=0)


def test_pipeline_cache_evicts_the_oldest_image(tiny_checkpoints):
    pipeline, tower_batches = _load(tiny_checkpoints, 2 * EMBEDDING_BYTES)
    for seed in (7, 8, 9):  # room for two: image 7 goes
        pipeline.encode_images([_image(seed)])
    pipeline.encode_images([_image(9)])
    pipeline.encode_images([_image(8)])
    assert tower_batches == [1, 1, 1]
    pipeline.encode_images([_image(7)])
    assert tower_batches == [1, 1, 1, 1]
    assert pipeline.cache.bytes_used == 2 * EMBEDDING_BYTES


def test_source_digest_is_the_sha256_of_the_exact_text_and_its_memo_is_bounded(monkeypatch):
    import hashlib

    import llava_image_io

    url = "data:image/png;base64," + "QUJD" * 500
    expected = hashlib.sha256(url.encode()).hexdigest()
    assert llava_image_io.source_digest(url) == expected
    assert llava_image_io.source_digest(url[:1] + url[1:]) == expected  # an equal copy hits the memo
    one_char_off = url[:-1] + "E"
    assert llava_image_io.source_digest(one_char_off) == hashlib.sha256(one_char_off.encode()).hexdigest()
    assert llava_image_io.source_digest(url.encode()) == expected  # the file bytes of the same text
    # Same length and same ends, another middle: the memo's probe matches, the text does not.
    middle_changed = url[:600] + "Z" + url[601:]
    for _ in range(2):
        assert llava_image_io.source_digest(middle_changed) == hashlib.sha256(middle_changed.encode()).hexdigest()
        assert llava_image_io.source_digest(url) == expected

    # The memo's bound: sources are remembered up to 2500 characters in all, least recently used out.
    from types import SimpleNamespace

    from llava_cache import BoundedLRU

    monkeypatch.setattr(llava_image_io, "_recent_digests", BoundedLRU(2500, cost=lambda entry: len(entry[0])))
    hashed = []
    monkeypatch.setattr(llava_image_io, "hashlib", SimpleNamespace(
        sha256=lambda data: hashed.append(bytes(data)) or hashlib.sha256(data)))
    for index in range(3):
        llava_image_io.source_digest(str(index) * 1000)
    hashed.clear()
    assert llava_image_io.source_digest("1" * 1000) == hashlib.sha256(b"1" * 1000).hexdigest()
    assert llava_image_io.source_digest("2" * 1000) == hashlib.sha256(b"2" * 1000).hexdigest()
    assert hashed == []  # both remembered
    llava_image_io.source_digest("0" * 1000)
    assert hashed == [b"0" * 1000]  # least recently used went first
    hashed.clear()
    for _ in range(2):
        llava_image_io.source_digest("x" * 3000)
    assert len(hashed) == 2  # too large to remember


def test_bounded_lru_by_pixels_hands_each_picture_out_once_and_stays_within_its_bound():
    """The extension's hand-off of decoded pictures from the prompt hook to the splice."""
    from PIL import Image

    from llava_cache import BoundedLRU

    handoff = BoundedLRU(250, cost=lambda image: image.width * image.height)
    first, second, third = (Image.new("RGB", (10, 10), colour) for colour in ("red", "green", "blue"))
    handoff.put("a", first)
    handoff.put("b", second)
    assert handoff.pop("a") is first
    assert handoff.pop("a") is None  # handed out once
    handoff.put("c", third)
    handoff.put("d", Image.new("RGB", (10, 10)))  # 300 pixels held > 250: the oldest ("b") goes
    assert handoff.pop("b") is None
    assert handoff.pop("c") is third
    assert handoff.total_cost == 100 and len(handoff) == 1
