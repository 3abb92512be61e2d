"""Uplink encodings: what they keep, what they cost, and what a hostile payload gets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save as save_numpy

from fedq.common.wire import codec, compression
from fedq.common.wire.codec import CodecError
from fedq.common.wire.compression import Compression


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": rng.normal(0, 0.01, (64, 100)).astype(np.float32),
        "fc1.bias": rng.normal(0, 0.01, 64).astype(np.float32),
        "fc2.weight": rng.normal(0, 0.05, (10, 64)).astype(np.float32),
        "scale": np.array(0.25, dtype=np.float32),
    }


def _specs(delta):
    return codec.tensor_specs(delta)


ALL = [
    "none",
    "fp16",
    "bf16",
    "int8",
    "int8:block=16",
    "int8:block=1",  # a scale per value: the largest int8 payload
    "topk:fraction=0.05",
    "topk:fraction=1",  # every value kept: the largest top-k payload, twice the dense one
    "prune:fraction=0.2",
    "prune:fraction=1",
]


@pytest.mark.parametrize("spec", ALL)
def test_decoding_gives_the_model_shapes_and_is_deterministic(spec):
    delta = _delta()
    method = Compression.parse(spec)
    payload = method.encode(delta)
    assert payload == method.encode(_delta())  # same update, same bytes
    encoding, decoded = compression.decode(payload, _specs(delta))
    assert encoding == method.spec
    assert codec.tensor_specs(decoded) == _specs(delta)
    again = compression.decode(payload, _specs(delta))[1]
    assert all(np.array_equal(decoded[name].view(np.uint32), again[name].view(np.uint32)) for name in decoded)
    assert len(payload) <= method.max_payload_bytes(_specs(delta))


def test_none_is_the_plain_codec_payload_of_older_fedq():
    delta = _delta()
    assert Compression.parse("none").encode(delta) == codec.encode(delta)


@pytest.mark.parametrize(
    ("spec", "max_relative_error", "min_ratio"),
    [("fp16", 1e-3, 1.9), ("bf16", 8e-3, 1.9), ("int8", 1e-2, 3.5)],
)
def test_quantisation_error_and_size(spec, max_relative_error, min_ratio):
    delta = _delta()
    payload = Compression.parse(spec).encode(delta)
    decoded = compression.decode(payload, _specs(delta))[1]
    for name, array in delta.items():
        error = np.abs(decoded[name] - array).max()
        assert error <= max_relative_error * np.abs(array).max() + 1e-12, name
    assert len(codec.encode(delta)) / len(payload) >= min_ratio


def test_bf16_rounds_to_nearest_even():
    # 1 + 2^-8 lies halfway between two bfloat16 values: ties go to the even one (1.0);
    # 1 + 3 * 2^-8 is halfway again and goes up to 1 + 2^-6.
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, -2.5, 0.0], dtype=np.float32)
    decoded = compression.decode(Compression.parse("bf16").encode({"x": values}), {"x": ((4,), "float32")})[1]["x"]
    assert decoded.tolist() == [1.0, 1 + 2**-6, -2.5, 0.0]


def test_topk_keeps_the_largest_magnitudes_of_the_whole_update():
    delta = _delta()
    payload = Compression.parse("topk:fraction=0.05").encode(delta)
    decoded = compression.decode(payload, _specs(delta))[1]
    flat = np.concatenate([delta[name].ravel() for name in sorted(delta)])
    kept = np.concatenate([decoded[name].ravel() for name in sorted(delta)])
    assert np.count_nonzero(kept) == int(np.ceil(0.05 * flat.size))
    threshold = np.sort(np.abs(flat))[-np.count_nonzero(kept)]
    assert np.array_equal(kept[kept != 0], flat[np.abs(flat) >= threshold])  # exact values, the largest ones
    # fc2's deltas are five times larger: global selection takes far more of them than its share
    share_fc2 = np.count_nonzero(decoded["fc2.weight"]) / np.count_nonzero(kept)
    assert share_fc2 > 3 * delta["fc2.weight"].size / flat.size
    assert len(codec.encode(delta)) / len(payload) >= 7.5  # 8 bytes a kept value, and the header


def test_topk_ties_are_broken_by_position():
    values = np.ones(10, dtype=np.float32)
    decoded = compression.decode(
        Compression.parse("topk:fraction=0.3").encode({"x": values}), {"x": ((10,), "float32")}
    )
    assert decoded[1]["x"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]


def test_prune_keeps_each_tensors_share():
    delta = _delta()
    decoded = compression.decode(Compression.parse("prune:fraction=0.2").encode(delta), _specs(delta))[1]
    for name, array in delta.items():
        kept = np.count_nonzero(decoded[name])
        assert kept == max(1, int(np.ceil(0.2 * array.size)))
        assert np.abs(decoded[name][decoded[name] != 0]).min() >= np.sort(np.abs(array.ravel()))[-kept]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zip", "unknown compression 'zip'"),
        ("topk:fraction=0", "fraction must be in (0, 1]"),
        ("topk:block=3", "takes fraction, not block"),
        ("int8:block=0", "block must be at least 1"),
        ("fp16:fraction=0.1", "takes no parameters"),
        ("topk:fraction", "needs a value"),
    ],
)
def test_bad_specs_get_a_sentence(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Compression.parse(spec)


def test_spec_is_canonical():
    assert Compression.parse(" TopK : fraction = 0.050 ").spec == "topk:fraction=0.05"
    assert Compression.parse("int8").spec == "int8:block=256"


# -- hostile payloads -----------------------------------------------------

SPECS = {"w": ((4, 5), "float32")}


def _payload(tensors, encoding, shapes=None):
    metadata = {"fedq": json.dumps({"encoding": encoding, "shapes": shapes or {"w": [4, 5]}})}
    return save_numpy(tensors, metadata=metadata)


@pytest.mark.parametrize(
    ("tensors", "encoding", "shapes", "message"),
    [
        # shapes that differ from the model's, e.g. a decompression bomb's
        (
            {"w::indices": np.zeros(1, np.uint32), "w::values": np.zeros(1, np.float32)},
            "topk:fraction=0.01",
            {"w": [10**12]},
            "names or shapes differ",
        ),
        (
            {"w::indices": np.array([20], np.uint32), "w::values": np.ones(1, np.float32)},
            "topk:fraction=0.01",
            None,
            "indices must be increasing and below 20",
        ),
        (
            {"w::indices": np.array([3, 3], np.uint32), "w::values": np.ones(2, np.float32)},
            "topk:fraction=0.01",
            None,
            "increasing",
        ),
        (
            {"w::indices": np.array([1, 2], np.uint32), "w::values": np.ones(3, np.float32)},
            "topk:fraction=0.01",
            None,
            "not float32 and 2",
        ),
        (
            {"w::indices": np.array([1], np.int64), "w::values": np.ones(1, np.float32)},
            "topk:fraction=0.01",
            None,
            "dtype int64",
        ),
        (
            {"w": np.zeros((4, 5), np.int8), "w::scale": np.array([np.inf], np.float32)},
            "int8:block=256",
            None,
            "finite and not negative",
        ),
        (
            {"w": np.zeros((4, 5), np.int8), "w::scale": np.ones(5, np.float32)},
            "int8:block=256",
            None,
            "not float32 and 1",
        ),
        ({"w": np.zeros((4, 5), np.int8)}, "int8:block=256", None, "holds 2 tensors"),
        (
            {"w::mask": np.full(3, 255, np.uint8), "w::values": np.ones(20, np.float32)},
            "prune:fraction=0.1",
            None,
            "bits set past",
        ),
        ({"w": np.zeros((4, 5), np.float16)}, "gzip", None, "not one fedq decodes"),
        ({"w": np.zeros((4, 5), np.float16)}, "topk:fraction=0.0100", None, "canonical"),
    ],
)
def test_hostile_payloads_are_refused_with_a_sentence(tensors, encoding, shapes, message):
    with pytest.raises(CodecError, match=message):
        compression.decode(_payload(tensors, encoding, shapes), SPECS)


@pytest.mark.parametrize("payload", [b"", b"\xff" * 8, (10**9).to_bytes(8, "little") + b"{}", b"\x02\0\0\0\0\0\0\0[]"])
def test_garbage_is_refused(payload):
    with pytest.raises(CodecError):
        compression.decode(payload, SPECS)


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8:block=1", "topk:fraction=1", "prune:fraction=1"])
def test_the_size_bound_holds_for_many_small_tensors_with_long_names(spec):
    # The bound refuses larger payloads unread: an honest payload must never exceed it, whatever
    # the model's names and shapes (the header grows with both).
    rng = np.random.default_rng(1)
    delta = {
        f"encoder.layers.{index}.attention.{'very_long_sub_module_name_' * 6}.weight": rng.normal(
            size=(index % 3 + 1, 2, 1, 3)
        ).astype(np.float32)
        for index in range(40)
    }
    delta["scalar"] = np.array(1.5, np.float32)
    method = Compression.parse(spec)
    assert len(method.encode(delta)) <= method.max_payload_bytes(_specs(delta))


def test_prune_ties_are_broken_by_position_too():
    values = np.array([1, 2, 2, 2, 1], dtype=np.float32)
    decoded = compression.decode(
        Compression.parse("prune:fraction=0.4").encode({"x": values}), {"x": ((5,), "float32")}
    )
    assert decoded[1]["x"].tolist() == [0, 2, 2, 0, 0]
