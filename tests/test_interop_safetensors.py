"""The safetensors reader and writer: the V4.1 example file, round trips, shards, bad input."""

import json
import pathlib
import struct

import ml_dtypes
import numpy as np
import pytest

from engram_jax.interop import safetensors as st

V41 = pathlib.Path(__file__).parent / "data" / "v41" / "engram.safetensors"


def _raw_header(path) -> tuple[dict, int]:
  """The header and the data buffer's start, parsed here independently of the module."""
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(n)), 8 + n


def _raw_file(path, header: dict, data: bytes = b"", length: int | None = None):
  encoded = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
  return path


def test_reads_the_v41_example():
  ckpt = st.Checkpoint.open(V41)
  header, _ = _raw_header(V41)
  assert ckpt.names == sorted(k for k in header if k != "__metadata__")
  assert len(ckpt) == 12 and "layers.3.engram.wkv.scale" in ckpt and "nope" not in ckpt
  assert ckpt.metadata == header["__metadata__"]
  expected = {
    "layers.1.engram.embed.weight": ("F8_E4M3", (24562, 32), ml_dtypes.float8_e4m3fn),
    "layers.1.engram.embed.scale": ("F8_E8M0", (24562, 1), np.uint8),
    "layers.3.engram.wkv.weight": ("F8_E4M3", (640, 384), ml_dtypes.float8_e4m3fn),
    "layers.3.engram.wkv.scale": ("F8_E8M0", (20, 12), np.uint8),
    "layers.1.engram.q_weight": ("BF16", (4, 128), ml_dtypes.bfloat16),
  }
  for name, (dtype, shape, np_dtype) in expected.items():
    info = ckpt.info(name)
    assert (info.dtype, info.shape, info.path) == (dtype, shape, V41)
    array = ckpt.require(name, dtype, shape)
    assert isinstance(array, np.memmap) and not array.flags.writeable
    assert array.dtype == np_dtype and array.shape == shape
  assert ckpt.require("layers.1.engram.embed.weight", shape=(None, 32)).shape == (24562, 32)


def test_values_equal_the_file_bytes():
  ckpt = st.Checkpoint.open(V41)
  header, start = _raw_header(V41)
  raw = V41.read_bytes()
  for name in ("layers.1.engram.q_weight", "layers.3.engram.k_weight"):
    begin, end = header[name]["data_offsets"]
    # BF16 is the top half of a float32: widen the little-endian u16 by hand.
    bits = np.frombuffer(raw[start + begin : start + end], "<u2").astype(np.uint32) << 16
    expected = bits.view(np.float32).reshape(header[name]["shape"])
    np.testing.assert_array_equal(ckpt.array(name).astype(np.float32), expected)
    assert ckpt.info(name).offset == start + begin
  for name in ("layers.1.engram.embed.weight", "layers.1.engram.embed.scale"):
    begin, end = header[name]["data_offsets"]
    assert ckpt.array(name).tobytes() == raw[start + begin : start + end]


def _example(name: str, shape=(3, 5)) -> np.ndarray:
  rng = np.random.default_rng(0)
  dtype = st.DTYPES[name]
  if dtype == np.bool_:
    return rng.random(shape) > 0.5
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
  return (rng.standard_normal(shape) * 4).astype(dtype)


@pytest.mark.parametrize("name", sorted(st.DTYPES))
def test_round_trip_every_dtype(tmp_path, name):
  tensors = {"a": _example(name), "empty": _example(name, (0, 4)), "scalar": _example(name, ())}
  overrides = dict.fromkeys(tensors, name) if name == "F8_E8M0" else None
  st.write(tmp_path / "x.safetensors", tensors, {"k": "v"}, dtypes=overrides)
  ckpt = st.Checkpoint.open(tmp_path / "x.safetensors")
  assert ckpt.names == ["a", "empty", "scalar"] and ckpt.metadata == {"k": "v"}
  for key, array in tensors.items():
    assert ckpt.info(key).dtype == name
    got = ckpt.require(key, name, array.shape)
    assert isinstance(got, np.memmap) and got.dtype == array.dtype
    assert got.tobytes() == array.tobytes()


def test_write_layout_streams_and_reads_back_the_v41_file(tmp_path, monkeypatch):
  monkeypatch.setattr(st, "_WRITE_CHUNK_BYTES", 1000)  # many chunks per tensor
  source = st.Checkpoint.open(V41)
  header, _ = _raw_header(V41)
  names = list(reversed([k for k in header if k != "__metadata__"]))
  tensors = {n: source.array(n) for n in names}  # memmaps in, streamed out
  scales = {n: "F8_E8M0" for n in names if n.endswith(".scale")}
  out = st.write(tmp_path / "copy.safetensors", tensors, source.metadata, dtypes=scales)
  copy, start = _raw_header(out)
  assert (start - 8) % 8 == 0  # the header is padded to a multiple of 8 bytes
  assert [k for k in copy if k != "__metadata__"] == names  # in the order given
  assert [copy[n]["data_offsets"][0] for n in names] == sorted(
    copy[n]["data_offsets"][0] for n in names
  )
  ckpt = st.Checkpoint.open(out)
  for n in names:
    assert (copy[n]["dtype"], copy[n]["shape"]) == (header[n]["dtype"], header[n]["shape"])
    assert ckpt.array(n).tobytes() == tensors[n].tobytes()


def test_big_endian_input_is_written_little_endian(tmp_path):
  array = np.arange(6, dtype=">i4").reshape(2, 3)
  st.write(tmp_path / "x.safetensors", {"a": array})
  got = st.Checkpoint.open(tmp_path / "x.safetensors").require("a", "I32", (2, 3))
  np.testing.assert_array_equal(got, array)


def test_sharded_directory_list_and_glob(tmp_path):
  shards = tmp_path / "ckpt"
  shards.mkdir()
  a, b, c = _example("F32"), _example("BF16"), _example("I8")
  st.write(shards / "model-1.safetensors", {"a": a, "b": b}, {"shard": "1"})
  st.write(shards / "model-2.safetensors", {"c": c, "stale": a}, {"shard": "2", "x": "y"})
  index = {"metadata": {"total_size": 1}, "weight_map": {"a": "model-1.safetensors"}}
  index["weight_map"] |= {"b": "model-1.safetensors", "c": "model-2.safetensors"}
  (shards / st.INDEX_FILE).write_text(json.dumps(index))
  ckpt = st.Checkpoint.open(shards)
  assert ckpt.names == ["a", "b", "c"]  # 'stale' is in a shard but not in the weight map
  assert ckpt.metadata == {"shard": "2", "x": "y"}
  assert ckpt.info("c").path == shards / "model-2.safetensors"
  for name, array in {"a": a, "b": b, "c": c}.items():
    np.testing.assert_array_equal(ckpt.array(name), array)
  files = sorted(shards.glob("*.safetensors"))
  assert st.Checkpoint.open(files).names == ["a", "b", "c", "stale"]
  (shards / st.INDEX_FILE).unlink()
  assert st.Checkpoint.open(shards).names == ["a", "b", "c", "stale"]


def test_sharded_errors(tmp_path):
  st.write(tmp_path / "1.safetensors", {"a": _example("F32")})
  st.write(tmp_path / "2.safetensors", {"a": _example("F32")})
  with pytest.raises(ValueError, match="'a' in both"):
    st.Checkpoint.open(tmp_path)
  (tmp_path / st.INDEX_FILE).write_text(json.dumps({"weight_map": {"b": "1.safetensors"}}))
  with pytest.raises(ValueError, match="index puts 'b' in"):
    st.Checkpoint.open(tmp_path)
  (tmp_path / st.INDEX_FILE).write_text(json.dumps({"metadata": {}}))
  with pytest.raises(ValueError, match="weight_map"):
    st.Checkpoint.open(tmp_path)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"no .*safetensors files"):
    st.Checkpoint.open(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no such file"):
    st.Checkpoint.open(tmp_path / "missing.safetensors")


def _good_entry():
  return {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
  ("header", "data", "length", "message"),
  [
    (None, b"", None, "expected at least 8 bytes"),
    ({"t": _good_entry()}, b"\0" * 8, 10_000, "header length 10000 goes beyond the file"),
    ({"t": _good_entry()}, b"\0" * 4, None, r"'t': data_offsets \[0, 8\] outside the data"),
    (
      {"t": _good_entry() | {"shape": [3]}},
      b"\0" * 8,
      None,
      r"'t': 8 bytes for F32 \[3\], expected 12",
    ),
    ({"t": _good_entry() | {"dtype": "F4"}}, b"\0" * 8, None, "'t': unknown dtype 'F4'"),
    ({"t": _good_entry() | {"shape": [-2]}}, b"\0" * 8, None, "'t': expected a shape"),
    ({"t": {"dtype": "F32"}}, b"", None, "'t': expected an entry"),
    ({"__metadata__": {"a": 1}}, b"", None, "__metadata__ to map strings"),
    ([1, 2], b"", None, "expected a JSON object"),
  ],
)
def test_bad_headers(tmp_path, header, data, length, message):
  path = tmp_path / "bad.safetensors"
  if header is None:
    path.write_bytes(b"\1\0\0")  # truncated in the header length
  else:
    _raw_file(path, header, data, length)
  with pytest.raises(ValueError, match=message) as error:
    st.Checkpoint.open(path)
  assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_bad_json_and_duplicate_names(tmp_path):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(struct.pack("<Q", 4) + b"{no}")
  with pytest.raises(ValueError, match="header is not JSON"):
    st.Checkpoint.open(path)
  encoded = b'{"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"t":{}}'
  path.write_bytes(struct.pack("<Q", len(encoded)) + encoded)
  with pytest.raises(ValueError, match="names 't' twice"):
    st.Checkpoint.open(path)


def test_require_and_missing_tensor_messages():
  ckpt = st.Checkpoint.open(V41)
  with pytest.raises(
    ValueError, match=r"^layers\.1\.engram\.embed\.scale: expected dtype BF16, got"
  ):
    ckpt.require("layers.1.engram.embed.scale", "BF16")
  with pytest.raises(ValueError, match=r"expected shape \(24562, 8\), got \(24562, 1\)"):
    ckpt.require("layers.1.engram.embed.scale", "F8_E8M0", (24562, 8))
  with pytest.raises(ValueError, match=r"expected shape \('\*',\), got"):
    ckpt.require("layers.1.engram.embed.scale", shape=(None,))
  with pytest.raises(
    KeyError, match=r"no tensor 'layers\.2\.engram\.embed\.weight' \(has 12 tensors"
  ):
    ckpt.require("layers.2.engram.embed.weight", "F8_E4M3")


def test_write_refuses_to_overwrite_and_bad_dtypes(tmp_path):
  path = st.write(tmp_path / "x.safetensors", {"a": np.zeros(3, np.float32)})
  before = path.read_bytes()
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    st.write(path, {"b": np.ones(3, np.float32)})
  assert path.read_bytes() == before
  with pytest.raises(ValueError, match=r"dtypes\['a'\]: expected a 4-byte dtype, got 'F8_E8M0'"):
    st.write(tmp_path / "y.safetensors", {"a": np.zeros(3, np.float32)}, dtypes={"a": "F8_E8M0"})
  with pytest.raises(ValueError, match="not among the tensors"):
    st.write(tmp_path / "y.safetensors", {"a": np.zeros(3)}, dtypes={"b": "F64"})
  with pytest.raises(ValueError, match="safetensors dtypes, got complex64"):
    st.write(tmp_path / "y.safetensors", {"a": np.zeros(3, np.complex64)})
  with pytest.raises(ValueError, match="metadata"):
    st.write(tmp_path / "y.safetensors", {"a": np.zeros(3)}, metadata={"n": 1})
  assert not (tmp_path / "y.safetensors").exists()
