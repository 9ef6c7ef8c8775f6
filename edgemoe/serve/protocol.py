"""OpenAI's request and response shapes: parse a body into a generation, shape what comes back.

Parsing never touches the model: it checks types and ranges and names the field
of the first bad one (ApiError.param), so every malformed request is a 400 in
OpenAI's error shape before it can take a slot. Fields edgemoe does not
implement are refused when set to anything but their no-op value, never
silently ignored (n > 1, echo, best_of, non-zero presence/frequency penalties);
fields that do not change the output (user, metadata...) are accepted.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from edgemoe.sampling import Sampling

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error response: HTTP status, message, the field at fault, OpenAI's type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status,
            message,
            param,
            type,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param)


@dataclass(frozen=True)
class Parsed:
    """A validated request.

    prompt: chat messages (list of {role, content: str}), text, or token ids.
    max_tokens: None for the endpoint's default. logprobs: None, 0 (the chosen token's), or
    the number of alternatives per token.
    """

    chat: bool
    prompt: object
    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...]
    logprobs: int | None
    stream: bool
    include_usage: bool
    model: str | None
    ignore_eos: bool = False


def _number(body: dict, name: str, lo: float, hi: float, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(name, f"'{name}' must be a number, got {v!r}")
    if not lo <= v <= hi:
        raise bad(name, f"'{name}' must be between {lo} and {hi}, got {v!r}")
    return v


def _integer(body: dict, name: str, lo: int, hi: int | None = None, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"'{name}' must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(name, f"'{name}' must be {rng}, got {v!r}")
    return v


def _noop(body: dict, name: str, allowed) -> None:
    v = body.get(name)
    if v is not None and v not in allowed:
        raise bad(name, f"'{name}'={v!r} is not supported by this server (use {allowed[0]!r})")


def _sampling(body: dict) -> Sampling:
    """OpenAI's temperature/top_p/seed plus llama.cpp's top_k, min_p, repetition_penalty;
    what is not given keeps edgemoe's (llama.cpp's) defaults; temperature 0 is greedy."""
    d = Sampling()
    temperature = _number(body, "temperature", 0, 2, d.temperature)
    if temperature == 0:
        return Sampling.greedy()
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"'seed' must be an integer, got {seed!r}")
    return Sampling(
        temperature=float(temperature),
        top_k=_integer(body, "top_k", 0, None, d.top_k),
        # OpenAI allows top_p 0 (only the most likely token); Sampling wants more than 0
        top_p=float(_number(body, "top_p", 0, 1, d.top_p)) or 1e-9,
        min_p=float(_number(body, "min_p", 0, 1, d.min_p)),
        repetition_penalty=float(
            _number(body, "repetition_penalty", 1e-6, 100, d.repetition_penalty)
        ),
        seed=None if seed is None else seed % 2**64,
    )


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "'stop' must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}")
    return tuple(s for s in stops if s)


def _common(body: object, chat: bool) -> dict:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"'model' must be a string, got {model!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", f"'stream' must be true or false, got {stream!r}")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    include = (opts or {}).get("include_usage", True)
    if not isinstance(include, bool):
        raise bad("stream_options.include_usage", "'include_usage' must be true or false")
    _integer(body, "n", 1, 1)
    for name in ("presence_penalty", "frequency_penalty"):
        _noop(body, name, (0, 0.0))
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = None
    for name in names:
        v = _integer(body, name, 1)
        max_tokens = v if v is not None else max_tokens
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extra: always max_tokens tokens
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos", f"'ignore_eos' must be true or false, got {ignore_eos!r}")
    return dict(
        model=model,
        ignore_eos=ignore_eos,
        stream=stream,
        include_usage=include,
        max_tokens=max_tokens,
        sampling=_sampling(body),
        stop=_stop(body),
    )


def parse_chat(body: object) -> Parsed:
    """A /v1/chat/completions body.

    Raises:
        ApiError: 400 naming the first bad field.
    """
    c = _common(body, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(where, f"'{where}' must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(
                f"{where}.role", f"'{where}.role' must be system, user or assistant, got {role!r}"
            )
        content = msg.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(f"{where}.content", "only text content parts are supported")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"'{where}.content' must be a string")
        clean.append({"role": "system" if role == "developer" else role, "content": content})
    want = body.get("logprobs", False)
    if not isinstance(want, bool):
        raise bad("logprobs", f"'logprobs' must be true or false, got {want!r}")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not want:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return Parsed(chat=True, prompt=clean, logprobs=(top or 0) if want else None, **c)


def parse_completion(body: object, vocab: int) -> Parsed:
    """A /v1/completions body: prompt as text or token ids (one prompt per request).

    Raises:
        ApiError: 400 naming the first bad field.
    """
    c = _common(body, chat=False)
    _noop(body, "echo", (False,))
    _noop(body, "best_of", (1,))
    _noop(body, "suffix", ("",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "'prompt' is empty")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        if any(isinstance(t, bool) or not 0 <= t < vocab for t in prompt):
            raise bad("prompt", f"'prompt' token ids must be in 0..{vocab - 1}")
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("prompt", "one prompt per request (send several requests; they are batched)")
    else:
        raise bad("prompt", "'prompt' must be a non-empty string or list of token ids")
    lp = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    return Parsed(chat=False, prompt=prompt, logprobs=lp, **c)


# ---- responses
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class Logprobs:
    """Collects one choice's token logprobs and renders them in the endpoint's shape."""

    def __init__(self, piece):
        self.piece = piece  # token id -> its text
        self.items: list[tuple[int, float, tuple]] = []

    def add(self, records) -> list:
        new = [
            (r.token, r.logprob, r.top_logprobs or ())
            for r in records
            if r.token is not None and r.logprob is not None
        ]
        self.items += new
        return new

    def chat(self, items) -> dict:
        def entry(tid, lp):
            text = self.piece(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                for t, lp, top in items
            ],
            "refusal": None,
        }

    def text(self, items, offset: int = 0) -> dict:
        tokens = [self.piece(t) for t, _, _ in items]
        offsets, pos = [], offset
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in items],
            "top_logprobs": [{self.piece(a): b for a, b in top} or None for _, _, top in items],
            "text_offset": offsets,
        }


def chat_response(rid, model, text, finish, logprobs, use) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        ],
        "usage": use,
        "system_fingerprint": "edgemoe",
    }


def chat_chunk(rid, model, created, delta=None, finish=None, logprobs=None, use=None) -> dict:
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
    )
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
        "system_fingerprint": "edgemoe",
    }


def completion_response(rid, model, text, finish, logprobs, use) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        "usage": use,
        "system_fingerprint": "edgemoe",
    }


def completion_chunk(rid, model, created, text=None, finish=None, logprobs=None, use=None):
    choices = (
        []
        if text is None
        else [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]
    )
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
        "system_fingerprint": "edgemoe",
    }
