"""The OpenTelemetry SDK of a gateway process, configured from the standard OTEL_* variables.

- ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console``, ``none`` or a comma list. Unset, it
  is ``otlp`` when an OTLP endpoint is set and ``none`` otherwise, so the embedded
  default does not log export failures to a collector nobody started.
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` / ``..._TRACES_PROTOCOL``: ``grpc`` (default) or
  ``http/protobuf``; endpoint, headers, timeout and ``OTEL_BSP_*`` are read by the
  exporter and the batch processor themselves.

Spans leave through a BatchSpanProcessor: a bounded queue drained by its own
thread, so a slow or dead collector drops spans instead of slowing or failing a
request (the ledger in the database, not the traces, is the record of cost).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

log = logging.getLogger(__name__)


def otel_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The OTEL_* settings of the driver, to hand to the gateway's Ray worker."""
    return {k: v for k, v in environ.items() if k.startswith("OTEL_")}


def exporter_names(env: Mapping[str, str]) -> list[str]:
    chosen = env.get("OTEL_TRACES_EXPORTER")
    if chosen is None:
        has_endpoint = "OTEL_EXPORTER_OTLP_ENDPOINT" in env or (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in env
        )
        chosen = "otlp" if has_endpoint else "none"
    names = [n.strip().lower() for n in chosen.split(",") if n.strip()]
    return [n for n in names if n != "none"]


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        )
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HTTPSpanExporter,
            )

            return HTTPSpanExporter()
        raise ValueError(f"unsupported OTLP protocol {protocol!r}: use grpc or http/protobuf")
    raise ValueError(f"unknown OTEL_TRACES_EXPORTER {name!r}: use otlp, console or none")


def configure_tracing(env: Mapping[str, str]) -> TracerProvider | None:
    """Install the process's tracer provider; None (tracing off) when no exporter is set.

    ``env`` is applied to ``os.environ`` first, because the exporters and the batch
    processor read their settings from there.
    """
    names = exporter_names(env)
    if not names:
        return None
    os.environ.update(env)
    provider = TracerProvider(
        resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "gpugate")})
    )
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    trace.set_tracer_provider(provider)
    log.info("tracing to %s", ",".join(names))
    return provider
