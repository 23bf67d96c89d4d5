"""An OpenAI-compatible HTTP server over the engine: /v1/completions, /v1/chat/completions
(streamed as server-sent events with "stream": true), /v1/models and /health.

    python -m inference.serve --run runs/smollm2 --quantize int8 --port 8000
    python -m inference.serve --run runs/smollm2 --draft-run runs/smollm2 --draft-quantize int4
    python -m inference.serve --run runs/smollm2 --quantize int8 --ngram-draft --compile
    python -m inference.serve --run runs/smollm2 --quantize int8 --eagle-draft runs/smollm2-eagle

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="smollm2", messages=[...], stream=True)

The HTTP layer is the standard library's ThreadingHTTPServer (one thread per connection, no
dependency). One scheduler thread owns the engine: it moves queued requests into free cache
slots and steps the engine, so requests that arrive while others run are decoded in the same
batch (continuous batching). The queue of requests not yet in a slot is bounded (--max-queue:
a full queue answers 429); a body over --max-request-bytes, a prompt over the context, or
max_tokens over --max-tokens answer 400 with a message naming the field; the server keeps
serving. The watermark is off unless --watermark, and each request may switch it
("watermark": true / false / {...settings}).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common.atomic import write_json
from common.cli import add_run_arguments, parse_device
from common.errors import run_cli
from data.chat import ChatTemplateError, chat_ids
from inference.eagle import load_eagle
from inference.engine import Engine, Sequence
from inference.ngram import NgramDraft
from inference.openai_api import (
    Limits,
    Request,
    RequestError,
    chunk,
    parse_request,
    response,
    usage_chunk,
)
from inference.watermark import add_watermark_arguments, watermark_config
from model.generate import generation_defaults
from model.load import checkpoint_tokenizer, load_model
from model.quant import MODES, add_quantize_arguments

ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


class Pending:
    """A request's sequences and the events the scheduler thread sends its handler thread."""

    def __init__(self, req: Request):
        self.req = req
        self.events: queue.SimpleQueue = queue.SimpleQueue()  # (choice index, text, reason | None)
        self.seqs: list[Sequence] = []


class Server:
    def __init__(self, engine: Engine, tokenizer, limits: Limits, max_queue: int = 64,
                 max_request_bytes: int = 1 << 20, chat_template: str | None = None):  # fmt: skip
        self.engine, self.tokenizer, self.limits = engine, tokenizer, limits
        self.max_request_bytes = max_request_bytes
        self.chat_template = chat_template
        self.incoming: queue.Queue[Pending] = queue.Queue(maxsize=max_queue)
        self.stats: Counter = Counter()
        self._stop = threading.Event()
        self._scheduler = threading.Thread(target=self._schedule, name="scheduler", daemon=True)
        self.httpd: ThreadingHTTPServer | None = None

    # --- the scheduler thread: the only one that touches the engine ------------------------

    def _schedule(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.engine.has_work():  # idle: wait for a request
                    self._admit(self.incoming.get(timeout=0.05))
                while self.engine.free_slots() > 0:
                    self._admit(self.incoming.get_nowait())
            except queue.Empty:
                pass
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception as e:  # a bug must not hang the clients: end what is running
                    print(f"inference.serve: engine step failed: {e!r}", file=sys.stderr)
                    self.stats["engine_errors"] += 1
                    self.engine.fail_all()

    def _admit(self, pending: Pending) -> None:
        for i, prompt in enumerate(pending.req.prompts):
            def on_token(seq, token, text, i=i, pending=pending):
                reason = seq.finish_reason if token is None else None
                if text or reason:
                    pending.events.put((i, text, reason))
            pending.seqs.append(self.engine.submit(prompt, pending.req.params, on_token))

    def render_chat(self, messages: list[dict]) -> list[int]:
        try:
            return chat_ids(self.tokenizer, messages, add_generation_prompt=True, template=self.chat_template)
        except ChatTemplateError as e:
            raise RequestError(str(e), "messages") from None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
        server = self

        class Handler(_Handler):
            app = server

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._scheduler.start()
        threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True).start()
        return self.httpd

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._stop.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        self._scheduler.join(timeout=5)

    def summary(self) -> dict:
        return {**self.stats, **{f"engine_{k}": v for k, v in self.engine.stats.items()},
                "acceptance_rate": self.engine.acceptance_rate()}  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    app: Server
    server_version = "pretrain-inference/1"

    def log_message(self, fmt, *args):  # quiet: the summary counts requests
        pass

    def do_GET(self):
        if self.path == "/health":
            return self._json(200, {"status": "ok"})
        if self.path == "/v1/models":
            model = {"id": self.app.limits.model_name, "object": "model", "created": 0, "owned_by": "pretrain"}
            return self._json(200, {"object": "list", "data": [model]})
        self._json(404, RequestError(f"no route GET {self.path}", status=404, kind="not_found_error").body())

    def do_POST(self):
        app = self.app
        app.stats["requests"] += 1
        try:
            kind = ROUTES.get(self.path.split("?")[0])
            if kind is None:
                raise RequestError(f"no route POST {self.path}; try {sorted(ROUTES)}", status=404, kind="not_found_error")
            req = parse_request(kind, self._body(), app.limits, app.tokenizer, app.render_chat)
            pending = Pending(req)
            try:
                app.incoming.put_nowait(pending)
            except queue.Full:
                raise RequestError(f"the server's queue is full ({app.incoming.maxsize} waiting requests); retry later",
                                   status=429, kind="rate_limit_error") from None  # fmt: skip
        except RequestError as e:
            app.stats[f"status_{e.status}"] += 1
            return self._json(e.status, e.body())
        try:
            self._stream(pending) if req.stream else self._complete(pending)
            app.stats["status_200"] += 1
        except (BrokenPipeError, ConnectionResetError):  # the client left: stop its sequences
            for s in pending.seqs:
                s.cancelled = True
            app.stats["disconnected"] += 1

    def _body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a JSON body with a Content-Length header is required")
        if int(length) > self.app.max_request_bytes:
            self.close_connection = True  # the unread body is not worth reading
            raise RequestError(f"the request body has {length} bytes; the limit is {self.app.max_request_bytes}")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None

    def _events(self, pending: Pending):
        """(choice, text, finish reason) until every choice has finished."""
        left = len(pending.req.prompts)
        while left:
            event = pending.events.get()
            left -= event[2] is not None
            yield event

    def _complete(self, pending: Pending) -> None:
        req, n = pending.req, len(pending.req.prompts)
        texts, reasons = [""] * n, ["stop"] * n
        for i, text, reason in self._events(pending):
            texts[i] += text
            reasons[i] = reason or reasons[i]
        completion = sum(len(s.generated) for s in pending.seqs)
        self.app.stats["completion_tokens"] += completion
        prompt = sum(len(p) for p in req.prompts)
        self._json(200, response(req, self.app.limits.model_name, texts, reasons, prompt, completion))

    def _stream(self, pending: Pending) -> None:
        req, model = pending.req, self.app.limits.model_name
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the end of the body ends the stream
        self.end_headers()
        self.close_connection = True
        if req.kind == "chat":
            for i in range(len(req.prompts)):
                self._event(chunk(req, model, i, "", None, first=True))
        for i, text, reason in self._events(pending):
            if text:
                self._event(chunk(req, model, i, text, None))
            if reason:
                self._event(chunk(req, model, i, None, reason))
        completion = sum(len(s.generated) for s in pending.seqs)
        self.app.stats["completion_tokens"] += completion
        if req.include_usage:
            self._event(usage_chunk(req, model, sum(len(p) for p in req.prompts), completion))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference.serve", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, out_help="write a JSON summary of what was served to FILE at shutdown")
    add_quantize_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the run's name)")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (cache slots)")
    parser.add_argument("--max-len", type=int, default=2048, help="context: prompt + completion tokens")
    parser.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a request may ask")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20)
    parser.add_argument("--chat-template", metavar="FILE", default=None, help="a jinja template (default: the tokenizer's)")
    parser.add_argument("--draft-run", metavar="DIR", default=None, help="speculative decoding: the draft's run")
    parser.add_argument("--draft-quantize", choices=MODES, default=None)
    parser.add_argument("--ngram-draft", action="store_true",
                        help="speculative decoding with drafts copied from each sequence itself (no draft model)")
    parser.add_argument("--eagle-draft", metavar="DIR", default=None,
                        help="speculative decoding with an EAGLE head trained for this model (python -m inference.eagle)")
    parser.add_argument("--speculate-k", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--watermark", action="store_true", help="watermark every response unless it says no")
    add_watermark_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)
    try:
        model, job, ckpt = load_model(args.run, device, args.step, args.quantize, args.group_size)
        tokenizer = checkpoint_tokenizer(ckpt, job)
        chosen = [f for f, v in (("--draft-run", args.draft_run), ("--ngram-draft", args.ngram_draft),
                                 ("--eagle-draft", args.eagle_draft)) if v]  # fmt: skip
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)}: choose one draft")
        draft = NgramDraft() if args.ngram_draft else None
        if args.draft_run:
            draft = load_model(args.draft_run, device, quantize=args.draft_quantize, group_size=args.group_size)[0]
        if args.eagle_draft:
            draft = load_eagle(args.eagle_draft, model)
        template = Path(args.chat_template).read_text() if args.chat_template else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"python -m inference.serve: {e}") from None
    engine = Engine(model, tokenizer, args.max_batch, args.max_len, draft, args.speculate_k, args.compile)
    name = args.model_name or Path(args.run).resolve().name
    limits = Limits(
        name, model.cfg.vocab_size, engine.max_len, args.max_tokens,
        watermark=watermark_config(args) if args.watermark else None,
        # an imported model's generation_config eos ids (e.g. <|im_end|>), and end-of-text
        stop_tokens=tuple(dict.fromkeys([*generation_defaults(tokenizer)[1], tokenizer.eot_id])),
    )
    server = Server(engine, tokenizer, limits, args.max_queue, args.max_request_bytes, template)
    server.start(args.host, args.port)
    print(f"serving {ckpt} as {name!r} on {server.url}/v1 (batch {args.max_batch}, context {engine.max_len})")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if args.out:
            write_json(Path(args.out), server.summary())


if __name__ == "__main__":
    run_cli(main)
