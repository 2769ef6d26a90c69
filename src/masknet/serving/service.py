"""HTTP ranking service (FastAPI): `create_app(bundle, ...)`; `masknet serve` runs it on uvicorn.

    POST /rank      {"context": {...}, "candidates": [{"id": ..., "features": {...}}, ...]}
                    -> each candidate's score (request order) and the candidates sorted by score
    POST /predict   {"rows": [{...}, ...]} -> one score per row
    GET  /health    liveness
    GET  /metadata  model, fields, training metrics, bundle hash, limits
    GET  /docs, /openapi.json

Features are raw values by column name, exactly as in the training data (Criteo `I1`..`C26`,
Avazu `hour`, `site_id`, ...; strings, numbers or null for missing; a multi-valued field takes a
JSON array or a string with the schema's separator, e.g. ["Action", "Comedy"] or "Action|Comedy"); the bundle's encoder does
all preprocessing (features.py), unseen categories are out-of-vocabulary. In /rank a candidate's
features override the shared context's.

Errors are 4xx with {"error": "<one line naming the problem>", "status": N}: malformed JSON (400),
body over the size limit (413), missing/unknown field, wrong type, too many candidates or rows,
a value the encoder rejects (422). Never a 5xx for bad input.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from ..data.batch import EncodedRows, to_batch
from .bundle import Bundle
from .features import FeatureEncoder, RequestError

DEFAULT_MAX_CANDIDATES = 1000
DEFAULT_MAX_BODY_BYTES = 8 << 20


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


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[dict[str, Any]] = Field(..., description="raw rows: every model column by name")


class Ranked(BaseModel):
    id: Union[StrictStr, StrictInt]
    index: int
    score: float


class RankResponse(BaseModel):
    model: str
    scores: list[float] = Field(..., description="click probability per candidate, in request order")
    ranking: list[Ranked] = Field(..., description="candidates sorted by score, highest first")


class PredictResponse(BaseModel):
    model: str
    scores: list[float]


class ErrorResponse(BaseModel):
    error: str
    status: int


class Scorer:
    """Scores encoded rows with the bundle's model in PyTorch or onnxruntime."""

    def __init__(self, bundle: Bundle, runtime: str = "torch", threads: Optional[int] = None):
        self.runtime = runtime
        self.model = bundle.model
        self.bundle = bundle
        if runtime == "onnx":
            from .export import export_onnx_bytes, onnx_session

            self.session = onnx_session(export_onnx_bytes(bundle), threads)
        elif runtime != "torch":
            raise ValueError(f"runtime: expected torch or onnx, got {runtime!r}")

    def __call__(self, x: np.ndarray | EncodedRows) -> np.ndarray:
        """Scores for encoded rows: x int64 [n, f], or EncodedRows with the multi-valued ids."""
        if len(x) == 0:
            return np.zeros(0, np.float32)
        if self.runtime == "onnx":
            from .export import feeds

            return self.session.run(["score"], feeds(self.bundle, x))[0]
        import torch

        with torch.inference_mode():
            return torch.sigmoid(self.model(to_batch(x))).numpy()


def _json(payload: Any, status: int = 200):
    from starlette.responses import Response

    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type="application/json")


def _error(message: str, status: int):
    return _json({"error": message, "status": status}, status)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes` (by Content-Length, or counted as it streams)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        msg = f"request body exceeds the limit of {self.max_bytes:,} bytes"
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    n = 0
                if n > self.max_bytes:
                    return await _error(f"{msg} ({n:,} bytes)", 413)(scope, receive, send)
        # Read the body up to the limit before the app sees it (bounded memory), then replay it.
        parts, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            more = message.get("more_body", False)
            if seen > self.max_bytes:
                return await _error(msg, 413)(scope, receive, send)
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(parts), "more_body": False}], receive), send)


def _replay(messages: list, then: Any = None):
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


def create_app(
    bundle: Bundle,
    runtime: str = "torch",
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    threads: Optional[int] = None,
):
    """The FastAPI app for one loaded bundle."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__

    features = FeatureEncoder(bundle.encoder, bundle.field_names, bundle.cardinalities, bundle.multi_valued)
    scorer = Scorer(bundle, runtime, threads)
    model_name = bundle.spec["model"]
    started = time.time()
    counters = {"requests": 0, "errors": 0}
    lock = threading.Lock()
    example = {c: None for c in features.columns}
    metadata = {
        "model": model_name,
        "model_config": bundle.spec.get("model_config"),
        "bundle": str(bundle.path),
        "bundle_sha256": bundle.bundle_hash,
        "versions": bundle.manifest.get("versions"),
        "runtime": runtime,
        "input": {
            "format": bundle.encoder.spec.name if bundle.encoder is not None else None,
            "columns": features.columns,
            "encoded": bundle.encoder is None,
        },
        "fields": features.describe(),
        "training_metrics": bundle.metrics,
        "limits": {"max_candidates": max_candidates, "max_rows": max_candidates, "max_body_bytes": max_body_bytes},
        "masknet": __version__,
    }

    app = FastAPI(
        title=f"masknet ranking service: {model_name}",
        version=__version__,
        description=(
            "Scores raw feature rows with a trained masknet bundle. Features are raw values by column name, as in "
            f"the training data ({', '.join(features.columns[:6])}{', ...' if len(features.columns) > 6 else ''}); "
            "null = missing; unseen categories are out-of-vocabulary. See GET /metadata for every column."
        ),
    )

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx", {}).get("error", "")
            loc = first.get("loc", ())
            at = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
            return _error(f"malformed JSON: {ctx or first.get('msg')}{at}", 400)
        loc = tuple(first.get("loc", ()))
        if len(loc) >= 2 and loc[-2] == "id" and loc[-1] in ("str", "int"):  # the union's member tag
            return _error(f"{_loc(loc[:-1])}: must be a string or an integer", 422)
        if first.get("type") == "model_attributes_type" or (first.get("loc") == ("body",) and first.get("type") != "missing"):
            return _error(f"the request body must be a JSON object: {first.get('msg')}", 422)
        return _error(f"{_loc(tuple(first.get('loc', ())))}: {first.get('msg')}", 422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return _error(str(exc.detail), exc.status_code)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        return _error(str(exc), exc.status)

    def count(error: bool) -> None:
        with lock:
            counters["requests"] += 1
            counters["errors"] += int(error)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name, "uptime_s": round(time.time() - started, 1), **counters}

    @app.get("/metadata")
    def get_metadata() -> dict:
        return metadata

    err = {400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}

    @app.post("/rank", response_model=RankResponse, responses=err)
    def rank(req: RankRequest = _body_example({"context": example, "candidates": [{"id": "a", "features": {}}]})):
        n = len(req.candidates)
        if n > max_candidates:
            count(True)
            raise RequestError(f"too many candidates: {n:,} (the limit is {max_candidates:,})")
        if n == 0:
            return _json({"model": model_name, "scores": [], "ranking": []})
        try:
            feats = [c.features for c in req.candidates]
            features.check_keys([req.context], lambda i: "context")
            features.check_keys(feats, lambda i: f"candidates[{i}].features")
            cols = features.gather(feats, lambda i: f"candidates[{i}].features", context=req.context)

            def where(i: int, col: str) -> str:
                return f"candidates[{i}].features.{col}" if col in feats[i] else f"context.{col}"

            x = features.with_multi_valued(features.encode(cols, n, where), cols, n, where)
        except RequestError:
            count(True)
            raise
        scores = scorer(x)
        order = np.argsort(-scores, kind="stable")
        s = scores.tolist()
        ids = [c.id if c.id is not None else i for i, c in enumerate(req.candidates)]
        ranking = [{"id": ids[i], "index": i, "score": s[i]} for i in order.tolist()]
        count(False)
        return _json({"model": model_name, "scores": s, "ranking": ranking})

    @app.post("/predict", response_model=PredictResponse, responses=err)
    def predict(req: PredictRequest = _body_example({"rows": [example]})):
        n = len(req.rows)
        if n > max_candidates:
            count(True)
            raise RequestError(f"too many rows: {n:,} (the limit is {max_candidates:,})")
        try:
            features.check_keys(req.rows, lambda i: f"rows[{i}]")
            cols = features.gather(req.rows, lambda i: f"rows[{i}]")
            x = features.with_multi_valued(features.encode(cols, n, lambda i, c: f"rows[{i}].{c}"), cols, n, lambda i, c: f"rows[{i}].{c}")
        except RequestError:
            count(True)
            raise
        count(False)
        return _json({"model": model_name, "scores": scorer(x).tolist()})

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.bundle = bundle
    app.state.features = features
    return app


def _body_example(example: dict):
    from fastapi import Body

    return Body(..., examples=[example])


def serve(
    bundle: Bundle,
    host: str = "127.0.0.1",
    port: int = 8000,
    runtime: str = "torch",
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    threads: Optional[int] = None,
    log_level: str = "info",
) -> None:
    import uvicorn

    app = create_app(bundle, runtime, max_candidates, max_body_bytes, threads)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
