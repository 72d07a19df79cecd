"""Streaming safetensors reader (never pickle).

Why not ``safetensors.safe_open``: it keeps the whole file mapped, and every
page a tensor touched stays resident in the process until the file is closed,
so loading a 14B expert would show the whole BF16 checkpoint in RSS even when
the weights are quantized as they arrive.  This reader maps the file
(``mmap``), copies one tensor out and immediately tells the kernel it no
longer needs those pages (``madvise(MADV_DONTNEED)``), so peak memory stays
near the size of the model being built.  The header is validated against the
file size, so a truncated file fails with a message naming it.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from mxdit.formats.chunks import row_chunks
from mxdit.fsutil import parse_json_strict as _parse_json_strict, read_json_strict as _read_json_strict

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "F8_E8M0": torch.float8_e8m0fnu,
}
_PAGE = mmap.PAGESIZE


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted (header, index, offsets...).  The message is
    one line naming the file and, where there is one, the tensor."""


SafetensorsError = CheckpointError  # the name this error had before; kept for callers

#: the safetensors library's limit on the header size
MAX_HEADER = 100 * 2**20


def load_json_strict(path: str, what: str = "JSON file"):
    return _read_json_strict(path, what, error=CheckpointError)


def parse_json_strict(raw: bytes, where: str, what: str = "JSON"):
    return _parse_json_strict(raw, where, what, error=CheckpointError)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(path: str, file_size: int, head: bytes) -> tuple[dict[str, "TensorInfo"], dict[str, str], int]:
    """Validate a safetensors header as strictly as the safetensors library does.

    ``head`` is the first bytes of the file (at least 8 + header length, or the whole
    file if shorter).  Checks: header length within the file and <= 100 MiB; a UTF-8 JSON
    object with no duplicate keys; ``__metadata__`` a str -> str object; every tensor an
    object with exactly ``dtype`` (a known name), ``shape`` (non-negative integers) and
    ``data_offsets`` (two non-negative integers, begin <= end); byte count == dtype x shape;
    offsets contiguous from 0, non-overlapping, and covering the data section exactly.
    Returns (tensors with absolute offsets, metadata, data start).
    """
    if len(head) < 8:
        raise CheckpointError(f"'{path}' is not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", head[:8])
    if n > file_size - 8 or n > MAX_HEADER:
        raise CheckpointError(
            f"'{path}' is truncated or not a safetensors file: header length {n} exceeds the file size {file_size}"
            if n > file_size - 8 else f"'{path}': header length {n} exceeds the 100 MiB limit"
        )
    raw = head[8:8 + n]
    if not raw.lstrip(b" ").startswith(b"{"):
        raise CheckpointError(f"'{path}' is not a safetensors file: its header is not a JSON object")
    header = parse_json_strict(raw, path, "its header")
    if not isinstance(header, dict):
        raise CheckpointError(f"'{path}' is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"'{path}': __metadata__ must be an object of strings")
    base = 8 + n
    data_len = file_size - base
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"'{path}': tensor '{name}' has an invalid header entry {_short(info)}"
                                  " (expected an object with dtype, shape, data_offsets)")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise CheckpointError(f"'{path}': tensor '{name}' has an unknown dtype {_short(dt)} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise CheckpointError(f"'{path}': tensor '{name}' has an invalid shape {_short(shape)} (expected non-negative integers)")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) and o >= 0 for o in offs)
                or offs[0] > offs[1]):
            raise CheckpointError(f"'{path}': tensor '{name}' has invalid data_offsets {_short(offs)}"
                                  " (expected [begin, end], non-negative integers, begin <= end)")
        dtype = DTYPES[dt]
        numel = 1
        for s in shape:
            numel *= s
        if offs[1] - offs[0] != numel * dtype.itemsize:
            raise CheckpointError(
                f"'{path}': tensor '{name}' spans {offs[1] - offs[0]} bytes but shape {tuple(shape)} of {dt} needs {numel * dtype.itemsize}"
            )
        entries.append((offs[0], offs[1], name, dtype, tuple(shape)))
    entries.sort(key=lambda e: (e[0], e[1]))
    pos = 0
    tensors: dict[str, TensorInfo] = {}
    for b, e, name, dtype, shape in entries:
        if b != pos:
            raise CheckpointError(
                f"'{path}': tensor '{name}' starts at data byte {b}, expected {pos} "
                f"({'overlaps the previous tensor' if b < pos else 'a gap before it'}; offsets must be contiguous)"
            )
        if base + e > file_size:
            raise CheckpointError(f"'{path}' is truncated: tensor '{name}' ends at byte {base + e}, the file has {file_size}")
        pos = e
        tensors[name] = TensorInfo(name, dtype, shape, base + b, base + e, path)
    if pos != data_len:
        raise CheckpointError(
            f"'{path}': the tensors cover {pos} bytes of data but the file holds {data_len} after the header"
            + (" (truncated?)" if pos > data_len else " (trailing bytes)")
        )
    # keep the header's order (writers put tensors in model order)
    ordered = {name: tensors[name] for name in header}
    return ordered, metadata, base


def _short(x, limit: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[:limit] + "..."


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int
    file: str


class SafetensorsFile:
    """One .safetensors file: header parsed and validated at open, tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) == 8:
                    (n,) = struct.unpack("<Q", head)
                    if n <= size - 8 and n <= MAX_HEADER:
                        head += f.read(n)
        except OSError as e:
            raise CheckpointError(f"cannot read '{path}': {e.strerror or e}") from None
        self.size = size
        self.tensors, self.metadata, self.data_start = parse_header(path, size, head)
        self._file = None
        self._mm: Optional[mmap.mmap] = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._file = open(self.path, "rb")
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def read(self, name: str, device: torch.device | str | None = None, *, finite: bool = False) -> torch.Tensor:
        """Copy one tensor out of the file (onto ``device``) and release its pages.  ``finite``:
        a NaN/Inf value (for E8M0, the NaN code 255) is a :class:`CheckpointError`."""
        out = self._read(name)
        if finite:
            check_finite_tensor(out, name, self.path)
        if device is not None and torch.device(device) != out.device:
            out = out.to(device)
        return out

    def _read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        nbytes = info.end - info.begin
        if nbytes:
            mm = self._map()
            if len(mm) < info.end:  # the file shrank after its header was checked
                raise CheckpointError(f"'{self.path}' changed while being read: tensor '{name}' ends at byte {info.end}, the file now has {len(mm)}")
            dst = out.view(-1).view(torch.uint8) if out.dim() else out.reshape(1).view(torch.uint8)
            with warnings.catch_warnings():  # read-only buffer: we only copy out of it
                warnings.simplefilter("ignore", UserWarning)
                src = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=info.begin)
            dst.copy_(src)
            del src
            lo = info.begin - info.begin % _PAGE
            try:
                mm.madvise(mmap.MADV_DONTNEED, lo, info.end - lo)
            except (AttributeError, OSError, ValueError):  # platforms without madvise
                pass
        return out

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._file.close()
            self._mm = self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_NAN_CODES = {  # byte patterns of NaN/Inf in the 8-bit float formats (mask, value)
    torch.float8_e8m0fnu: [(0xFF, 0xFF)], torch.float8_e4m3fn: [(0x7F, 0x7F)], torch.float8_e5m2: [(0x7C, 0x7C)],
}


def check_finite_tensor(t: torch.Tensor, name: str, path: str) -> None:
    """Raise a one-line :class:`CheckpointError` naming the tensor and file if ``t`` holds
    NaN or Inf (checked in chunks: no full-size mask)."""
    if not (t.is_floating_point() or t.dtype in _NAN_CODES) or t.numel() == 0:
        return
    flat = t.reshape(-1)
    codes = _NAN_CODES.get(t.dtype)
    bad_count = 0
    for i, i1 in row_chunks(flat.numel(), 1):  # chunks of ROW_CHUNK_ELEMENTS elements
        c = flat[i:i1]
        if codes is not None:
            b = c.view(torch.uint8)
            bad = torch.zeros_like(b, dtype=torch.bool)
            for mask, val in codes:
                bad |= (b & mask) == val
        else:
            bad = ~torch.isfinite(c)
        n = int(bad.sum())
        if n and not bad_count:
            first = i + int(bad.nonzero()[0, 0])
        bad_count += n
    if bad_count:
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(first), t.shape)) if t.dim() else ()
        raise CheckpointError(
            f"'{path}': tensor '{name}' has {bad_count} non-finite value(s) (first at index {idx}); "
            f"NaN/Inf weights and scales are refused"
        )


class CheckpointFiles:
    """Several safetensors files seen as one name -> tensor mapping (shards)."""

    def __init__(self, paths: list[str], weight_map: Optional[dict[str, str]] = None, index_path: str = "index"):
        if not paths:
            raise FileNotFoundError("no safetensors files given")
        self.files = [SafetensorsFile(p) for p in paths]
        self.index: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                if k in self.index:
                    raise CheckpointError(f"tensor '{k}' appears in both '{self.index[k].path}' and '{f.path}'")
                self.index[k] = f
        if weight_map is not None:  # the index and the shards' headers must agree
            for k, shard in weight_map.items():
                f = self.index.get(k)
                if f is None:
                    raise CheckpointError(f"'{index_path}': tensor '{k}' is listed in shard '{os.path.basename(shard)}' but no shard holds it")
                if os.path.abspath(f.path) != os.path.abspath(shard):
                    raise CheckpointError(f"'{index_path}': tensor '{k}' is listed in shard '{os.path.basename(shard)}' but is in '{f.path}'")
            extra = [k for k in self.index if k not in weight_map]
            if extra:
                raise CheckpointError(f"'{index_path}': tensor '{extra[0]}' (in '{self.index[extra[0]].path}') is not listed in the index"
                                      + (f" ({len(extra) - 1} more)" if len(extra) > 1 else ""))

    def keys(self) -> list[str]:
        return list(self.index)

    def info(self, name: str) -> TensorInfo:
        return self.index[name].tensors[name]

    def read(self, name: str, device=None, *, finite: bool = False) -> torch.Tensor:
        return self.index[name].read(name, device, finite=finite)

    @property
    def metadata(self) -> dict[str, str]:
        md: dict[str, str] = {}
        for f in self.files:
            md.update(f.metadata)
        return md

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def close(self) -> None:
        for f in self.files:
            f.close()


def _inside(directory: str, path: str) -> bool:
    real_dir = os.path.realpath(directory)
    real = os.path.realpath(path)
    if os.path.commonpath([real_dir, real]) == real_dir:
        return True
    # a Hugging Face cache snapshot: files are symlinks into the same repo's blobs/ folder
    parts = real_dir.split(os.sep)
    if "snapshots" in parts:
        repo = os.sep.join(parts[: len(parts) - 1 - parts[::-1].index("snapshots")])
        blobs = os.path.join(repo, "blobs")
        return os.path.dirname(real) == blobs
    return False


def check_shard_name(directory: str, index: str, shard, tensor: str) -> str:
    """The path of an index's shard entry, refused unless it is a plain file name inside
    ``directory`` (no separators, no ``..``, not absolute, no symlink that leaves it)."""
    if (not isinstance(shard, str) or not shard or shard in (".", "..") or "/" in shard or "\\" in shard
            or os.sep in shard or (os.altsep and os.altsep in shard) or "\0" in shard):
        raise CheckpointError(
            f"'{index}': tensor '{tensor}' names shard {_short(shard)}; expected a plain file name inside the model directory"
        )
    p = os.path.join(directory, shard)
    if not _inside(directory, p):
        raise CheckpointError(f"'{index}': shard '{shard}' (tensor '{tensor}') is a symlink that leaves the model directory")
    return p


def resolve_weight_files(directory: str, stem: str) -> Optional[list[str]]:
    """``<stem>.safetensors``, or the shards named by ``<stem>.safetensors.index.json``, or
    ``<stem>-*-of-*.safetensors``; None if there are none.  An index is checked: a JSON
    object whose ``weight_map`` maps tensor names to plain shard file names inside the
    directory (see :func:`check_shard_name`)."""
    index = os.path.join(directory, f"{stem}.safetensors.index.json")
    if os.path.isfile(index):
        doc = load_json_strict(index, "the shard index")
        if not isinstance(doc, dict):
            raise CheckpointError(f"'{index}': the shard index must be a JSON object, got {type(doc).__name__}")
        weight_map = doc.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"'{index}' has no 'weight_map' object")
        paths = {}
        for tensor, shard in weight_map.items():
            if shard not in paths:
                paths[shard] = check_shard_name(directory, index, shard, tensor)
        missing = [s for s, p in sorted(paths.items()) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"'{index}' names shard files that do not exist: {missing}")
        return [paths[s] for s in sorted(paths)]
    single = os.path.join(directory, f"{stem}.safetensors")
    if os.path.isfile(single):
        return [single]
    import glob

    shards = sorted(glob.glob(os.path.join(directory, f"{stem}-*-of-*.safetensors")))
    return shards or None


def index_weight_map(directory: str, stem: str) -> Optional[dict[str, str]]:
    """``{tensor: shard path}`` of ``<stem>.safetensors.index.json`` (validated), or None."""
    index = os.path.join(directory, f"{stem}.safetensors.index.json")
    if not os.path.isfile(index):
        return None
    wm = load_json_strict(index, "the shard index")["weight_map"]
    return {t: os.path.join(directory, s) for t, s in wm.items()}


_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def write_safetensors(path: str, entries, metadata: Optional[dict[str, str]] = None) -> None:
    """Write a safetensors file tensor by tensor (peak memory: one tensor).

    ``entries``: a sequence of ``(name, dtype, shape, produce)`` where
    ``produce()`` returns the tensor (called once, in order).  Shapes and dtypes
    are needed up front for the header; a produced tensor that disagrees is an
    error.  The layout matches ``safetensors.torch.save_file`` (8-byte header
    length, JSON header padded with spaces to 8 bytes, data in header order).
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape, _ in entries:
        n = 1
        for s in shape:
            n *= int(s)
        size = n * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + size]}
        offset += size
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    from mxdit.fsutil import atomic_file

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, dtype, shape, produce in entries:
            t = produce()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise CheckpointError(
                    f"writing '{path}': tensor '{name}' is {t.dtype} {tuple(t.shape)}, the header says {dtype} {tuple(shape)}"
                )
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no extra copy
            del t
