"""`mxdit demo --numerics`: the table's bits per value follow from the formats, and the
errors are ordered as the element widths say (8-bit formats beat 4-bit ones)."""
import re

from mxdit.tools.numerics_demo import run


def test_numerics_table():
    text = run(rows=64, width=1024)
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (weight|activation) [^|]+\| ([^|]+) \| ([\d.]+) \| ([\d.inf]+) \|", line)
        if m:
            rows[(m.group(1), m.group(2).strip())] = (float(m.group(3)), float(m.group(4)))
    assert rows[("weight", "MXFP8 E4M3 (floor)")][0] == 8.25
    assert rows[("weight", "MXFP4 E2M1 (floor)")][0] == 4.25
    assert abs(rows[("weight", "MXFP4 dual-level")][0] - 4.3125) < 0.01
    for kind in ("weight", "activation"):
        fp8 = rows[(kind, "MXFP8 E4M3 (floor)")][1]
        fp4 = rows[(kind, "MXFP4 E2M1 (floor)")][1]
        assert fp8 > fp4 + 6  # ~2 more mantissa bits, ~6 dB each
        assert rows[(kind, "BF16 (reference)")][1] == float("inf")
