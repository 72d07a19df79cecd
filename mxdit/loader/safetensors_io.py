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

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "F8_E8M0": torch.float8_e8m0fnu,
}
_PAGE = mmap.PAGESIZE


class SafetensorsError(ValueError):
    pass


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
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"'{path}' is not a safetensors file: shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 * 2**20:
                    raise SafetensorsError(
                        f"'{path}' is truncated or not a safetensors file: header length {n} exceeds the file size {size}"
                    )
                header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"'{path}' is not a safetensors file: its header is not JSON ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                b, e = info["data_offsets"]
                shape = tuple(int(s) for s in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"'{path}': tensor '{name}' has an invalid header entry {info!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if e - b != numel * dtype.itemsize:
                raise SafetensorsError(
                    f"'{path}': tensor '{name}' spans {e - b} bytes but shape {shape} of {info['dtype']} needs {numel * dtype.itemsize}"
                )
            if base + e > size:
                raise SafetensorsError(
                    f"'{path}' is truncated: tensor '{name}' ends at byte {base + e}, the file has {size}"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, base + b, base + e, path)
        self._file = None
        self._mm: Optional[mmap.mmap] = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._file = open(self.path, "rb")
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def read(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Copy one tensor out of the file (onto ``device``) and release its pages."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        nbytes = info.end - info.begin
        if nbytes:
            mm = self._map()
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
        if device is not None and torch.device(device) != out.device:
            out = out.to(device)
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


class CheckpointFiles:
    """Several safetensors files seen as one name -> tensor mapping (shards)."""

    def __init__(self, paths: list[str]):
        if not paths:
            raise FileNotFoundError("no safetensors files given")
        self.files = [SafetensorsFile(p) for p in paths]
        self.index: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                if k in self.index:
                    raise SafetensorsError(f"tensor '{k}' appears in both '{self.index[k].path}' and '{f.path}'")
                self.index[k] = f

    def keys(self) -> list[str]:
        return list(self.index)

    def info(self, name: str) -> TensorInfo:
        return self.index[name].tensors[name]

    def read(self, name: str, device=None) -> torch.Tensor:
        return self.index[name].read(name, device)

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


def resolve_weight_files(directory: str, stem: str) -> Optional[list[str]]:
    """``<stem>.safetensors``, or the shards named by ``<stem>.safetensors.index.json``, or
    ``<stem>-*-of-*.safetensors``; None if there are none."""
    index = os.path.join(directory, f"{stem}.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise SafetensorsError(f"'{index}' has no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        missing = [p for p in files if not os.path.isfile(os.path.join(directory, p))]
        if missing:
            raise FileNotFoundError(f"'{index}' names shard files that do not exist: {missing}")
        return [os.path.join(directory, p) for p in files]
    single = os.path.join(directory, f"{stem}.safetensors")
    if os.path.isfile(single):
        return [single]
    import glob

    shards = sorted(glob.glob(os.path.join(directory, f"{stem}-*-of-*.safetensors")))
    return shards or None


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
                raise SafetensorsError(
                    f"writing '{path}': tensor '{name}' is {t.dtype} {tuple(t.shape)}, the header says {dtype} {tuple(shape)}"
                )
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no extra copy
            del t
