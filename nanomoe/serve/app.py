"""The HTTP layer: OpenAI-compatible endpoints over the scheduler, and the playground at `/`.

    POST /v1/completions        prompt -> text (stream=true: server-sent events, OpenAI chunks)
    POST /v1/chat/completions   messages -> reply, turns framed by <|im_start|>role ... <|im_end|>
    GET  /v1/models             the one model served
    GET  /health                liveness and load (no API key needed)
    GET  /                      the playground (nanomoe/serve/static/playground.html)

Extensions to the OpenAI request: `top_k` (int), and `experts` (bool, MoE models): every streamed
chunk then carries `experts`, the experts its token went to in each MoE layer, and each choice's
last chunk (or the whole response) `routing`: per generated token, its text, experts and their
router probabilities per MoE layer. Errors are OpenAI error objects with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal

import torch
from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..analysis.report_html import EXPERT_COLOURS_JS
from ..data.special_tokens import IM_END, IM_START
from ..errors import ConfigError
from ..generation import check_sampling
from .scheduler import Request, Scheduler

MAX_STOP_STRINGS = 4  # as OpenAI


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # extension
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    experts: bool = False  # extension: per-token experts of an MoE model


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def create_app(scheduler: Scheduler, *, model_name: str, api_key: str | None = None,
               grace_s: float = 10.0) -> FastAPI:
    """The app; it starts the scheduler when it starts and closes it (after grace_s) when it stops."""
    tokenizer = scheduler.tokenizer
    block_size = scheduler.block_size
    model_config = scheduler.engine.model.config
    threads = torch.get_num_threads()  # what the model runs on (set by the CLI before the app)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.close, grace_s)

    app = FastAPI(title="nanomoe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
        elif first.get("type") == "extra_forbidden":
            message = f"unknown field '{param}': remove it (see GET /v1/models and docs/serve.md for what is accepted)"
        else:
            message = f"{param}: {first['msg']}" if param else first["msg"]
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    def authorized(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), api_key.encode())):
            raise ApiError(401, "incorrect or missing API key: send the header 'Authorization: Bearer KEY' "
                                "with the server's --api-key", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanomoe",
                "max_model_len": block_size, "n_experts": model_config.n_experts if model_config.is_moe else 0,
                "moe_layers": scheduler.engine.moe_layers}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "backend": scheduler.engine.backend,
                "busy": scheduler.busy(), "max_batch": scheduler.max_batch, "threads": threads}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    page = (resources.files("nanomoe.serve").joinpath("static/playground.html").read_text(encoding="utf-8")
            .replace("/*%EXPERT_COLOURS%*/", EXPERT_COLOURS_JS))

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return page

    def prepare(body: _Sampling, prompt: list[int], max_tokens: int | None, stop_ids: set[int]) -> Request:
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"model '{body.model}' is not served here; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                           param="prompt")
        if len(prompt) >= block_size:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the model's context is {block_size} tokens "
                                "and leaves no room for an answer: shorten it", param="prompt",
                           code="context_length_exceeded")
        room = block_size - len(prompt)
        if max_tokens is None:
            max_tokens = room
        if max_tokens <= 0:
            raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if max_tokens > room:
            raise ApiError(400, f"max_tokens {max_tokens} goes beyond the context: the prompt has {len(prompt)} of "
                                f"the model's {block_size} tokens; ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        if not 1 <= body.n <= scheduler.max_batch:
            raise ApiError(400, f"n must be between 1 and {scheduler.max_batch} (the server's --max-batch), "
                                f"got {body.n}", param="n")
        try:
            check_sampling(body.temperature, body.top_k, body.top_p)
        except ConfigError as e:
            param = next((p for p in ("temperature", "top_k", "top_p") if str(e).startswith(p)), None)
            raise ApiError(400, str(e), param=param) from None
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
        if body.experts and not model_config.is_moe:
            raise ApiError(400, "experts: this is a dense model, it has no experts", param="experts")
        return Request(prompt=prompt, max_tokens=max_tokens, emit=lambda e: None, temperature=body.temperature,
                       top_k=body.top_k or None, top_p=body.top_p, n=body.n, seed=body.seed,
                       stop_ids=frozenset(stop_ids), stop_strings=tuple(stops), experts=body.experts)

    async def events(request: Request):
        """The scheduler's events for `request`, as they come; cancels it if the consumer goes away."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def emit(event):
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening
                request.cancelled = True

        request.emit = emit
        try:
            scheduler.submit(request)
        except ConfigError as e:
            raise ApiError(503, str(e), kind="server_error", code="shutting_down") from None
        finished = 0
        try:
            while finished < request.n:
                event = await inbox.get()
                if "error" in event:
                    raise ApiError(500, event["error"], kind="server_error")
                finished += "finish_reason" in event
                yield event
        finally:
            if finished < request.n:
                request.cancelled = True

    async def respond(request: Request, body: _Sampling, kind: Literal["text_completion", "chat.completion"]):
        rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        chat = kind == "chat.completion"
        usage = {"prompt_tokens": len(request.prompt), "completion_tokens": 0, "total_tokens": len(request.prompt)}

        def count(event):
            if "completion_tokens" in event:
                usage["completion_tokens"] += event["completion_tokens"]
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]

        if not body.stream:
            texts = [""] * request.n
            choices: list[dict] = [{} for _ in range(request.n)]
            async for event in events(request):
                i = event["choice"]
                texts[i] += event.get("text", "")
                if "finish_reason" in event:
                    count(event)
                    choices[i] = {"index": i, "finish_reason": event["finish_reason"], "logprobs": None}
                    if event["routing"] is not None:
                        choices[i]["routing"] = event["routing"]
            for i, c in enumerate(choices):
                c.update({"message": {"role": "assistant", "content": texts[i]}} if chat else {"text": texts[i]})
            return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name,
                    "choices": choices, "usage": usage}

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        stream = events(request)  # started here, so a bad submit is an error response, not a broken stream
        first = await anext(stream)

        def chunk(choices, **extra):
            return "data: " + json.dumps({"id": rid, "object": chunk_kind, "created": int(time.time()),
                                          "model": model_name, "choices": choices, **extra}) + "\n\n"

        async def sse():
            try:
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                                 for i in range(request.n)])
                event = first
                while event is not None:
                    i = event["choice"]
                    choice: dict = {"index": i, "finish_reason": event.get("finish_reason"), "logprobs": None}
                    text = event.get("text", "")
                    if chat:
                        choice["delta"] = {"content": text} if text else {}
                    else:
                        choice["text"] = text
                    if event.get("experts") is not None:
                        choice["experts"] = event["experts"]
                    if event.get("routing") is not None:
                        choice["routing"] = event["routing"]
                    count(event)
                    yield chunk([choice])
                    event = await anext(stream, None)
                if include_usage:
                    yield chunk([], usage=usage)
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield "data: " + json.dumps(error_body(e.message, e.kind)) + "\n\n"
            finally:
                await stream.aclose()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request, got {len(prompt)}: send them as separate requests "
                                    "(they are batched on the server)", param="prompt")
            prompt = prompt[0]
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request = prepare(body, ids or [tokenizer.eot_id], body.max_tokens if body.max_tokens is not None else 16,
                          {tokenizer.eot_id})
        return await respond(request, body, "text_completion")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest):
        special = tokenizer.special_tokens
        if IM_START not in special or IM_END not in special:
            raise ApiError(400, f"this model's tokenizer has no {IM_START}/{IM_END} tokens for chat turns: use "
                                "/v1/completions", param="messages")
        start, end = special[IM_START], special[IM_END]
        ids: list[int] = []
        for m in body.messages:
            ids += [start, *tokenizer.encode(f"{m.role}\n{m.content}"), end, *tokenizer.encode("\n")]
        ids += [start, *tokenizer.encode("assistant\n")]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        request = prepare(body, ids, max_tokens, {end, tokenizer.eot_id})
        return await respond(request, body, "chat.completion")

    return app
