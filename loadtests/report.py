"""The benchmark's tables and headline figures, from the rows ``bench.py`` measured."""

from __future__ import annotations

from inprocess import InProcessResult
from loadgen import LevelResult, NoisyResult, fmt

# Every system bench.py knows, in the tables' order. gpugate-2gw is gpugate with two
# gateway replicas sharing its ports (server.gateway_replicas: 2); run on request.
SYSTEMS = ("gpugate", "gpugate-2gw", "rayserve", "triton", "null")
DEFAULT_SYSTEMS = ("gpugate", "rayserve", "triton", "null")
GATEWAYS = {"gpugate": 1, "gpugate-2gw": 2}  # the gpugate systems and their gateways


def is_gpugate(system: str) -> bool:
    return system in GATEWAYS


def add_ratios(rows: list[LevelResult], limit: InProcessResult | None) -> None:
    peer = {r.concurrency: r.req_per_s for r in rows if r.system == "rayserve"}
    triton = {(r.protocol, r.concurrency): r.req_per_s for r in rows if r.system == "triton"}
    for r in rows:
        if limit is not None and r.system != "null":
            r.share_of_limit = r.rows_per_s / limit.rows_per_s
        if is_gpugate(r.system) or r.system == "rayserve":
            base = peer.get(r.concurrency)
            r.ratio_vs_peer = r.req_per_s / base if base else None
        if is_gpugate(r.system) or r.system == "triton":
            base = triton.get((r.protocol, r.concurrency))
            r.ratio_vs_triton = r.req_per_s / base if base else None


def render_table(rows: list[LevelResult], limit: InProcessResult | None) -> str:
    head = (
        f"{'system':<12} {'protocol':<8} {'conc':>4} {'req/s':>9} {'rows/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'gw/peer':>8} {'gw/tri':>6} {'limit':>6} "
        f"{'batch':>6} {'cpu':>5} {'other':>5}"
    )
    lines = [head, "-" * len(head)]
    order = {name: i for i, name in enumerate(SYSTEMS)}
    for r in sorted(rows, key=lambda r: (r.concurrency, order.get(r.system, 9), r.protocol)):
        lines.append(
            f"{r.system:<12} {r.protocol:<8} {r.concurrency:>4} {r.req_per_s:>9.1f} "
            f"{r.rows_per_s:>9.1f} {fmt(r.p50_ms, '.2f'):>8} {fmt(r.p99_ms, '.2f'):>8} "
            f"{r.errors:>6} {fmt(r.ratio_vs_peer, '.2f'):>8} {fmt(r.ratio_vs_triton, '.2f'):>6} "
            f"{fmt(r.share_of_limit and 100 * r.share_of_limit, '.1f'):>5}% "
            f"{fmt(r.mean_batch_rows, '.1f'):>6} "
            f"{fmt(r.cpu_cores_busy, '.2f'):>5} {fmt(r.cpu_cores_other, '.2f'):>5}"
        )
    if limit is not None:
        lines.append("-" * len(head))
        lines.append(
            f"{'in-process':<12} {'-':<8} {'-':>4} {'-':>9} {limit.rows_per_s:>9.1f} "
            f"{limit.forward_1row_ms:>8.2f} {'-':>8} {'-':>6} {'-':>8} {'-':>6} {'100.0':>5}% "
            f"{limit.batch_rows:>6} {'-':>5} {'-':>5}"
            f"   (batch {limit.batch_rows}, {limit.batch_ms_median:.2f} ms/batch; p50 column "
            "= 1-row forward)"
        )
    return "\n".join(lines)


def render_stages(rows: list[LevelResult]) -> str | None:
    """Where a request's time goes, from the servers' own statistics (mean ms)."""
    timed = [r for r in rows if r.stage_ms]
    if not timed:
        return None
    head = (
        f"{'system':<12} {'protocol':<8} {'conc':>4} {'client':>8} {'inside':>8} "
        f"{'queue':>8} {'c.input':>8} {'c.infer':>8} {'c.output':>8} {'outside':>8}"
    )
    lines = [head, "-" * len(head)]
    order = {name: i for i, name in enumerate(SYSTEMS)}
    for r in sorted(timed, key=lambda r: (r.concurrency, order.get(r.system, 9), r.protocol)):
        st = r.stage_ms or {}
        inside = st.get("success")
        outside = r.mean_ms - inside if r.mean_ms is not None and inside is not None else None
        lines.append(
            f"{r.system:<12} {r.protocol:<8} {r.concurrency:>4} {fmt(r.mean_ms, '.2f'):>8} "
            f"{fmt(inside, '.2f'):>8} {fmt(st.get('queue'), '.2f'):>8} "
            f"{fmt(st.get('compute_input'), '.2f'):>8} {fmt(st.get('compute_infer'), '.2f'):>8} "
            f"{fmt(st.get('compute_output'), '.2f'):>8} {fmt(outside, '.2f'):>8}"
        )
    return "\n".join(lines)


def _inside(r: NoisyResult) -> str:
    a, b = r.light_inside_alone_ms, r.light_inside_beside_ms
    return "-" if a is None or b is None else f"{a:.1f}/{b:.1f}"


def render_noisy(results: list[NoisyResult]) -> str:
    head = (
        f"{'system':<12} {'protocol':<8} {'light p50 alone':>15} {'p99 alone':>10} "
        f"{'p50 beside':>10} {'p99 beside':>10} {'p99 x':>6} {'heavy req/s':>11} "
        f"{'light err':>9} {'heavy err':>9} {'gw mean a/b':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        a, b = r.light_alone, r.light_beside
        lines.append(
            f"{r.system:<12} {r.protocol:<8} {fmt(a.p50_ms, '.2f'):>15} {fmt(a.p99_ms, '.2f'):>10} "
            f"{fmt(b.p50_ms, '.2f'):>10} {fmt(b.p99_ms, '.2f'):>10} {fmt(r.p99_ratio, '.2f'):>6} "
            f"{r.heavy.req_per_s:>11.1f} {a.errors + b.errors:>9} {r.heavy.errors:>9} "
            f"{_inside(r):>13}"
        )
    return "\n".join(lines)


def headline(rows: list[LevelResult], limit: InProcessResult | None) -> list[str]:
    """At the highest concurrency: the gateway against each peer, protocol by protocol."""
    if not rows:
        return []
    top = max(r.concurrency for r in rows)
    at = {(r.system, r.protocol): r.req_per_s for r in rows if r.concurrency == top}
    pairs = [
        (("gpugate", "grpc"), ("rayserve", "grpc")),
        (("gpugate", "http"), ("rayserve", "grpc")),
        (("gpugate", "grpc"), ("triton", "grpc")),
        (("gpugate", "http"), ("triton", "http")),
        (("gpugate", "http"), ("triton", "grpc")),
    ]
    out = []
    for protocol in ("grpc", "http"):
        one, two = at.get(("gpugate", protocol)), at.get(("gpugate-2gw", protocol))
        if one and two:
            out.append(
                f"c={top}: gpugate-2gw {protocol} {two:.0f} req/s / gpugate (one gateway) "
                f"{protocol} {one:.0f} req/s = {two / one:.2f}x"
            )
    for gw, peer in pairs:
        if at.get(gw) and at.get(peer):
            out.append(
                f"c={top}: gpugate {gw[1]} {at[gw]:.0f} req/s / {peer[0]} {peer[1]} "
                f"{at[peer]:.0f} req/s = {at[gw] / at[peer]:.2f}x"
            )
    if limit is not None:
        for (system, protocol), rps in sorted(at.items()):
            if system != "null":
                out.append(
                    f"c={top}: {system} {protocol} at {100 * rps / limit.rows_per_s:.1f}% of the "
                    f"in-process limit ({limit.rows_per_s:.0f} rows/s)"
                )
    return out


def gateway_spread(rows: list[LevelResult]) -> list[str]:
    """Several gateways: the requests each answered in the window, per row."""
    return [
        f"{r.system} {r.protocol} c={r.concurrency}: requests per gateway "
        + " / ".join(f"{n:,}" for n in r.gateway_requests)
        for r in rows
        if r.gateway_requests
    ]


def cpu_parts(rows: list[LevelResult]) -> list[str]:
    """At the top concurrency: the cores each part of the benchmark used in the window."""
    if not rows:
        return []
    top = max(r.concurrency for r in rows)
    return [
        f"{r.system} {r.protocol} c={top}: cores "
        + ", ".join(f"{part} {cores:.2f}" for part, cores in r.cpu_cores_by_part.items())
        for r in rows
        if r.concurrency == top and r.cpu_cores_by_part
    ]


def overheads(rows: list[LevelResult], limit: InProcessResult) -> dict[str, float]:
    """At concurrency 1: p50 minus the in-process forward time of one row."""
    out = {}
    for r in rows:
        if r.system != "null" and r.concurrency == 1 and r.p50_ms is not None:
            out[f"{r.system}/{r.protocol}"] = r.p50_ms - limit.forward_1row_ms
    return out


def overheads_in_window(rows: list[LevelResult]) -> dict[str, tuple[float, float]]:
    """At concurrency 1, gpugate: (p50 minus the forward its replica measured in the same
    window, that forward's mean). The in-process forward is timed back to back, with
    the weights in cache; one request at a time finds them cold after each idle gap,
    and the host's speed drifts within minutes, so this is the forward each request
    paid. (Triton's c.infer includes its Python backend's hand-offs: not a forward.)"""
    out = {}
    for r in rows:
        infer = (r.stage_ms or {}).get("compute_infer")
        if is_gpugate(r.system) and r.concurrency == 1 and r.p50_ms is not None and infer:
            out[f"{r.system}/{r.protocol}"] = (r.p50_ms - infer, infer)
    return out
