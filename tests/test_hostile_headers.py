"""Hostile safetensors headers, shard indexes, config.json and descriptions.

Fixtures are written with the safetensors library's own writer; the library's reader is
the oracle of the fuzz test (whatever mxdit's reader accepts, safetensors accepts too, with
the same bytes; mxdit is allowed to be stricter: duplicate keys, unknown entry fields)."""
from __future__ import annotations

import json
import os
import signal
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mxdit.loader import CheckpointError, CheckpointFiles, SafetensorsFile, open_checkpoint
from mxdit.loader.safetensors_io import resolve_weight_files
from mxdit.quant.modelslim import ModelSlimConfig, load_description


def _valid_bytes() -> bytes:
    g = torch.Generator().manual_seed(0)
    return st_save({
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int32),
        "c": torch.zeros(0, 4),
        "d": torch.randn(2, generator=g),
    })


VALID = _valid_bytes()


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes, raw: bytes | None = None) -> bytes:
    hb = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + body


def _write(tmp, data: bytes, name="x.safetensors") -> str:
    p = os.path.join(tmp, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


def _one_line(e: BaseException, path: str) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    assert path in msg, msg
    return msg


def test_valid_file_reads_like_safetensors(tmp_path):
    p = _write(tmp_path, VALID)
    ref = st_load(VALID)
    with SafetensorsFile(p) as f:
        assert set(f.keys()) == set(ref)
        for k in ref:
            assert torch.equal(f.read(k), ref[k])


def _mutated(kind: str) -> bytes:
    h, body = _split(VALID)
    a = h["a"]["data_offsets"]
    if kind == "negative_offset":
        h["a"]["data_offsets"] = [-2048, 0]
    elif kind == "overlap":
        h["b"]["data_offsets"] = [h["a"]["data_offsets"][0], h["a"]["data_offsets"][0] + 28]
    elif kind == "gap":
        for v in h.values():
            if isinstance(v, dict) and "data_offsets" in v:
                v["data_offsets"] = [x + 8 for x in v["data_offsets"]]
        body = b"\0" * 8 + body
    elif kind == "trailing":
        body = body + b"\0" * 16
    elif kind == "float_offset":
        h["a"]["data_offsets"] = [float(a[0]), a[1]]
    elif kind == "bool_shape":
        h["b"]["shape"] = [7, True]
    elif kind == "unknown_dtype":
        h["a"]["dtype"] = "Q4"
    elif kind == "size_mismatch":
        h["a"]["shape"] = [3, 4]
    elif kind == "reversed_offsets":
        h["c"]["data_offsets"] = [5, 0]
    elif kind == "header_is_list":
        return _join(None, body, raw=b"[1, 2]   ")
    elif kind == "header_is_null":
        return _join(None, body, raw=b"null    ")
    elif kind == "entry_is_list":
        h["a"] = [1, 2]
    elif kind == "metadata_not_str":
        h["__metadata__"] = {"x": 1}
    elif kind == "duplicate_key":
        hb = json.dumps(h).encode()
        extra = b', "a": ' + json.dumps(h["a"]).encode()
        return _join(None, body, raw=hb[:-1] + extra + b"}")
    elif kind == "header_len_huge":
        return struct.pack("<Q", 2**63) + VALID[8:]
    elif kind == "truncated":
        return VALID[:-3]
    elif kind == "short":
        return VALID[:5]
    elif kind == "not_utf8":
        return _join(None, body, raw=b'{"\xff": 1}')
    elif kind == "nan_in_header":
        return _join(None, body, raw=b'{"a": NaN}')
    elif kind == "deep":
        return _join(None, body, raw=b"{\"a\":" + b"[" * 100000 + b"]" * 100000 + b"}")
    else:
        raise AssertionError(kind)
    return _join(h, body)


KINDS = ["negative_offset", "overlap", "gap", "trailing", "float_offset", "bool_shape", "unknown_dtype",
         "size_mismatch", "reversed_offsets", "header_is_list", "header_is_null", "entry_is_list",
         "metadata_not_str", "duplicate_key", "header_len_huge", "truncated", "short", "not_utf8",
         "nan_in_header", "deep"]


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_header_is_one_line_error(tmp_path, kind):
    p = _write(tmp_path, _mutated(kind))
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(p)
    _one_line(e.value, p)
    if kind in ("negative_offset", "overlap", "size_mismatch", "unknown_dtype", "float_offset"):
        assert "tensor '" in str(e.value)


@pytest.mark.parametrize("kind", ["negative_offset", "overlap", "gap", "trailing", "unknown_dtype", "size_mismatch",
                                  "header_is_list", "header_len_huge", "truncated", "reversed_offsets"])
def test_safetensors_library_rejects_them_too(kind):
    """The independent oracle: each of these is rejected by the safetensors library as well."""
    with pytest.raises(Exception):
        st_load(_mutated(kind))


# ---- fuzz -------------------------------------------------------------------------------
class _Hang(Exception):
    pass


def _guard(seconds=10):
    def handler(*_):
        raise _Hang("the reader hung")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    return old


def _check(data: bytes):
    """mxdit's reader on ``data``: its own error, or tensors inside the file equal to what
    the safetensors library reads."""
    with tempfile.TemporaryDirectory() as d:
        p = _write(d, data)
        old = _guard()
        try:
            try:
                f = SafetensorsFile(p)
            except CheckpointError as e:
                _one_line(e, p)
                return
            with f:
                size = len(data)
                for info in f.tensors.values():
                    assert f.data_start <= info.begin <= info.end <= size
                ref = st_load(data)  # whatever we accept, the library accepts
                assert set(ref) == set(f.keys())
                for k in ref:
                    got = f.read(k)
                    assert got.dtype == ref[k].dtype and got.shape == ref[k].shape
                    assert torch.equal(got.view(torch.uint8) if got.numel() else got, ref[k].view(torch.uint8) if got.numel() else ref[k])
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_byte_mutations(muts):
    b = bytearray(VALID)
    n = struct.unpack("<Q", VALID[:8])[0]
    for pos, val in muts:
        b[pos % (8 + n + 8)] = val  # mostly the length and the header, some data
    _check(bytes(b))


@_FUZZ
@given(st.integers(0, len(VALID)))
def test_fuzz_truncation(cut):
    _check(VALID[:cut])


_offset = st.one_of(st.integers(-2**64, 2**64), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=3))


@_FUZZ
@given(st.sampled_from(["a", "b", "c", "d"]), st.lists(_offset, min_size=0, max_size=3),
       st.lists(st.one_of(st.integers(-3, 10), st.booleans(), st.floats(-2, 10)), max_size=3), st.booleans())
def test_fuzz_header_fields(name, offsets, shape, set_shape):
    h, body = _split(VALID)
    try:
        json.dumps(offsets, allow_nan=True)
    except ValueError:
        return
    h[name]["data_offsets"] = offsets
    if set_shape:
        h[name]["shape"] = shape
    _check(_join(h, body, raw=json.dumps(h, allow_nan=True).encode()))


# ---- description parser -----------------------------------------------------------------
_DESC = {"model_quant_type": "W8A8_MXFP8", "version": "1.0", "blocks.0.self_attn.q.weight": "W8A8_MXFP8",
         "blocks.0.self_attn.q.bias": "FLOAT", "blocks.0.ffn.0.linear.weight": "W4A4_MXFP4_DUALSCALE",
         "blocks.0.ffn.0.div.mul_scale": "W4A4_MXFP4_DUALSCALE"}
DESC_BYTES = json.dumps(_DESC).encode()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(DESC_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=5))
def test_fuzz_description_parser(muts):
    b = bytearray(DESC_BYTES)
    for pos, val in muts:
        b[pos] = val
    with tempfile.TemporaryDirectory() as d:
        p = _write(d, bytes(b), "quant_model_description.json")
        old = _guard()
        try:
            try:
                cfg = ModelSlimConfig(load_description(p), source=p)
            except ValueError as e:
                _one_line(e, p)
                return
            assert all(isinstance(v, str) for v in cfg.labels.values()) or cfg.labels is not None
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


def test_description_duplicate_key_and_list(tmp_path):
    p = _write(tmp_path, b'{"a.weight": "FLOAT", "a.weight": "W8A8_MXFP8"}', "d.json")
    with pytest.raises(ValueError, match="duplicate key 'a.weight'"):
        load_description(p)
    p = _write(tmp_path, b'["a"]', "e.json")
    with pytest.raises(ValueError, match="must be a JSON object"):
        load_description(p)


# ---- shard indexes ----------------------------------------------------------------------
def _sharded(d, index: dict | list | None = None, raw: bytes | None = None):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "diffusion_pytorch_model-00001-of-00002.safetensors"), "wb") as f:
        f.write(st_save({"a": torch.ones(2)}))
    with open(os.path.join(d, "diffusion_pytorch_model-00002-of-00002.safetensors"), "wb") as f:
        f.write(st_save({"b": torch.ones(3)}))
    if index is None and raw is None:
        index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    with open(os.path.join(d, "diffusion_pytorch_model.safetensors.index.json"), "wb") as f:
        f.write(raw if raw is not None else json.dumps(index).encode())
    return os.path.join(d, "diffusion_pytorch_model.safetensors.index.json")


def _files(d):
    from mxdit.loader.safetensors_io import index_weight_map

    paths = resolve_weight_files(d, "diffusion_pytorch_model")
    return CheckpointFiles(paths, index_weight_map(d, "diffusion_pytorch_model"), "index")


def test_valid_index(tmp_path):
    _sharded(str(tmp_path / "m"))
    f = _files(str(tmp_path / "m"))
    assert sorted(f.keys()) == ["a", "b"]


@pytest.mark.parametrize("shard", ["../outside/x.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "", 3, None])
def test_index_shard_names_outside_refused(tmp_path, shard):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(st_save({"a": torch.ones(2)}))
    idx = _sharded(str(tmp_path / "m"), {"weight_map": {"a": shard, "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}})
    with pytest.raises(CheckpointError) as e:
        resolve_weight_files(str(tmp_path / "m"), "diffusion_pytorch_model")
    _one_line(e.value, idx)
    assert "tensor 'a'" in str(e.value)


def test_index_symlink_leaving_dir_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(st_save({"a": torch.ones(2)}))
    d = tmp_path / "m"
    idx = _sharded(str(d), {"weight_map": {"a": "link.safetensors", "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}})
    os.symlink(outside, d / "link.safetensors")
    with pytest.raises(CheckpointError, match="symlink that leaves the model directory") as e:
        resolve_weight_files(str(d), "diffusion_pytorch_model")
    _one_line(e.value, idx)


def test_index_hf_cache_symlinks_allowed(tmp_path):
    """Hugging Face cache snapshots are symlinks into the repo's blobs/ folder: allowed."""
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_bytes(st_save({"a": torch.ones(2)}))
    d = repo / "snapshots" / "rev" / "transformer"
    idx = _sharded(str(d), {"weight_map": {"a": "s1.safetensors", "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}})
    os.symlink(repo / "blobs" / "abc", d / "s1.safetensors")
    assert os.path.isfile(idx)
    assert sorted(_files(str(d)).keys()) == ["a", "b"]


@pytest.mark.parametrize("raw,match", [
    (b"[1]", "must be a JSON object"), (b"null", "must be a JSON object"), (b'{"weight_map": []}', "no 'weight_map'"),
    (b'{"weight_map": {"a": "s.safetensors", "a": "t.safetensors"}}', "duplicate key 'a'"), (b"{", "not valid JSON"),
])
def test_index_malformed(tmp_path, raw, match):
    idx = _sharded(str(tmp_path / "m"), raw=raw)
    with pytest.raises(CheckpointError, match=match) as e:
        resolve_weight_files(str(tmp_path / "m"), "diffusion_pytorch_model")
    _one_line(e.value, idx)


def test_index_disagrees_with_shards(tmp_path):
    d = str(tmp_path / "m")
    _sharded(d, {"weight_map": {"a": "diffusion_pytorch_model-00002-of-00002.safetensors",
                                "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}})
    with pytest.raises(CheckpointError, match="tensor 'a' is listed in shard"):
        _files(d)


def test_tensor_in_two_shards(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(st_save({"a": torch.ones(2)}))
    (d / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(st_save({"a": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="tensor 'a' appears in both"):
        open_checkpoint(str(d))


# ---- config.json ------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [b"[1, 2]", b"null", b'{"num_layers": "three", "num_attention_heads": 2}',
                                 b'{"num_attention_heads": 2, "num_attention_heads": 3}', b"{"])
def test_config_json_wrong_typed(tmp_path, raw):
    d = tmp_path / "m"
    d.mkdir()
    (d / "diffusion_pytorch_model.safetensors").write_bytes(st_save({"a": torch.ones(2)}))
    (d / "config.json").write_bytes(raw)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(d))
    _one_line(e.value, str(d / "config.json"))
