"""Row chunking: the one loop that walks a 2-D tensor a few rows at a time.

Every weight-sized computation in mxdit (online quantization, ``mxdit quantize``'s rules and SQNR,
finite checks, column maxima) runs on row chunks so that its temporaries are those of one chunk,
not of the whole weight.  MX blocks run along K, inside a row, so chunking rows never changes a result.
"""
from __future__ import annotations

from typing import Iterator

#: about this many elements per chunk (1M: ~4 MB fp32; the temporaries of a quantizer are a few times that)
ROW_CHUNK_ELEMENTS = 1 << 20


def rows_per_chunk(row_elements: int, chunk_elements: int = ROW_CHUNK_ELEMENTS) -> int:
    """Rows of ``row_elements`` each that fit in ``chunk_elements`` (at least 1)."""
    return max(1, chunk_elements // max(1, row_elements))


def row_chunks(rows: int, row_elements: int, chunk_elements: int = ROW_CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """``(r0, r1)`` row ranges covering ``range(rows)``, each about ``chunk_elements`` elements."""
    step = rows_per_chunk(row_elements, chunk_elements)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)
