"""KServe v2 over HTTP/REST, with Triton's binary tensor data extension.

Request body: a JSON header, optionally followed by raw tensor bytes; the
header's length is in ``Inference-Header-Content-Length``. An input with
``parameters.binary_data_size`` takes that many bytes from the binary part, in
input order. Outputs are returned as binary when the output asks for
``binary_data`` or the request sets ``binary_data_output`` (tritonclient does so
by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

from router._exceptions import GatewayError, InvalidArgument, NotFound, PayloadTooLarge
from router.extensions import config_of, statistics_of
from router.http_body import parse_json, parse_length, read_body
from router.http_protocol import HttpDoorLimits
from router.service import (
    EXTENSIONS,
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    Call,
    InferenceService,
)
from router.tensors import InputTensor, parse_params
from router.types import DTYPE_TO_DATATYPE, TensorSpec
from scheduler import Tensors

_HEADER_LENGTH = "inference-header-content-length"
_INDEX_BODY_LIMIT = 64 * 1024


def _error(exc: GatewayError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.message}, status_code=exc.http_status, headers=exc.http_headers()
    )


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


class UsageSource(Protocol):
    """A tenant's own usage report (``serving`` reads it from the cost ledger)."""

    async def usage(self, tenant: str, query: Mapping[str, str]) -> Any: ...


class TenantViewSource(Protocol):
    """A tenant's own view: its settings, keys, usage and models (``serving`` reads it
    from the state). Raises GatewayError subclasses only."""

    async def view(self, tenant: str) -> Any: ...


def build_http_app(
    service: InferenceService,
    apps: Mapping[str, ASGIApp] | None = None,
    usage: UsageSource | None = None,
    limits: HttpDoorLimits | None = None,
    tenant_view: TenantViewSource | None = None,
) -> Starlette:
    """The ASGI app; every error leaves as ``{"error": ...}`` with its status.

    ``apps`` maps a path to an ASGI app mounted there (the gateway's admin API at
    ``/admin``, its web console at ``/console``); ``usage``
    answers ``GET /usage`` and ``tenant_view`` ``GET /tenant`` for the tenant whose API
    key calls it. ``limits``: the JSON and decompression limits of request bodies.
    """
    limits = limits or HttpDoorLimits()

    async def live(request: Request) -> Response:
        live = service.live
        return _json({"live": live}, 200 if live else 503)

    async def ready(request: Request) -> Response:
        ready = service.ready
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(request: Request) -> Response:
        return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})

    async def model_metadata(request: Request) -> Response:
        name = request.path_params["model"]
        version = request.path_params.get("version")
        try:
            served = service.models.resolve(name, version)
        except NotFound as exc:
            return _error(exc)
        versions = service.models.versions(served.name)
        sig = served.signature
        return _json(
            {
                "name": served.name,
                "versions": versions,
                "platform": PLATFORM,
                "inputs": [_tensor_meta(t) for t in sig.inputs],
                "outputs": [_tensor_meta(t) for t in sig.outputs],
            }
        )

    async def model_config(request: Request) -> Response:
        try:
            config = config_of(
                service, request.path_params["model"], request.path_params.get("version")
            )
        except NotFound as exc:
            return _error(exc)
        return _json(config)

    async def model_stats(request: Request) -> Response:
        try:
            stats = statistics_of(
                service, request.path_params.get("model"), request.path_params.get("version")
            )
        except NotFound as exc:
            return _error(exc)
        return _json(stats)

    async def model_ready(request: Request) -> Response:
        ok = service.model_ready(request.path_params["model"], request.path_params.get("version"))
        return Response(status_code=200 if ok else 503)

    async def repository_index(request: Request) -> Response:
        # Open to anyone: read at most a small body, never an unbounded one.
        try:
            body = await read_body(request, _INDEX_BODY_LIMIT, limits.max_inflate_ratio)
            parsed = parse_json(body, limits.max_json_containers) if body.strip() else {}
        except orjson.JSONDecodeError:
            return _error(InvalidArgument("request body is not JSON"))
        except GatewayError as exc:
            return _error(exc)
        if not isinstance(parsed, dict):
            return _error(InvalidArgument("request body must be a JSON object"))
        entries = [
            {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
            for e in service.models.index()
        ]
        return _json(entries)

    def _body_limit(request: Request) -> int:
        """The body's limit: the JSON limit for a body that is all JSON; with binary tensor
        data, the request limit, and the JSON header alone within the JSON limit."""
        limit = service.settings.max_request_bytes
        json_limit = limits.max_json_bytes
        header_length = request.headers.get(_HEADER_LENGTH)
        if header_length is not None:
            if parse_length(header_length, 0) > json_limit:
                raise PayloadTooLarge(
                    f"JSON header of {header_length} bytes is over the {json_limit}-byte JSON limit"
                )
            return limit
        declared = request.headers.get("content-length")
        if declared is not None and parse_length(declared, 0) > json_limit and json_limit < limit:
            raise PayloadTooLarge(
                f"JSON body of {declared} bytes is over the {json_limit}-byte JSON limit; "
                "send tensors as binary data (Inference-Header-Content-Length)"
            )
        return min(limit, json_limit)

    async def infer(request: Request) -> Response:
        try:
            with service.admitted("POST /v2/models/{model}/infer", request.headers) as call:
                return await admitted_infer(call, request)
        except GatewayError as exc:
            return _error(exc)

    async def admitted_infer(call: Call, request: Request) -> Response:
        # The key first: an unknown caller is refused before a byte of its body is read;
        # then the tenant's request cap, so a tenant at its limit costs no reading or
        # parsing either, and a body being read holds one of its own tenant's requests:
        # a tenant has at most max_requests_in_flight bodies in memory. (The byte cap is
        # on the decoded tensors, checked before any array is built.)
        await service.authenticate(call, request.headers.get("authorization"))
        limit = _body_limit(request)
        service.admit(call)
        body = await read_body(request, limit, limits.max_inflate_ratio)
        header, inputs, binary_outputs = _decode_infer(request, body, limits.max_json_containers)
        params = header.get("parameters") or {}
        served, outputs = await service.infer(
            call,
            request.path_params["model"],
            request.path_params.get("version"),
            inputs,
            parse_params(params),
            requested_outputs=list(binary_outputs),
            header=request.headers.get,
        )
        default_binary = params.get("binary_data_output") is True
        return _encode_infer(
            served.name, served.version, header.get("id"), outputs, binary_outputs, default_binary
        )

    routes: list[BaseRoute] = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        # Before /v2/models/{model}, which would take "stats" for a model's name.
        Route("/v2/models/stats", model_stats, methods=["GET"]),
        Route("/v2/models/{model}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/config", model_config, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/config", model_config, methods=["GET"]),
        Route("/v2/models/{model}/stats", model_stats, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/stats", model_stats, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
    ]
    routes.extend(Mount(path, app=app) for path, app in (apps or {}).items())

    async def tenant_usage(request: Request) -> Response:
        try:
            if usage is None:
                raise NotFound("usage reports are not served here")
            tenant = await service.authenticate(Call(), request.headers.get("authorization"))
            return _json(await usage.usage(tenant.name, dict(request.query_params)))
        except GatewayError as exc:
            return _error(exc)

    routes.append(Route("/usage", tenant_usage, methods=["GET"]))

    async def own_view(request: Request) -> Response:
        # A suspended tenant may read its view: that is where it learns why.
        try:
            if tenant_view is None:
                raise NotFound("tenant views are not served here")
            tenant = await service.identify(request.headers.get("authorization"))
            return _json(await tenant_view.view(tenant.name))
        except GatewayError as exc:
            return _error(exc)

    routes.append(Route("/tenant", own_view, methods=["GET"]))

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no route {request.url.path}"}, status_code=404)

    async def bad_method(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"method {request.method} not allowed"}, status_code=405)

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})


def _tensor_meta(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.shape]}


def _decode_infer(
    request: Request, body: bytes, max_json_containers: int
) -> tuple[dict[str, Any], list[InputTensor], dict[str, bool | None]]:
    """Parse header JSON and binary part; returns header, inputs and requested outputs."""
    header_length = request.headers.get(_HEADER_LENGTH)
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        n = parse_length(header_length, -1)
        if not 0 <= n <= len(body):
            raise InvalidArgument(
                f"Inference-Header-Content-Length {header_length[:32]!r} does not fit the "
                f"{len(body)}-byte body"
            )
        json_part, binary = body[:n], memoryview(body)[n:]
    try:
        header = parse_json(json_part, max_json_containers)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgument("request must be a JSON object")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidArgument("'inputs' must be a list")
    params = header.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be an object")
    inputs: list[InputTensor] = []
    offset = 0
    for item in raw_inputs:
        if not isinstance(item, dict):
            raise InvalidArgument("each input must be an object")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidArgument("each input needs a string 'name' and 'datatype'")
        if not isinstance(shape, list):
            raise InvalidArgument(f"input {name!r} needs a 'shape' list")
        tparams = item.get("parameters") or {}
        size = tparams.get("binary_data_size") if isinstance(tparams, dict) else None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgument(f"input {name!r}: bad binary_data_size {size!r}")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input {name!r}: binary_data_size {size} runs past the "
                    f"{len(binary)} bytes of binary data"
                )
            inputs.append(InputTensor(name, datatype, shape, raw=binary[offset : offset + size]))
            offset += size
        else:
            inputs.append(InputTensor(name, datatype, shape, values=item.get("data")))
    if offset != len(binary):
        raise InvalidArgument(f"binary data is {len(binary)} bytes but inputs declare {offset}")
    outputs: dict[str, bool | None] = {}
    raw_outputs = header.get("outputs") or []
    if not isinstance(raw_outputs, list):
        raise InvalidArgument("'outputs' must be a list")
    for item in raw_outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidArgument("each requested output needs a string 'name'")
        oparams = item.get("parameters") or {}
        want = oparams.get("binary_data") if isinstance(oparams, dict) else None
        outputs[item["name"]] = bool(want) if want is not None else None
    return header, inputs, outputs


def _encode_infer(
    model: str,
    version: str,
    request_id: Any,
    outputs: Tensors,
    binary_choice: dict[str, bool | None],
    default_binary: bool,
) -> Response:
    out_meta: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, arr in outputs.items():
        meta: dict[str, Any] = {
            "name": name,
            "datatype": DTYPE_TO_DATATYPE[arr.dtype],
            "shape": list(arr.shape),
        }
        choice = binary_choice.get(name)
        if choice if choice is not None else default_binary:
            data = np.ascontiguousarray(arr).tobytes()
            meta["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            meta["data"] = arr.reshape(-1).tolist()
        out_meta.append(meta)
    payload: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": out_meta}
    if isinstance(request_id, str) and request_id:
        payload["id"] = request_id
    head = orjson.dumps(payload)
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *chunks]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
