"""Serve a saved text model over HTTP, batching concurrent requests into one forward pass.

    python -m runner.serve model_dir=DIR [host=127.0.0.1] [port=8080] [backend=auto]
    python -m runner.serve model_dir=runs:/<run id>   (or models:/<registered name>/<version|latest>)

    curl -X POST localhost:8080/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"text": "a gripping film"}]}'

The request and answer formats are MLflow's scoring server's (``dataframe_records``, ``dataframe_split``,
``inputs``; ``params``: ``embeddings``, ``top_k``; the answer ``{"predictions": [...]}`` with runner.predict's
rows), so a client of ``mlflow models serve`` works unchanged. ``GET /ping`` (also ``/health``) answers once
the model is loaded; ``GET /metadata`` says what is served and how.

Where the time goes: requests that arrive together are answered together. One worker thread takes the first
waiting request, collects others for up to ``max_wait_ms`` or until ``max_batch`` texts, and runs them sorted by length in
sub-batches of at most ``max_tokens`` padded tokens through the backend ``runner.predict`` would choose (``backend=auto``: the ONNX graph
exported from these weights, written at start when missing and the folder is writable; else PyTorch) with one
thread per available core. A bad request is a 4xx with a message (wrong fields, a non-string text, more than
``max_texts`` texts, a body over ``max_body_kb``, invalid JSON or UTF-8); it never reaches the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from runner.errors import RunnerError

log = logging.getLogger("runner")


@dataclass
class ServeConfig:
    model_dir: str = ""
    host: str = "127.0.0.1"  # loopback: 0.0.0.0 to listen on every interface (inside a container)
    port: int = 8080
    backend: str = "auto"  # auto | torch | onnx | onnx-int8, as runner.predict
    precision: str = "auto"
    export: bool = True  # backend=auto without a graph from these weights: export one at start (if the folder is writable)
    max_batch: int = 64  # texts per forward pass
    max_tokens: int = 512  # padded tokens per forward pass (length-sorted sub-batches: little of the work is padding)
    max_wait_ms: float = 2.0  # how long a forward pass waits for more requests to join it
    max_texts: int = 256  # per request
    max_body_kb: int = 1024
    max_queue: int = 4096  # texts waiting; beyond: 503 (the client should back off)
    tracking_uri: str | None = None


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    columns: list[list[str]]
    embeddings: bool
    top_k: int | None
    future: Future

    @property
    def size(self) -> int:
        return len(self.columns[0])


class Batcher:
    """One worker thread that runs waiting requests together (the backend uses every core for one batch)."""

    def __init__(self, predictor, max_batch: int, max_wait_ms: float, max_queue: int, max_tokens: int) -> None:
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000
        self.max_tokens = max_tokens
        self.max_queue, self.waiting = max_queue, 0
        self.lock = threading.Lock()
        self.queue: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self.loop, name="runner-serve-batcher", daemon=True).start()

    def submit(self, columns: list[list[str]], embeddings: bool, top_k: int | None) -> Future:
        job = Job(columns, embeddings, top_k, Future())
        with self.lock:
            if self.waiting + job.size > self.max_queue:
                raise BadRequest(503, f"the server is busy ({self.waiting} texts waiting): retry shortly")
            self.waiting += job.size
        self.queue.put(job)
        return job.future

    def loop(self) -> None:
        while True:
            jobs = [self.queue.get()]
            deadline, size = time.monotonic() + self.max_wait, jobs[0].size
            while size < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                jobs.append(job)
                size += job.size
            with self.lock:
                self.waiting -= size
            self.answer(jobs)

    def answer(self, jobs: list[Job]) -> None:
        try:
            self.run(jobs)
        except Exception as err:  # noqa: BLE001  (answered per request below: one bad input must not fail the others)
            if len(jobs) == 1:
                jobs[0].future.set_exception(err)
                return
            for job in jobs:
                self.answer([job])

    def run(self, jobs: list[Job]) -> None:
        width = len(jobs[0].columns)
        columns = [[text for job in jobs for text in job.columns[i]] for i in range(width)]
        embeddings = any(job.embeddings for job in jobs)
        outputs = self.predictor.run(columns, self.max_batch, embeddings=embeddings, max_tokens=self.max_tokens)
        start = 0
        for job in jobs:
            end = start + job.size
            head = outputs["head"][start:end] if outputs["head"] is not None else None
            wanted = job.embeddings or head is None  # an embedding model's output is its vectors
            part = {"head": head, "columns": [c[start:end] for c in outputs["columns"]] if wanted else [], "text_ids": None}
            job.future.set_result(self.predictor.records(part, job.top_k))
            start = end


def request_columns(payload, fields: list[str], max_texts: int) -> tuple[list[list[str]], dict]:
    """The text columns and params of an MLflow-style request body (already parsed JSON)."""
    if not isinstance(payload, dict):
        raise BadRequest(400, "the body must be a JSON object with dataframe_records, dataframe_split or inputs")
    formats = [k for k in ("dataframe_records", "dataframe_split", "inputs", "instances") if k in payload]
    extra = set(payload) - {*formats, "params"}
    if len(formats) != 1 or extra:
        raise BadRequest(400, f"the body must hold exactly one of dataframe_records, dataframe_split, inputs (and "
                              f"optionally params); got keys {sorted(payload)}")
    body = payload[formats[0]]
    if formats[0] == "dataframe_split":
        if not isinstance(body, dict) or not isinstance(body.get("columns"), list) or not isinstance(body.get("data"), list):
            raise BadRequest(400, "dataframe_split must be {\"columns\": [...], \"data\": [[...], ...]}")
        names = body["columns"]
        if not all(isinstance(row, list) and len(row) == len(names) for row in body["data"]):
            raise BadRequest(400, f"dataframe_split: every data row must be a list of {len(names)} values")
        rows = [dict(zip(names, row)) for row in body["data"]]
    elif isinstance(body, list) and all(isinstance(v, str) for v in body) and len(fields) == 1:
        rows = [{fields[0]: v} for v in body]  # inputs: ["text", ...]
    elif isinstance(body, dict) and formats[0] != "dataframe_records":  # inputs: {"text": [...], ...}
        if not all(isinstance(v, list) for v in body.values()) or len({len(v) for v in body.values()}) > 1:
            raise BadRequest(400, f"{formats[0]} as an object maps each column to a list of equal length")
        rows = [dict(zip(body, values)) for values in zip(*body.values())]
    elif isinstance(body, list) and all(isinstance(v, dict) for v in body):
        rows = body
    else:
        raise BadRequest(400, f"{formats[0]} must be a list of records ({{\"{fields[0]}\": ...}}), or a list of texts")
    if not rows:
        raise BadRequest(400, "no rows to predict")
    if len(rows) > max_texts:
        raise BadRequest(413, f"{len(rows)} rows in one request: at most {max_texts} (max_texts); split the request")
    columns = []
    for field in fields:
        values = [row.get(field) for row in rows]
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None and field not in rows[bad]:
            raise BadRequest(400, f"row {bad} has no {field!r}: this model reads {fields}, the row has {sorted(rows[bad])}")
        if bad is not None:
            other = sorted(set(rows[bad]) - set(fields))
            raise BadRequest(400, f"row {bad}: {field!r} must be a string (got {type(values[bad]).__name__}); this model "
                                  f"reads {fields}" + (f", not {other}" if other else ""))
        columns.append(values)
    unknown = sorted({k for row in rows for k in row} - set(fields))
    if unknown:
        raise BadRequest(400, f"unknown columns {unknown}: this model reads {fields}")
    params = payload.get("params") or {}
    if not isinstance(params, dict) or set(params) - {"embeddings", "top_k"}:
        raise BadRequest(400, "params takes embeddings (true/false) and top_k (a positive integer)")
    if not isinstance(params.get("embeddings", False), bool):
        raise BadRequest(400, "params.embeddings must be true or false")
    top_k = params.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise BadRequest(400, "params.top_k must be a positive integer")
    return columns, params


def ensure_graph(folder: Path, cfg: ServeConfig) -> None:
    """backend=auto serves the fastest correct path: export the fp32 graph first when it is missing or stale."""
    import os

    from runner.predict import choose_backend

    if cfg.backend != "auto" or not cfg.export:
        return
    chosen, why, _ = choose_backend(folder, "auto")
    if chosen != "torch" or "onnxruntime is not installed" in why:
        return
    if not os.access(folder, os.W_OK):
        log.info("backend=auto: %s, and %s is read-only: serving with PyTorch", why, folder)
        return
    from runner.export import export_onnx

    log.info("backend=auto: exporting the ONNX graph first (%s)", why.split(" (")[0])
    export_onnx(folder, folder / "onnx")


def make_app(cfg: ServeConfig, predictor):
    import orjson
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response
    from starlette.routing import Route

    meta = predictor.meta
    fields = ["text", "text_pair"] if meta.get("data_type") == "pair" else ["text"]
    batcher = Batcher(predictor, cfg.max_batch, cfg.max_wait_ms, cfg.max_queue, cfg.max_tokens)
    limit = cfg.max_body_kb * 1024

    def answer(status: int, body) -> Response:
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise BadRequest(413, f"the body is over {cfg.max_body_kb} KB (max_body_kb)")
        chunks, size = [], 0
        async for chunk in request.stream():  # chunked bodies too: stop reading at the limit
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"the body is over {cfg.max_body_kb} KB (max_body_kb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def invocations(request):
        try:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise BadRequest(415, f"Content-Type {kind or 'none'}: send application/json")
            raw = await read_body(request)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BadRequest(400, f"the body is not UTF-8 (byte {err.start})") from err
            try:
                payload = orjson.loads(text)
            except orjson.JSONDecodeError as err:
                raise BadRequest(400, f"the body is not valid JSON ({err})") from err
            columns, params = request_columns(payload, fields, cfg.max_texts)
            future = batcher.submit(columns, bool(params.get("embeddings", False)), params.get("top_k"))
            rows = await asyncio.wrap_future(future)
        except BadRequest as err:
            return answer(err.status, {"error_code": "BAD_REQUEST" if err.status < 500 else "BUSY", "message": str(err)})
        except ClientDisconnect:
            return Response(status_code=400)
        except RunnerError as err:  # the model's own refusal of an input (a non-finite output, ...)
            return answer(422, {"error_code": "UNPROCESSABLE", "message": str(err)})
        return answer(200, {"predictions": rows})

    async def ping(request):
        return answer(200, {"status": "ok"})

    async def metadata(request):
        return answer(200, {"model_dir": str(predictor.folder), "task": meta.get("task"), "inputs": fields,
                            "labels": meta.get("labels") or [], "backend": predictor.backend,
                            "precision": predictor.precision, "max_batch": cfg.max_batch, "max_texts": cfg.max_texts})

    return Starlette(routes=[Route("/invocations", invocations, methods=["POST"]), Route("/ping", ping),
                             Route("/health", ping), Route("/metadata", metadata)])


def load(cfg: ServeConfig):
    from runner.artifact import read_meta
    from runner.predict import Predictor, resolve_model_dir

    folder = resolve_model_dir(cfg.model_dir, cfg.tracking_uri)
    meta = read_meta(folder)
    if meta.get("kind") == "dual" or meta.get("input") == "embeddings":
        what = "a dual image-text encoder" if meta.get("kind") == "dual" else "a head on given embeddings"
        raise RunnerError(f"{folder} is {what}: runner.serve serves text models; serve it with mlflow models serve "
                          f"-m runs:/<run id>/model (its logged MLflow model)")
    for key, value, low in (("max_batch", cfg.max_batch, 1), ("max_texts", cfg.max_texts, 1),
                            ("max_body_kb", cfg.max_body_kb, 1), ("max_tokens", cfg.max_tokens, 1), ("max_queue", cfg.max_queue, 1), ("port", cfg.port, 0)):
        if value < low:
            raise RunnerError(f"{key}={value} must be at least {low}")
    if cfg.max_wait_ms < 0:
        raise RunnerError(f"max_wait_ms={cfg.max_wait_ms} must be 0 or more")
    ensure_graph(folder, cfg)
    return Predictor(folder, cfg.backend, cfg.precision)


def main(argv: list[str] | None = None) -> None:
    from runner.predict import parse_args

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv, ServeConfig)
        predictor = load(cfg)
        app = make_app(cfg, predictor)
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    import uvicorn

    log.info("serving %s on http://%s:%d/invocations (%s, batches of up to %d texts)", predictor.folder, cfg.host,
             cfg.port, predictor.backend, cfg.max_batch)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_keep_alive=30)


if __name__ == "__main__":
    main()
