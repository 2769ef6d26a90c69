"""HTTP ranking service (FastAPI): `create_app(bundle, ...)`; `masknet serve` runs it on uvicorn.

    POST /rank      {"context": {...}, "candidates": [{"id": ..., "features": {...}}, ...]}
                    -> each candidate's score (request order) and the candidates sorted by score;
                    a multi-task bundle also returns every task's probability per candidate, and
                    its score is their weighted sum (serving/tasks.py; "weights" per request)
    POST /predict   {"rows": [{...}, ...]} -> one score per row
    GET  /health    liveness, request and batching counters
    GET  /metadata  model, fields, training metrics, bundle hash, runtime and its accuracy, limits
    GET  /docs, /openapi.json

Features are raw values by column name, exactly as in the training data (Criteo `I1`..`C26`,
Avazu `hour`, `site_id`, ...; strings, numbers or null for missing); the bundle's encoder does
all preprocessing (features.py), unseen categories are out-of-vocabulary. In /rank a candidate's
features override the shared context's.

A request's path: admission (admission.py) lets it in or refuses it before its body is read,
then reads the body within the size, memory and time limits; the decode thread decodes,
validates and encodes it (requests.py: msgspec, a few ms for 1,000 candidates; sizes checked
first), off the event loop; then its rows join the dynamic batcher's queue (batching.py), whose
one inference thread runs the forward pass for every request that arrived meanwhile; the
endpoint awaits its scores without blocking the loop. The pydantic models below document the
API (OpenAPI schema) and validate the requests that msgspec refuses, so that the answer names
the problem.

Errors are 4xx with {"error": "<one line naming the problem>", "status": N}: malformed JSON (400),
a body too slow to arrive (408), body over the size limit (413), missing/unknown field, wrong
type, too many candidates or rows, a value the encoder rejects (422); 503 with Retry-After when
too many requests or too many body bytes are in the server, or the batcher's queue is full.
Never a 5xx for bad input.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import msgspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.requests import Request  # at module level: FastAPI resolves the endpoints' annotations here

from .admission import Admission, Gate
from .batching import Batcher, Overloaded
from .bundle import Bundle
from .features import DEFAULT_MAX_VALUE_CHARS, FeatureEncoder, RequestError
from .requests import RequestDecoder
from .runtime import Scorer, accuracy_check, describe_check
from .tasks import combine, default_weights, request_weights

DEFAULT_MAX_CANDIDATES = 1000
DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_MAX_BATCH_ROWS = 2048  # forward rows/CPU-s flat from 1,000 rows up (docs/serving.md)
DEFAULT_MAX_WAIT_MS = 2.0
DEFAULT_MAX_QUEUE_ROWS = 8192  # four full passes waiting, at most
DEFAULT_MAX_PENDING = 16  # requests inside the server (read, decoded, waiting or scored) at once
DEFAULT_MAX_BODY_BUFFER = 32 << 20  # bytes of request bodies held at once: four of the largest, 50 of 1,000 candidates
DEFAULT_BODY_TIMEOUT_S = 10.0  # an 8 MiB body at 1 MB/s takes 8.4 s; on loopback 650 kB takes milliseconds


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Optional[Union[StrictStr, StrictInt]] = Field(None, description="echoed back in the ranking (default: the index)")
    features: dict[str, Any] = Field(default_factory=dict, description="raw feature values by column name")


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context: dict[str, Any] = Field(
        default_factory=dict, description="features shared by every candidate (user, page, time, ...)"
    )
    candidates: list[Candidate] = Field(..., description="the items to score; each gives the remaining features")
    weights: Optional[dict[str, float]] = Field(
        None, description="multi-task bundles: task -> weight of the combined score (replaces the start-up weight)"
    )
    uncalibrated: bool = Field(False, description="also return the scores before post-hoc calibration")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[dict[str, Any]] = Field(..., description="raw rows: every model column by name")
    weights: Optional[dict[str, float]] = Field(None, description="multi-task bundles: task -> weight of the combined score")
    uncalibrated: bool = Field(False, description="also return the scores before post-hoc calibration")


class Ranked(BaseModel):
    id: Union[StrictStr, StrictInt]
    index: int
    score: float
    task_scores: Optional[dict[str, float]] = Field(None, description="multi-task bundles: each task's probability")


class RankResponse(BaseModel):
    model: str
    scores: list[float] = Field(
        ..., description="click probability per candidate, in request order (multi-task: the weighted sum of task_scores)"
    )
    ranking: list[Ranked] = Field(..., description="candidates sorted by score, highest first")
    tasks: Optional[list[str]] = Field(None, description="multi-task bundles: the tasks")
    weights: Optional[dict[str, float]] = Field(None, description="multi-task bundles: the weights of the combined score")
    task_scores: Optional[dict[str, list[float]]] = Field(None, description="multi-task bundles: each task's probabilities")
    uncalibrated: Optional[dict[str, list[float]]] = Field(None, description="with uncalibrated=true: scores before calibration, per task")


class PredictResponse(BaseModel):
    model: str
    scores: list[float]
    tasks: Optional[list[str]] = None
    weights: Optional[dict[str, float]] = None
    task_scores: Optional[dict[str, list[float]]] = None
    uncalibrated: Optional[dict[str, list[float]]] = None


class ErrorResponse(BaseModel):
    error: str
    status: int


_ENCODE = msgspec.json.Encoder()


def _json(payload: Any, status: int = 200, headers: Optional[dict] = None):
    from starlette.responses import Response

    return Response(_ENCODE.encode(payload), status_code=status, media_type="application/json", headers=headers)


MAX_MESSAGE_CHARS = 500  # an error message never echoes a whole (say 1 MB) bad key or value back


def _error(message: str, status: int, headers: Optional[dict] = None):
    if len(message) > MAX_MESSAGE_CHARS:
        message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message):,} characters)"
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate from a bad key
    return _json({"error": message, "status": status}, status, headers)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _server_timing(decode_s: float, timing: Any) -> dict[str, str]:
    """A Server-Timing header (milliseconds): decode + validate + encode, wait for the model, the
    forward pass, and the rows and requests of the pass this request shared."""
    parts = [f"decode;dur={decode_s * 1000:.2f}"]
    if timing is not None:
        parts += [f"queue;dur={timing.queued_s * 1000:.2f}", f"forward;dur={timing.forward_s * 1000:.2f}",
                  f'batch;desc="{timing.batch_rows} rows, {timing.batch_requests} requests"']
    return {"Server-Timing": ", ".join(parts)}


def _validate(kind: str, obj: Any) -> Any:
    """The careful path's shape check: the pydantic model of the request, or a RequestError."""
    model = RankRequest if kind == "rank" else PredictRequest
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        loc = tuple(first.get("loc", ()))
        if len(loc) >= 2 and loc[-2] == "id" and loc[-1] in ("str", "int"):  # the union's member tag
            raise RequestError(f"{_loc(loc[:-1])}: must be a string or an integer") from None
        if not loc and first.get("type") in ("model_type", "model_attributes_type"):
            raise RequestError(f"the request body must be a JSON object: {first.get('msg')}") from None
        raise RequestError(f"{_loc(loc)}: {first.get('msg')}") from None


def _openapi_body(model: type[BaseModel], example: dict) -> dict:
    """The OpenAPI requestBody of an endpoint that reads its body itself (msgspec), from the
    pydantic model that documents it; `_with_schemas` adds the model to the components."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref, "example": example}}}}


def _with_schemas(app: Any, models: list[type[BaseModel]]) -> None:
    """Make app.openapi() include the request models (and the models they use) as components."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


@dataclass
class _Service:
    """What the routes of one app share: the bundle's pieces, the batcher, the admission counters."""

    bundle: Bundle
    features: Any  # FeatureEncoder
    decoder: Any  # RequestDecoder
    scorer: Any  # Scorer
    batcher: Any  # Batcher
    admission: Any  # Admission
    base_weights: Optional[dict[str, float]]
    max_candidates: int
    started: float = field(default_factory=time.time)
    # one thread decodes every body, off the event loop (which keeps answering /health and refusing
    # over-limit requests), and one at a time: at most one body's objects exist at once
    decode_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="masknet-decode"))

    @property
    def model_name(self) -> str:
        return self.bundle.spec["model"]


def create_app(
    bundle: Bundle,
    runtime: str = "torch",
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    threads: Optional[int] = None,
    max_value_chars: int = DEFAULT_MAX_VALUE_CHARS,
    precision: str = "fp32",
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_queue_rows: int = DEFAULT_MAX_QUEUE_ROWS,
    max_pending: int = DEFAULT_MAX_PENDING,
    max_body_buffer: int = DEFAULT_MAX_BODY_BUFFER,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    check_accuracy: Optional[bool] = None,
    log: Any = None,
    task_weights: Optional[dict[str, float]] = None,
):
    """The FastAPI app for one loaded bundle. `check_accuracy` (default: when runtime or precision
    is not PyTorch fp32) measures the scorer's test AUC against fp32 before serving; `log(line)`
    gets the start-up lines. `task_weights`: a multi-task bundle's start-up weights of the combined
    score (serving/tasks.py; default 1 per task)."""
    from fastapi import FastAPI

    from .. import __version__

    features = FeatureEncoder(bundle.encoder, bundle.field_names, bundle.cardinalities, max_value_chars, bundle.multi_valued)
    scorer = Scorer(bundle, runtime, precision, threads)
    check = _start_up_check(bundle, scorer, runtime, precision, check_accuracy, log)
    svc = _Service(
        bundle, features, RequestDecoder(features, max_value_chars, _validate), scorer,
        Batcher(scorer, max_batch_rows, max_wait_ms, max_queue_rows), Admission(max_pending, max_body_bytes, max_body_buffer, body_timeout_s),
        dict(default_weights(bundle.tasks), **(task_weights or {})) if bundle.multitask else None, max_candidates,
    )
    metadata = _metadata(svc, runtime, precision, check, {
        "limits": {"max_candidates": max_candidates, "max_rows": max_candidates, "max_body_bytes": max_body_bytes,
                   "max_value_chars": max_value_chars},
        "batching": {"max_batch_rows": max_batch_rows, "max_wait_ms": max_wait_ms, "max_queue_rows": max_queue_rows,
                     "max_pending": max_pending},
        "admission": {"max_pending": max_pending, "max_body_buffer": svc.admission.max_buffered_bytes,
                      "body_timeout_s": body_timeout_s},
    })
    app = FastAPI(
        title=f"masknet ranking service: {svc.model_name}",
        version=__version__,
        description=(
            "Scores raw feature rows with a trained masknet bundle. Features are raw values by column name, as in "
            f"the training data ({', '.join(features.columns[:6])}{', ...' if len(features.columns) > 6 else ''}); "
            "null = missing; unseen categories are out-of-vocabulary. See GET /metadata for every column."
        ),
    )
    _add_routes(app, svc, metadata)
    _with_schemas(app, [RankRequest, PredictRequest])
    app.add_middleware(Gate, admission=svc.admission, error=_error)
    app.state.bundle = bundle
    app.state.features = features
    app.state.decoder = svc.decoder
    app.state.batcher = svc.batcher
    app.state.scorer = scorer
    return app


def _metadata(svc: _Service, runtime: str, precision: str, check: dict, settings: dict[str, Any]) -> dict[str, Any]:
    """GET /metadata: the bundle, the runtime, the inputs, the training metrics and `settings` (limits, batching, admission)."""
    from .. import __version__

    bundle, features, scorer = svc.bundle, svc.features, svc.scorer
    return {
        "model": svc.model_name,
        "model_config": bundle.spec.get("model_config"),
        "bundle": str(bundle.path),
        "bundle_sha256": bundle.bundle_hash,
        "versions": bundle.manifest.get("versions"),
        "runtime": runtime,
        "precision": precision,
        "threads": scorer.threads,
        "thread_timings_ms": scorer.thread_timings_ms,
        "accuracy_vs_fp32": check,
        "input": {
            "format": bundle.encoder.spec.name if bundle.encoder is not None else None,
            "columns": features.columns,
            "encoded": bundle.encoder is None,
        },
        "fields": features.describe(),
        "training_metrics": bundle.metrics,
        "tasks": bundle.tasks,
        "multitask": bundle.multitask,
        "task_weights": svc.base_weights,
        "calibration": {"method": bundle.head_method, "negative_sampling_rate": bundle.head.rate},
        **settings,
        "masknet": __version__,
    }


def _start_up_check(bundle: Bundle, scorer: Any, runtime: str, precision: str, check_accuracy: Optional[bool], log: Any) -> dict:
    """The scorer's accuracy against PyTorch fp32 (when asked, or by default off the reference), and
    the start-up lines."""
    if check_accuracy is None:
        check_accuracy = (runtime, precision) != ("torch", "fp32")
    check = accuracy_check(bundle, scorer) if check_accuracy else {"measured": False, "why": "the reference (PyTorch fp32)"}
    if log is not None:
        chosen = "given" if not scorer.thread_timings_ms else (
            "fastest of " + ", ".join(f"{t}: {ms} ms" for t, ms in scorer.thread_timings_ms.items()) + " per 1,000 rows")
        log(f"runtime {scorer.name}: one inference thread, {scorer.threads} intra-op threads ({chosen})")
        if check_accuracy:
            log(describe_check(scorer, check))
    return check


def _add_routes(app: Any, svc: _Service, metadata: dict[str, Any]) -> None:
    """/health, /metadata, /rank and /predict, and the HTTP error handler."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    count, counters, model_name = svc.admission.count, svc.admission.stats, svc.model_name
    example = {c: None for c in svc.features.columns}

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return _error(str(exc.detail), exc.status_code)

    async def scored(request: Request, decode) -> Any:
        """Decode + encode on the decode thread, then the batcher's scores: (encoded, scores, timing
        headers) or an error Response. Admission (Gate) has let the request in and read its body."""
        body = await request.body()
        try:
            t0 = time.perf_counter()
            with svc.batcher.arriving():
                enc = await asyncio.get_running_loop().run_in_executor(svc.decode_pool, decode, body)
            decode_s = time.perf_counter() - t0
            if len(enc.x):
                scores, timing = await asyncio.wrap_future(svc.batcher.submit(enc.x))
            else:
                scores, timing = svc.scorer(enc.x), None
            extra = _task_fields(enc, svc.base_weights, svc.bundle.tasks, scores)
        except RequestError as exc:
            count(True)
            return _error(str(exc), exc.status)
        except Overloaded as exc:
            count(True)
            return _json({"error": str(exc), "status": 503}, 503, {"Retry-After": str(exc.retry_after)})
        count(False)
        return enc, extra.pop("_scores"), extra, _server_timing(decode_s, timing)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name, "uptime_s": round(time.time() - svc.started, 1), **counters, **svc.batcher.stats}

    @app.get("/metadata")
    def get_metadata() -> dict:
        return metadata

    err = {code: {"model": ErrorResponse} for code in (400, 413, 422, 503)}
    rank_body = _openapi_body(RankRequest, {"context": example, "candidates": [{"id": "a", "features": {}}]})

    @app.post("/rank", response_model=RankResponse, responses=err, openapi_extra=rank_body)
    async def rank(request: Request):
        out = await scored(request, lambda body: svc.decoder.rank(body, svc.max_candidates))
        if not isinstance(out, tuple):
            return out
        enc, scores, extra, timing = out
        order = np.argsort(-scores, kind="stable").tolist()
        s = scores.tolist()
        ids = enc.ids
        ranking = [{"id": ids[i], "index": i, "score": s[i]} for i in order]
        if "task_scores" in extra:
            for r in ranking:
                r["task_scores"] = {t: v[r["index"]] for t, v in extra["task_scores"].items()}
        return _json({"model": model_name, "scores": s, "ranking": ranking, **extra}, headers=timing)

    @app.post("/predict", response_model=PredictResponse, responses=err,
              openapi_extra=_openapi_body(PredictRequest, {"rows": [example]}))
    async def predict(request: Request):
        out = await scored(request, lambda body: svc.decoder.predict(body, svc.max_candidates))
        if not isinstance(out, tuple):
            return out
        return _json({"model": model_name, "scores": out[1].tolist(), **out[2]}, headers=out[3])


def _task_fields(enc: Any, base_weights: Optional[dict], tasks: list[str], scores: np.ndarray) -> dict[str, Any]:
    """The scores to rank by ("_scores") and the multi-task and uncalibrated parts of a response
    (none for a plain single-task request). `scores`: the Scorer's output, [n] or [n, 2, T]
    (served, uncalibrated)."""
    served, uncal = (scores[:, None], scores[:, None]) if scores.ndim == 1 else (scores[:, 0], scores[:, 1])  # [n, T]
    if base_weights is None:
        if enc.weights:
            raise RequestError("weights: this model has one task; weights are for multi-task models")
        out: dict[str, Any] = {"_scores": served[:, 0]}
        if enc.uncalibrated:
            out["uncalibrated"] = {tasks[0]: uncal[:, 0].tolist()}
        return out
    weights = request_weights(enc.weights, base_weights, RequestError)
    out = {"_scores": combine(served, tasks, weights), "tasks": tasks, "weights": weights,
           "task_scores": {t: served[:, i].tolist() for i, t in enumerate(tasks)}}
    if enc.uncalibrated:
        out["uncalibrated"] = {t: uncal[:, i].tolist() for i, t in enumerate(tasks)}
    return out


def exposure_warning(host: str) -> Optional[str]:
    """A warning for a bind address reachable from other machines (anything but loopback):
    the API has no authentication, TLS or rate limit of its own."""
    import ipaddress

    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to any interface
    return (
        f"warning: serving on {host}, which other machines can reach; this API has no authentication, TLS or "
        f"rate limit: anyone who can connect can query the model. Put it behind a proxy that has them, or bind "
        f"127.0.0.1 (the default)"
    )


def serve(bundle: Bundle, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options: Any) -> None:
    """Run create_app(bundle, **options) on uvicorn (one process, one event loop)."""
    import sys

    import uvicorn

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    warning = exposure_warning(host)
    if warning:
        log(warning)
    app = create_app(bundle, log=log, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
