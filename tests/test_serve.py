"""The OpenAI-compatible server (inference/serve.py) driven by the official `openai` client on
localhost, with a tiny model: plain and streamed completions and chats, concurrent clients
batched together, 4xx errors that leave the server serving, the watermark per request."""

import http.client
import json
import threading
import time

import openai
import pytest
import torch

from data.tokenizer import train_bpe
from inference.engine import Engine
from inference.openai_api import Limits
from inference.sampling import SamplingParams
from inference.serve import Server
from inference.watermark import WatermarkConfig, score
from tests.helpers import tiny_model

TEMPLATE = (  # a ChatML-like template in plain text (our tiny tokenizer has no special tokens)
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
TEXTS = ["the quick brown fox jumps over the lazy dog. <user> hi <assistant> hello\n"] * 30


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    tok = train_bpe(TEXTS, vocab_size=300)
    model = tiny_model(tok.n_vocab, seed=0, max_seq_len=256)
    engine = Engine(model, tok, max_batch=8, max_len=256)
    limits = Limits("tiny", model.cfg.vocab_size, engine.max_len, max_tokens=128)
    server = Server(engine, tok, limits, max_queue=32, max_request_bytes=20_000, chat_template=TEMPLATE)
    server.start("127.0.0.1", 0)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield server, client, tok, model
    server.stop()


def test_completion_equals_the_engine(served):
    server, client, tok, model = served
    out = client.completions.create(model="tiny", prompt="the quick", max_tokens=12, temperature=0)
    direct = Engine(model, tok, max_batch=1, max_len=256).generate(
        [tok.encode("the quick")], SamplingParams(max_new_tokens=12, temperature=0, stop_tokens=(tok.eot_id,))
    )[0]
    assert out.choices[0].text == direct.text
    assert out.usage.prompt_tokens == len(tok.encode("the quick"))
    assert out.usage.completion_tokens == len(direct.generated)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_equals_the_whole_answer(served):
    _, client, _, _ = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi fox"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                            temperature=0, stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content and len(text) > 0
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sixteen_concurrent_clients_are_batched(served):
    server, client, _, _ = served
    server.engine.stats["max_rows"] = 0
    answers: dict = {}

    def ask(i):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"fox number {i}"}],
            max_tokens=10 + i, temperature=0.7, seed=i,
        )
        answers[i] = r

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(answers) == list(range(16))
    assert all(a.usage.completion_tokens <= 10 + i for i, a in answers.items())
    assert server.engine.stats["max_rows"] > 1  # requests shared decode steps


def raw_post(server, path: str, body: bytes, headers=None):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = json.loads(r.read() or b"{}")
    conn.close()
    return r.status, data


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(served):
    server, client, _, _ = served
    with pytest.raises(openai.BadRequestError, match="context holds 256 tokens"):
        client.completions.create(model="tiny", prompt=[5] * 300, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="exceeds this server's limit of 128"):
        client.completions.create(model="tiny", prompt="the", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="'temperature' must be a number in"):
        client.completions.create(model="tiny", prompt="the", temperature=5)
    with pytest.raises(openai.BadRequestError, match="'messages'"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-9", prompt="the")
    status, body = raw_post(server, "/v1/completions", b'{"prompt": "the", "max_tokens": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = raw_post(server, "/v1/completions", json.dumps({"prompt": "x" * 30_000}).encode())
    assert status == 400 and "limit is 20000" in body["error"]["message"]
    status, body = raw_post(server, "/v1/completions", b'{"prompt": "the", "best_of": 3}')
    assert status == 400 and body["error"]["param"] == "best_of"
    status, _ = raw_post(server, "/v1/nothing", b"{}")
    assert status == 404
    ok = client.completions.create(model="tiny", prompt="the lazy", max_tokens=5)
    assert ok.choices[0].text is not None and server.stats["status_400"] >= 7


def test_watermark_is_switched_per_request(served, monkeypatch):
    server, client, tok, model = served
    seqs = []  # the engine's sequences: their ids (text would re-tokenize differently)
    submit = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda *a, **k: seqs.append(submit(*a, **k)) or seqs[-1])
    cfg = WatermarkConfig()
    z = {}
    for on in (True, False):
        out = client.completions.create(model="tiny", prompt="the dog", max_tokens=100, temperature=1.0,
                                        seed=3, extra_body={"watermark": on})  # fmt: skip
        assert out.choices[0].text == tok.decode(seqs[-1].generated)
        z[on] = score(seqs[-1].generated, cfg, model.cfg.vocab_size)["z_score"]
    assert z[True] > 4 > z[False], z
    with pytest.raises(openai.BadRequestError, match="watermark"):
        client.completions.create(model="tiny", prompt="the", extra_body={"watermark": {"gamma": 2}})


def test_full_queue_answers_429_and_a_gone_client_frees_its_slot(served):
    server, client, tok, model = served
    engine = Engine(model, tok, max_batch=1, max_len=256)
    slow_step = engine.step
    engine.step = lambda: (time.sleep(0.02), slow_step())  # one slot, busy for seconds
    limits = Limits("tiny", model.cfg.vocab_size, 256, max_tokens=200)
    small = Server(engine, tok, limits, max_queue=1, chat_template=TEMPLATE)
    small.start("127.0.0.1", 0)
    try:
        c = openai.OpenAI(base_url=small.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        stream = c.completions.create(model="tiny", prompt="the", max_tokens=200, stream=True, temperature=1.0)
        next(iter(stream))  # the one slot is taken
        waiting = threading.Thread(target=lambda: c.completions.create(model="tiny", prompt="a", max_tokens=2))
        waiting.start()
        deadline = time.time() + 30
        while small.incoming.qsize() < 1 and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            c.completions.create(model="tiny", prompt="b", max_tokens=2)
        stream.close()  # the client goes away: its sequence is cancelled, the waiting one runs
        waiting.join(timeout=60)
        assert not waiting.is_alive()
    finally:
        small.stop()
