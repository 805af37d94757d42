"""The HTTP side of `hovle-edge serve` (Starlette on uvicorn): OpenAI's chat completions, streamed
as server-sent events or answered whole, `/v1/models` and `/health`. Every request is checked,
and its images read and preprocessed, before it joins the model thread's queue, so a bad request is
a 4xx that names what was wrong and never reaches the graphs."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from hovle_edge.serve import protocol
from hovle_edge.serve.images import ImageInput, digest, image_bytes, pixel_values
from hovle_edge.serve.prompt import prompt_ids
from hovle_edge.serve.protocol import ChatRequest, ImageRef
from hovle_edge.serve.settings import RequestError, ServeSettings
from hovle_edge.serve.worker import Delta, Failed, Finished, Job, Worker

class Events:
    """The model thread's events for one request, handed over to the event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def post(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is shutting down
            pass

    async def next(self):
        return await self.queue.get()


def create_app(settings: ServeSettings, engine=None) -> Starlette:
    """The ASGI app; `engine` is made from settings.model_dir unless given."""
    if engine is None:
        from hovle_edge.serve.engine import Engine

        engine = Engine.from_dir(settings.model_dir, backend=settings.backend, device=settings.device,
                                 threads=settings.threads)
    worker = Worker(engine, settings)
    started = int(time.time())

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise RequestError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)",
                               code="invalid_api_key")

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": settings.model_name, "active": worker.active,
                             "waiting": worker.jobs.qsize(), "cancelled": worker.cancelled,
                             "prefix_cache": {"entries": len(worker.prefix_cache.entries),
                                              "mb": round(worker.prefix_cache.used / 2**20, 2)},
                             "image_cache": {"entries": len(worker.image_cache.entries),
                                             "mb": round(worker.image_cache.used / 2**20, 2)}})

    async def models(request: Request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                                         "created": started, "owned_by": "hovle-edge"}]})

    async def chat_completions(request: Request):
        authorize(request)
        chat = protocol.parse_chat_request(await read_json(request, settings.max_body_bytes))
        if chat.model != settings.model_name:
            raise RequestError(404, f"the model {chat.model!r} does not exist; this server has "
                                    f"{settings.model_name!r}", param="model", code="model_not_found")
        images = [await run_in_threadpool(read_image, ref) for ref in chat.images]
        prompt, max_tokens = fit(chat, images)
        events = Events()
        job = Job(prompt, images, chat.sampling, max_tokens, chat.stop, events.post)
        worker.submit(job)
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            first = await events.next()  # the prefill's outcome decides the status
        finally:
            watcher.cancel()
        if isinstance(first, Failed):
            raise RequestError(first.status, first.message)
        request_id = protocol.completion_id()
        if chat.stream:
            return StreamingResponse(stream(first, events, job, request_id), media_type="text/event-stream")
        return await whole(first, events, job, request, request_id)

    def read_image(ref: ImageRef) -> ImageInput:
        data, path = image_bytes(ref.url, settings, ref.where)
        key = digest(data)
        embeds = worker.image_cache.get(key)
        if embeds is not None:  # seen before: no decoding at all
            return ImageInput(key, len(embeds) // engine.tokens_per_tile, embeds=embeds)
        values = pixel_values(engine, data, path, ref.where)
        return ImageInput(key, len(values), pixel_values=values)

    def fit(chat: ChatRequest, images: list[ImageInput]) -> tuple:
        """The prompt ids, and the answer's length within the context; a prompt that does not fit is a 400."""
        prompt = prompt_ids(engine.tokenizer, engine.template, chat.turns, [image.tiles for image in images])
        context, used = engine.max_context, len(prompt.ids)
        if used >= context:
            raise RequestError(400, f"the prompt is {used} tokens (images included) but the model's context is "
                                    f"{context}: it leaves no room for an answer; shorten the conversation or "
                                    "send fewer images", param="messages", code="context_length_exceeded")
        if chat.max_tokens is not None and used + chat.max_tokens > context:
            raise RequestError(400, f"the prompt is {used} tokens and max_tokens asks for {chat.max_tokens} more, "
                                    f"past the model's context of {context}", param="max_tokens",
                               code="context_length_exceeded")
        return prompt, chat.max_tokens or context - used

    async def stream(first, events: Events, job: Job, request_id: str):
        """SSE chunks; Starlette cancels this generator when the client disconnects."""
        try:
            yield sse(protocol.chunk(request_id, settings.model_name, {"role": "assistant", "content": ""}))
            event = first
            while True:
                if isinstance(event, Delta):
                    yield sse(protocol.chunk(request_id, settings.model_name, {"content": event.text}))
                elif isinstance(event, Finished):
                    yield sse(protocol.chunk(request_id, settings.model_name, {}, event.reason, usage(event),
                                             event.timings))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield sse(error_body(event))
                    return
                event = await events.next()
        finally:
            job.cancelled.set()  # harmless once the answer is complete

    async def whole(first, events: Events, job: Job, request: Request, request_id: str):
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            pieces, event = [], first
            while isinstance(event, Delta):
                pieces.append(event.text)
                event = await events.next()
        finally:
            watcher.cancel()
        if isinstance(event, Failed):
            raise RequestError(event.status, event.message)
        return JSONResponse(protocol.completion(request_id, settings.model_name, "".join(pieces), event.reason,
                                                usage(event), event.timings))

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    async def request_error(request: Request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={RequestError: request_error})
    app.state.worker = worker
    return app


async def read_json(request: Request, limit: int):
    """The body as JSON, refused with 413 past `limit` bytes before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is {declared} bytes, over the limit of {limit}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise RequestError(413, f"the request body is over the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON ({e})") from e


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled.set()
            return


def usage(event: Finished) -> dict:
    return protocol.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def error_body(event: Failed) -> dict:
    return {"error": {"message": event.message, "type": "server_error" if event.status >= 500 else
                      "invalid_request_error", "code": event.status}}
