"""OpenTelemetry spans of the request path, on the OpenTelemetry API only.

One SERVER span per inference request (continuing an incoming W3C
``traceparent``) and one span per batch, linked to the spans of the requests in
it. Which SDK and exporter run, if any, is the process owner's choice
(``serving.gateway``); with none installed every call here is a no-op.
Attribute names follow ARCHITECTURE.md: ``gpugate.tenant``, ``gpugate.model``,
``gpugate.model_version``, ``gpugate.batch.size``, ``gpugate.device_seconds``,
``gpugate.cost_usd`` (the ledger's currency, whatever it is named).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode

from scheduler import BatchRecord, Receipt

_tracer = trace.get_tracer("gpugate.router")


def start_request_span(name: str, carrier: Mapping[str, str] | None) -> Span:
    """A SERVER span, child of the caller's ``traceparent`` when it sent one."""
    context = propagate.extract(carrier) if carrier else None
    return _tracer.start_span(name, context=context, kind=SpanKind.SERVER)


def finish_request_span(
    span: Span,
    *,
    tenant: str,
    model: str,
    version: str,
    code: str,
    receipt: Receipt | None,
    error: str | None,
) -> None:
    if span.is_recording():
        span.set_attribute("gpugate.tenant", tenant)
        span.set_attribute("gpugate.model", model)
        span.set_attribute("gpugate.model_version", version)
        span.set_attribute("gpugate.status_code", code)
        if receipt is not None and receipt.batch_rows:
            span.set_attribute("gpugate.queue_wait_seconds", receipt.queue_wait_s)
            span.set_attribute("gpugate.batch.size", receipt.batch_rows)
            span.set_attribute("gpugate.device_seconds", receipt.charge_ns / 1e9)
            span.set_attribute("gpugate.cost_usd", receipt.cost)
            span.set_attribute("gpugate.device", receipt.device)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def span_context(span: Span) -> SpanContext | None:
    """What a batch span links to; None when the request is not traced."""
    ctx = span.get_span_context()
    return ctx if ctx.is_valid else None


def batch_span_observer(costs: Callable[[BatchRecord], float]) -> Callable[[BatchRecord], None]:
    """An observer that records each batch as a span linked to its requests' spans.

    The span is written after the fact with the batch's own start and end times,
    so tracing adds nothing to the batch's critical path.
    """

    def observe(record: BatchRecord) -> None:
        links = [Link(c) for c in record.traces if isinstance(c, SpanContext)]
        if not links:
            return  # no traced request in it: keep untraced traffic free of spans
        span = _tracer.start_span(
            f"batch {record.model}:{record.version}",
            kind=SpanKind.INTERNAL,
            links=links,
            start_time=record.started_at_ns,
            # A root of its own: a batch serves many traces, it belongs to none.
            context=trace.set_span_in_context(trace.INVALID_SPAN),
        )
        span.set_attribute("gpugate.model", record.model)
        span.set_attribute("gpugate.model_version", record.version)
        span.set_attribute("gpugate.batch.size", record.rows)
        span.set_attribute("gpugate.batch.requests", len(record.tenants))
        span.set_attribute("gpugate.batch.tenants", sorted({t for t, _ in record.tenants}))
        if record.result is None:
            span.set_status(Status(StatusCode.ERROR, "batch failed"))
        else:
            span.set_attribute("gpugate.device", record.result.device)
            span.set_attribute("gpugate.device_seconds", record.charge_ns / 1e9)
            span.set_attribute("gpugate.cost_usd", costs(record))
        span.end(end_time=record.finished_at_ns)

    return observe
