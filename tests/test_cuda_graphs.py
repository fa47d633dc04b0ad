"""The CUDA-graph bookkeeping of VisionTower, on a machine without CUDA.

``torch.cuda``'s graph and stream calls are replaced (for each test only) by CPU stand-ins: the capture
context runs the function eagerly and a replay re-runs it into the captured output buffer, optionally
perturbed to play a GEMM library that picked other kernels while capturing. Real captures and their
bit-equality with the eager forward are measured by bench/bench_gpu.py (``graph_matches_eager``).
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch

import llava_vision


class _Stream:
    def wait_stream(self, other) -> None:
        pass


class FakeCuda:
    """Stand-ins for the torch.cuda calls that llava_vision._CudaGraphCache makes. A real capture
    records kernels; the stand-in capture context runs the function eagerly, and a function wrapped by
    :meth:`recording` tells the graph being captured what to re-run on replay."""

    def __init__(self):
        self.captures = 0
        self.fail_next_capture = False
        self.replay_offset = 0.0  # added by every replay of graphs captured while it is set
        self.capturing = None
        fake = self

        class Graph:
            def __init__(self):
                self.recorded = None  # (function, static inputs, static outputs)
                self.offset = fake.replay_offset

            def replay(self) -> None:
                function, inputs, outputs = self.recorded
                outputs.copy_(function(inputs) + self.offset)

        self.Graph = Graph

    @contextlib.contextmanager
    def graph(self, graph, capture_error_mode="global"):
        if self.fail_next_capture:
            self.fail_next_capture = False
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        self.capturing = graph
        try:
            yield
        finally:
            self.capturing = None

    def recording(self, function):
        def recorded(inputs):
            outputs = function(inputs)
            if self.capturing is not None:
                self.capturing.recorded = (function, inputs, outputs)
            return outputs

        return recorded

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "Stream", lambda *args, **kwargs: _Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: _Stream())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", self.Graph)
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "graph", self.graph)


def tiny_tower():
    config = {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 56, "patch_size": 14,
              "hidden_act": "quick_gelu"}
    return llava_vision.VisionTower(config, (-2,), keep_cls=False).eval().requires_grad_(False)


@pytest.fixture
def graphed(monkeypatch):
    tower = tiny_tower()
    tower.enable_cuda_graphs(max_shapes=2)
    fake = FakeCuda()
    fake.install(monkeypatch)
    return tower, fake, fake.recording(tower._encode_dense)


def test_replays_equal_the_eager_forward_and_capture_once_per_shape(graphed):
    tower, fake, encode = graphed
    cache = tower._cuda_graphs
    one = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        eager = tower._encode_dense(one)
        first, second = cache(encode, one), cache(encode, one * 2)
        assert torch.equal(first, eager)
        assert torch.equal(second, tower._encode_dense(one * 2))  # the second input went through the static buffer
    with torch.no_grad():  # a no_grad caller after an inference_mode caller shares the buffers
        assert torch.equal(cache(encode, one), eager)
    assert fake.captures == 1
    assert tower.captured_graph_shapes == [(1, 3, 56, 56)]
    assert first.data_ptr() != second.data_ptr()  # callers get copies, never the static buffer


def test_a_graph_that_differs_from_the_eager_forward_is_not_used(graphed):
    tower, fake, encode = graphed
    fake.replay_offset = 1e-3  # the captured kernels round differently
    pixels = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        assert torch.equal(tower._cuda_graphs(encode, pixels), tower._encode_dense(pixels))
        assert torch.equal(tower._cuda_graphs(encode, pixels * 3), tower._encode_dense(pixels * 3))
    assert fake.captures == 1  # tried once, then that shape stays eager
    assert tower.captured_graph_shapes == []


def test_failed_capture_and_shape_limit_fall_back_to_eager(graphed):
    tower, fake, encode = graphed
    cache = tower._cuda_graphs
    one, two, three = (torch.randn(b, 3, 56, 56) for b in (1, 2, 3))
    with torch.inference_mode():
        cache(encode, one)
        fake.fail_next_capture = True
        assert torch.equal(cache(encode, two), tower._encode_dense(two))
        assert torch.equal(cache(encode, three), tower._encode_dense(three))  # over max_shapes=2
    assert fake.captures == 1
    assert tower.captured_graph_shapes == [(1, 3, 56, 56)]


def test_to_drops_graphs_and_the_tower_is_freed_without_the_garbage_collector(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    tower = tiny_tower()
    tower.enable_cuda_graphs()
    with torch.inference_mode():
        tower._cuda_graphs(fake.recording(tower._encode_dense), torch.randn(1, 3, 56, 56))
    assert tower.captured_graph_shapes == [(1, 3, 56, 56)]
    tower.float()
    assert tower.captured_graph_shapes == []
    assert tower._qkv_is_fused(0)
    gc.disable()  # a reference cycle through the graph cache would keep GPU memory until a collection
    try:
        reference = weakref.ref(tower)
        del tower
        assert reference() is None
    finally:
        gc.enable()


def test_settings_turn_graphs_on_for_cuda_towers_only():
    from llava_pipeline import VisionSettings

    assert VisionSettings().cuda_graphs is True
    assert VisionSettings.from_mapping({"cuda_graphs": False}).cuda_graphs is False
    assert VisionSettings.from_mapping({"cuda_graphs": ""}).cuda_graphs is True


def test_replayed_features_have_the_eager_layout(graphed):
    """forward() cuts CLS off the replayed dense output as a view, as the eager path and the references
    do: the projector's GEMM then sees the same strides (a contiguous copy changes the last bits on GPUs)."""
    tower, _, encode = graphed
    pixels = torch.randn(3, 3, 56, 56)
    with torch.inference_mode():
        replayed = tower._drop_cls_view(tower._cuda_graphs(encode, pixels))
        eager = tower._encode(pixels)
    assert torch.equal(replayed, eager)
    assert replayed.stride() == eager.stride() and not eager.is_contiguous()
