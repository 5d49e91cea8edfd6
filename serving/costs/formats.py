"""A cost report's JSON (``GET /admin/costs``) as finance reads it: an aligned table, CSV
or JSON. ``gpugate costs report`` prints it and the web console's download serves it, so
both give the same bytes for the same report."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

COLUMNS = ("requests", "rows", "used_ns", "idle_ns", "gpu_seconds", "gpu_hours", "cost", "currency")


def render_report(data: dict[str, Any], fmt: str) -> str:
    """A report's JSON (``GET /admin/costs``) as ``table``, ``csv`` or ``json``; the last
    row is the TOTAL."""
    if fmt == "json":
        return json.dumps(data, indent=2)
    group_by = list(data["group_by"])
    header = [*group_by, *COLUMNS]
    body = [[r.get(h, "") for h in header] for r in data["rows"]]
    totals = data["totals"]
    total_line = ["TOTAL", *[""] * (len(group_by) - 1)] if group_by else []
    total_line += [totals[h] for h in COLUMNS]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
        writer.writerow(total_line)
        return buf.getvalue()
    text_rows = [
        header,
        *[[cell_text(c) for c in row] for row in body],
        [cell_text(c) for c in total_line],
    ]
    widths = [max(len(row[i]) for row in text_rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in text_rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    lines.append(
        f"window {data['from']} .. {data['to']}; reserved "
        f"{totals['reserved_gpu_seconds']:.3f} device-s (used + idle)"
    )
    return "\n".join(lines)


def cell_text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)
