"""The HTTP front end: a Starlette app on uvicorn, talking to the model worker through queues.

Each request is parsed and tokenized here (off the event loop), checked
against the context, and handed to the worker as a Job whose events come back
through an asyncio queue; the worker thread alone touches the model. A client
that goes away cancels its job, which leaves the batch at the next step.

Endpoints: POST /v1/chat/completions, POST /v1/completions (OpenAI's shapes,
streaming as server-sent events ending `data: [DONE]`), GET /v1/models,
GET /health, GET /metrics (Prometheus), GET / (the chat page and its live
panel, fed by GET /api/panel).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edgemoe.generate import Request
from edgemoe.serve import protocol as P
from edgemoe.serve.metrics import ServerMetrics
from edgemoe.serve.worker import SERVING, Done, Failed, Job, NotServing, QueueFull, Worker
from formats.errors import EmoeError

STATIC = Path(__file__).parent / "static"
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class ServeConfig:
    """What `edgemoe serve` was asked for (see edgemoe/serve/cli.py for each flag)."""

    model: str | None = None
    mem: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch: int = 4
    max_queue: int = 32
    ctx: int | None = None
    api_key: str | None = None
    device: str | None = None
    dtype: str = "auto"
    level: int | None = None
    threads: int = 2
    name: str | None = None
    prefix_reuse: bool = True
    static_batching: bool = False
    expert_cache: str | None = None
    compute_threads: int | None = None


class Server:
    """The app (`.app`, ASGI) and the worker behind it; the worker starts with `.worker.start()`.

    load: makes the EdgeModel (default: edgemoe.load with cfg's settings); the worker calls
    it on its own thread.
    """

    def __init__(self, cfg: ServeConfig, load=None):
        import edgemoe

        self.cfg = cfg
        self.name = cfg.name or (Path(cfg.model).stem if cfg.model else "demo")
        self.metrics = ServerMetrics(lambda: self.worker)

        def default_load():
            if cfg.compute_threads:  # on the worker thread, the one that computes
                import torch

                torch.set_num_threads(cfg.compute_threads)
            return edgemoe.load(
                cfg.model,
                cfg.mem,
                ctx=cfg.ctx,
                batch=cfg.max_batch,
                dtype=cfg.dtype,
                level=cfg.level,
                threads=cfg.threads,
                device=cfg.device,
                expert_cache=cfg.expert_cache,
            )

        self.worker = Worker(
            load or default_load,
            max_queue=cfg.max_queue,
            prefix_reuse=cfg.prefix_reuse,
            static=cfg.static_batching,
            metrics=self.metrics,
        )
        self.created = int(time.time())
        g = self._guard
        self.app = Starlette(
            routes=[
                Route("/", self.page),
                Route("/health", self.health),
                Route("/metrics", self.prometheus),
                Route("/v1/models", g(self.models)),
                Route("/v1/models/{model:path}", g(self.model_info)),
                Route("/v1/chat/completions", g(self.chat), methods=["POST"]),
                Route("/v1/completions", g(self.completions), methods=["POST"]),
                Route("/api/panel", g(self.panel)),
                Mount("/static", StaticFiles(directory=STATIC), name="static"),
            ],
            exception_handlers={HTTPException: self._http_error},
        )

    # ---- plumbing
    def _guard(self, handler):
        """The API key check and ApiError -> OpenAI's error JSON, around an API handler."""

        @functools.wraps(handler)
        async def run(request: HttpRequest):
            try:
                key = self.cfg.api_key
                if key:
                    given = request.headers.get("authorization", "")
                    token = given[7:] if given.lower().startswith("bearer ") else ""
                    if not hmac.compare_digest(token.encode(), key.encode()):
                        raise P.ApiError(
                            401,
                            "missing or wrong API key: send 'Authorization: Bearer KEY'",
                            code="invalid_api_key",
                        )
                return await handler(request)
            except P.ApiError as e:
                return _error(e)

        return run

    async def _http_error(self, request, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error(
            P.ApiError(
                exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind
            )
        )

    def _serving(self) -> None:
        if self.worker.state != SERVING:
            raise P.ApiError(
                503, f"the model is {self.worker.state}", type="server_error", code="not_ready"
            )

    # ---- plain endpoints
    async def page(self, request):
        return HTMLResponse((STATIC / "index.html").read_text())

    async def health(self, request):
        w = self.worker
        body = {"status": w.state, "model": self.name}
        if w.state == "failed":
            body["error"] = str(w.error)
        return JSONResponse(body, status_code=200 if w.state == SERVING else 503)

    async def prometheus(self, request):
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def _model_card(self) -> dict:
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "edgemoe"}
        m = self.worker.model
        if m is not None:
            card["meta"] = {
                "family": m.reader.family,
                "ctx": m.ctx,
                "max_batch": m.batch,
                "budget": None if m.mem is None else int(m.mem),
                "chat_template": bool(m.tokenizer.template),
            }
        return card

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request):
        if request.path_params["model"] != self.name:
            raise P.ApiError(
                404, f"no model {request.path_params['model']!r}", "model", code="model_not_found"
            )
        return JSONResponse(self._model_card())

    async def panel(self, request):
        body = await run_in_threadpool(self.worker.panel)
        m = self.worker.model
        body.update(model=self.name, max_batch=self.cfg.max_batch, ctx=m.ctx if m else None)
        return JSONResponse(body)

    # ---- generation
    def _body_limit(self) -> int:
        """Bytes a request body may have: plenty for a context of text or token ids, little
        enough that every connection at once cannot crowd the budget."""
        m = self.worker.model
        ctx = m.ctx if m is not None else 2048
        return min(max(64 * ctx, 64 * 1024), 8 * 1024 * 1024)

    async def chat(self, request):
        parsed = P.parse_chat(await _body(request, self._body_limit()))
        return await self._generate(request, parsed)

    async def completions(self, request):
        self._serving()
        vocab = self.worker.model.facts.args.vocab_size
        parsed = P.parse_completion(await _body(request, self._body_limit()), vocab)
        return await self._generate(request, parsed)

    async def _generate(self, request, parsed: P.Parsed):
        self._serving()
        if parsed.model is not None and parsed.model != self.name:
            raise P.ApiError(
                400,
                f"unknown model {parsed.model!r}: this server serves {self.name!r}",
                "model",
                code="model_not_found",
            )
        m = self.worker.model
        ids = await run_in_threadpool(self._encode, parsed)
        field = "messages" if parsed.chat else "prompt"
        if len(ids) >= m.ctx:
            raise P.bad(field, f"the prompt has {len(ids)} tokens; the context is {m.ctx}")
        room = m.ctx - len(ids)
        if parsed.max_tokens is None:
            max_tokens = room if parsed.chat else min(DEFAULT_COMPLETION_TOKENS, room)
        elif parsed.max_tokens > room:
            raise P.bad(
                "max_tokens",
                f"the prompt ({len(ids)} tokens) + max_tokens={parsed.max_tokens} exceed the "
                f"context of {m.ctx}; ask for {room} or fewer",
            )
        else:
            max_tokens = parsed.max_tokens
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop closed (shutdown)
                pass

        req = Request(tuple(ids), max_tokens, parsed.sampling, parsed.stop, parsed.logprobs)
        job = Job(req, emit, ignore_eos=parsed.ignore_eos)
        try:
            self.worker.submit(job)
        except QueueFull as e:
            self.metrics.rejected.labels("queue_full").inc()
            raise P.ApiError(
                503,
                f"the server is at capacity ({e}); retry shortly",
                type="server_error",
                code="overloaded",
            ) from None
        except NotServing:
            self._serving()
            raise
        rid = P.new_id(parsed.chat)
        if parsed.stream:
            gen = self._sse(job, events, parsed, rid, len(ids))
            return StreamingResponse(
                gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await self._whole(request, job, events, parsed, rid, len(ids))

    def _encode(self, parsed: P.Parsed) -> list[int]:
        m = self.worker.model
        tok = m.tokenizer
        if parsed.chat and not tok.template:
            raise P.bad("messages", "this model has no chat template: use /v1/completions")
        try:
            if not parsed.chat:
                return m.encode(parsed.prompt)
            return self._continue(tok, tok.render_chat(parsed.prompt))
        except EmoeError as e:
            raise P.bad(
                getattr(e, "param", None) or ("messages" if parsed.chat else "prompt"), str(e)
            ) from None

    def _continue(self, tok, text: str) -> list[int]:
        """A chat's ids, continuing the exact tokens a slot kept when the conversation so far is
        their text: a reply the model generated seldom re-tokenizes to the same ids, so
        matching ids alone would reuse only up to the first difference."""
        if self.cfg.prefix_reuse:
            for kept in self.worker.kept_prefixes():
                before = tok.tok.decode(list(kept), skip_special_tokens=False)
                if before and text.startswith(before) and "\ufffd" not in before[-1:]:
                    return list(kept) + tok.encode(text[len(before) :])
        return tok.encode(text)

    def _piece(self, tid: int) -> str:
        return _piece(self.worker.model.tokenizer, tid)

    async def _whole(self, request, job, events, parsed, rid, n_prompt):
        lp = P.Logprobs(self._piece) if parsed.logprobs is not None else None

        async def collect():
            while True:
                ev = await events.get()
                if isinstance(ev, list):
                    if lp:
                        lp.add(ev)
                    continue
                return ev

        result = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not result.done():  # the client went away: free its slot at the next step
            job.cancel()
            result.cancel()
            return Response(status_code=499)
        gone.cancel()
        ev = result.result()
        if isinstance(ev, Failed):
            raise P.ApiError(500, ev.message, type="server_error")
        seq = ev.seq
        use = P.usage(n_prompt, len(seq.out), ev.cached)
        if parsed.chat:
            body = P.chat_response(
                rid, self.name, seq.text, seq.finish_reason, lp.chat(lp.items) if lp else None, use
            )
        else:
            body = P.completion_response(
                rid, self.name, seq.text, seq.finish_reason, lp.text(lp.items) if lp else None, use
            )
        return JSONResponse(body)

    async def _sse(self, job, events, parsed, rid, n_prompt):
        created, name = int(time.time()), self.name
        lp = P.Logprobs(self._piece) if parsed.logprobs is not None else None
        offset = 0
        try:
            if parsed.chat:
                yield _sse(P.chat_chunk(rid, name, created, {"role": "assistant", "content": ""}))
            while True:
                ev = await events.get()
                if isinstance(ev, list):
                    text = "".join(r.text for r in ev)
                    finish = next((r.finish_reason for r in ev if r.finish_reason), None)
                    items = lp.add(ev) if lp else []
                    if parsed.chat:
                        if text or items:
                            lps = lp.chat(items) if lp else None
                            delta = {"content": text}
                            yield _sse(P.chat_chunk(rid, name, created, delta, None, lps))
                        if finish:
                            yield _sse(P.chat_chunk(rid, name, created, {}, finish))
                    elif text or items or finish:
                        lps = lp.text(items, offset) if lp else None
                        offset += len(text)
                        yield _sse(P.completion_chunk(rid, name, created, text, finish, lps))
                elif isinstance(ev, Done):
                    if parsed.include_usage:
                        use = P.usage(n_prompt, len(ev.seq.out), ev.cached)
                        shape = P.chat_chunk if parsed.chat else P.completion_chunk
                        yield _sse(shape(rid, name, created, use=use))
                    yield b"data: [DONE]\n\n"
                    return
                else:
                    err = P.ApiError(500, ev.message, type="server_error")
                    yield _sse(err.body())
                    yield b"data: [DONE]\n\n"
                    return
        finally:
            job.cancel()  # a client gone mid-stream leaves the batch at the next step


@functools.lru_cache(maxsize=65536)
def _piece(tokenizer, tid: int) -> str:
    """A token's own text (special tokens included), for logprobs."""
    return tokenizer.tok.decode([tid], skip_special_tokens=False)


async def _body(request: HttpRequest, limit: int):
    """The JSON body, read up to `limit` bytes (a bigger one is refused before it is held)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise P.ApiError(
                413, f"the request body is over {limit} bytes, more than this context needs"
            )
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise P.bad(None, f"the request body is not valid JSON: {e}") from None


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _error(e: P.ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def serve(cfg: ServeConfig) -> int:
    """Bind, start the worker (it loads the model while /health answers 503), serve until
    SIGINT/SIGTERM. Returns the exit status.

    Raises:
        EmoeError (and subclasses): the model failed to load (a bad file, a budget too small).
        OSError: the address is in use.
    """
    import uvicorn

    server = Server(cfg)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    port = sock.getsockname()[1]
    # connections past the running batch, the queue and a few probes get uvicorn's 503, so
    # request bodies in flight stay bounded too
    concurrency = cfg.max_batch + cfg.max_queue + 16
    uv = uvicorn.Server(
        uvicorn.Config(
            server.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            limit_concurrency=concurrency,
        )
    )
    w = server.worker

    def failed(e: BaseException) -> None:
        print(f"edgemoe serve: the model worker failed: {e}", file=sys.stderr, flush=True)
        uv.should_exit = True

    def ready() -> None:
        m, p = w.model, w.model.plan
        budget = "unlimited" if m.mem is None else str(m.mem)
        print(
            f"edgemoe serve: ready: {server.name} ({m.reader.family}), budget {budget}: floor "
            f"{p.floor}, KV {p.kv_cache} ({m.batch} x {m.ctx} tokens), expert cache "
            f"{p.expert_cache} of {p.all_experts}, prefix reuse "
            f"{'on' if cfg.prefix_reuse else 'off'}, {'static' if cfg.static_batching else 'continuous'} batching",
            file=sys.stderr,
            flush=True,
        )

    w.on_failed, w.on_ready = failed, ready
    # uvicorn re-raises the signal that stopped it once it has shut down; a no-op SIGTERM
    # handler lets that return here, so the worker stops and the summary prints
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: None)
    print(
        f"edgemoe serve: listening on http://{cfg.host}:{port} (loading {server.name})",
        file=sys.stderr,
        flush=True,
    )
    w.start()
    try:
        uv.run(sockets=[sock])
    finally:
        w.stop()
        if w.model is not None:
            print(f"edgemoe serve: stopped: {w.summary_line()}", file=sys.stderr, flush=True)
            w.model.close()
        sock.close()
    if w.state == "failed" and w.error is not None:
        if isinstance(w.error, (EmoeError, ValueError, OSError)):
            raise w.error
        return 1
    return 0


__all__ = ["ServeConfig", "Server", "serve"]
