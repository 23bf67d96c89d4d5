"""The OpenAI-compatible request and response bodies of the server (inference/serve.py):
/v1/completions and /v1/chat/completions, as the official `openai` client sends and reads them.

Requests are checked field by field; anything wrong raises `RequestError` (HTTP 400, or the
status it carries) with a message naming the field, in OpenAI's error shape. Extensions beyond
the OpenAI fields: `top_k`, and `watermark` (true / false, or an object with gamma, delta,
seeding_scheme, context_width, hash_key) to switch the green-list watermark per request.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace

from inference.sampling import SamplingParams
from inference.watermark import WatermarkConfig

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
          "stop", "seed", "watermark", "user", "presence_penalty", "frequency_penalty",
          "logit_bias", "max_completion_tokens"}  # fmt: skip
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "logprobs", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "tools", "tool_choice",
                        "response_format", "parallel_tool_calls"}  # fmt: skip
# Fields accepted only at their neutral value (the sampler has none of these).
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "echo": False,
           "logprobs": None, "best_of": 1, "suffix": None, "top_logprobs": None, "tools": None,
           "tool_choice": None, "response_format": None, "parallel_tool_calls": None}  # fmt: skip
ROLES = ("system", "user", "assistant", "developer", "tool")


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Limits:
    """What the server accepts (serve's flags)."""

    model_name: str
    vocab_size: int
    max_len: int  # prompt + completion tokens
    max_tokens: int  # the largest max_tokens a request may ask for
    default_max_tokens: int = 16  # completions (OpenAI's default); chat: up to max_tokens
    watermark: WatermarkConfig | None = None  # the server's default watermark (None: off)
    stop_tokens: tuple[int, ...] = ()


@dataclass
class Request:
    kind: str  # "completion" | "chat"
    prompts: list[list[int]]  # token ids, one per choice
    params: SamplingParams
    stream: bool
    include_usage: bool
    id: str
    created: int


def _get(body: dict, name: str, types, default, check=None, expected: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(f"'{name}' must be {expected}, got {value!r}", name)
    if not isinstance(value, types) or (check is not None and not check(value)):
        raise RequestError(f"'{name}' must be {expected}, got {value!r}", name)
    return value


def _watermark(value, default: WatermarkConfig | None) -> WatermarkConfig | None:
    if value is None:
        return default
    if isinstance(value, bool):
        return (default or WatermarkConfig()) if value else None
    if not isinstance(value, dict):
        raise RequestError("'watermark' must be true, false or an object of watermark settings", "watermark")
    known = {"gamma", "delta", "seeding_scheme", "context_width", "hash_key"}
    if set(value) - known:
        raise RequestError(f"'watermark' has unknown fields {sorted(set(value) - known)}; known: {sorted(known)}", "watermark")
    try:
        return replace(default or WatermarkConfig(), **value)
    except (TypeError, ValueError) as e:
        raise RequestError(f"'watermark': {e}", "watermark") from None


def parse_request(kind: str, body, limits: Limits, tokenizer, render_chat) -> Request:
    """A JSON body -> Request, or RequestError. render_chat(messages) -> prompt token ids."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    allowed = COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unsupported field(s) {unknown}; supported: {sorted(allowed)}", unknown[0])
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in (neutral, None):
            raise RequestError(f"'{name}' is not supported by this server (only {neutral!r})", name)
    model = body.get("model")
    if model is not None and model != limits.model_name:
        raise RequestError(f"model {model!r} does not exist; this server serves {limits.model_name!r}",
                           "model", status=404, kind="not_found_error")  # fmt: skip
    if _get(body, "n", int, 1, lambda n: n == 1, "1 (one choice per prompt)") != 1:
        raise RequestError("'n' must be 1", "n")

    if kind == "completion":
        prompts = _completion_prompts(body.get("prompt"), tokenizer, limits)
        default_max = limits.default_max_tokens
    else:
        prompts = [render_chat(_messages(body.get("messages")))]
        default_max = limits.max_tokens
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, name, int, default_max, lambda v: v >= 1, "an integer >= 1")
    if max_tokens > limits.max_tokens:
        raise RequestError(f"'{name}' = {max_tokens} exceeds this server's limit of {limits.max_tokens}", name)
    for p in prompts:
        if not p:
            raise RequestError("the prompt is empty", "prompt" if kind == "completion" else "messages")
        if len(p) >= limits.max_len:
            raise RequestError(
                f"the prompt has {len(p)} tokens; this model's context holds {limits.max_len} "
                "tokens (prompt and completion together)", "prompt" if kind == "completion" else "messages",
            )
    max_tokens = min(max_tokens, limits.max_len - max(len(p) for p in prompts))
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise RequestError("'stop' must be a string or a list of up to 4 strings", "stop")
    stream_options = _get(body, "stream_options", dict, {}, None, "an object")
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=float(_get(body, "temperature", (int, float), 1.0, lambda t: 0 <= t <= 2, "a number in [0, 2]")),
            top_p=float(_get(body, "top_p", (int, float), 1.0, lambda t: 0 < t <= 1, "a number in (0, 1]")),
            top_k=_get(body, "top_k", int, 0, lambda k: k >= 0, "an integer >= 0"),
            stop_tokens=limits.stop_tokens,
            stop_strings=tuple(stops),
            seed=_get(body, "seed", int, None, None, "an integer"),
            watermark=_watermark(body.get("watermark"), limits.watermark),
        )
    except ValueError as e:
        raise RequestError(str(e)) from None
    return Request(
        kind, prompts, params, stream=_get(body, "stream", bool, False, None, "true or false"),
        include_usage=bool(stream_options.get("include_usage", False)),
        id=("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24],
        created=int(time.time()),
    )


def _completion_prompts(prompt, tokenizer, limits: Limits) -> list[list[int]]:
    vocab = limits.vocab_size
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p) for p in prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt)
            and all(isinstance(t, int) and not isinstance(t, bool) for p in prompt for t in p)):  # fmt: skip
        if any(not 0 <= t < vocab for p in prompt for t in p):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        return prompt
    raise RequestError("'prompt' must be a string, a list of strings, or token ids (a list of integers)", "prompt")


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}] must be an object with a role in {list(ROLES)}", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content):
                raise RequestError(f"messages[{i}].content: only text parts are supported", f"messages[{i}]")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", f"messages[{i}]")
        out.append({"role": m["role"], "content": content})
    return out


# --- responses ---------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def response(req: Request, model: str, texts: list[str], reasons: list[str], n_prompt: int, n_completion: int) -> dict:
    if req.kind == "completion":
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons))]  # fmt: skip
        obj = "text_completion"
    else:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                    "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]  # fmt: skip
        obj = "chat.completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": model,
            "choices": choices, "usage": usage(n_prompt, n_completion)}  # fmt: skip


def chunk(req: Request, model: str, index: int, text: str | None, finish_reason: str | None,
          first: bool = False) -> dict:  # fmt: skip
    """One server-sent event of a streamed response."""
    if req.kind == "completion":
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    else:
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", "content": text or ""}
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion.chunk"
    return {"id": req.id, "object": obj, "created": req.created, "model": model, "choices": [choice]}


def usage_chunk(req: Request, model: str, n_prompt: int, n_completion: int) -> dict:
    obj = "text_completion" if req.kind == "completion" else "chat.completion.chunk"
    return {"id": req.id, "object": obj, "created": req.created, "model": model, "choices": [],
            "usage": usage(n_prompt, n_completion)}  # fmt: skip
