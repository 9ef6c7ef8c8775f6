"""The real `openai` client against a real `edgemoe serve`: chat, completions, streaming, usage,
logprobs, errors, and the plain endpoints."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from edgemoe.demo import DEMO
from edgemoe.tokenizer import Tokenizer
from formats.reader import EmoeReader

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def test_chat(client):
    r = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == "demo" and r.id.startswith("chatcmpl-")
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completions_text_and_token_ids(client):
    a = client.completions.create(
        model="demo", prompt="The function returns", max_tokens=8, temperature=0
    )
    assert a.object == "text_completion" and a.choices[0].text and a.usage.completion_tokens == 8
    with EmoeReader(DEMO) as r:
        ids = Tokenizer(r).encode("The function returns")
    b = client.completions.create(model="demo", prompt=ids, max_tokens=8, temperature=0)
    assert b.choices[0].text == a.choices[0].text
    assert b.usage.prompt_tokens == a.usage.prompt_tokens == len(ids)


def test_streaming_chat_ends_with_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="demo", messages=HELLO, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    whole = client.chat.completions.create(
        model="demo", messages=HELLO, max_tokens=10, temperature=0
    )
    assert text == whole.choices[0].message.content


def test_streaming_completion_honours_include_usage(client):
    kw = dict(model="demo", prompt="In the beginning", max_tokens=6, temperature=0, stream=True)
    with_usage = list(client.completions.create(**kw, stream_options={"include_usage": True}))
    assert with_usage[-1].usage.completion_tokens == 6 and with_usage[-1].choices == []
    without = list(client.completions.create(**kw, stream_options={"include_usage": False}))
    assert all(c.usage is None for c in without)
    assert "".join(c.choices[0].text for c in without) == "".join(
        c.choices[0].text for c in with_usage if c.choices
    )


def test_raw_stream_is_server_sent_events_ending_done(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"prompt": "The table", "max_tokens": 4, "stream": True},
        timeout=60,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"


def test_logprobs_in_openais_shapes(client):
    r = client.chat.completions.create(
        model="demo", messages=HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy: the best one
        assert e.bytes == list(e.token.encode())
    assert "".join(e.token for e in content) == r.choices[0].message.content
    c = client.completions.create(
        model="demo", prompt="The function returns", max_tokens=4, temperature=0, logprobs=2
    )
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == c.choices[0].text


def test_sampling_seed_and_stop(client):
    kw = dict(model="demo", prompt="In the beginning", max_tokens=16, temperature=0.9, top_p=0.9)
    a = client.completions.create(**kw, seed=7, extra_body={"top_k": 20})
    b = client.completions.create(**kw, seed=7, extra_body={"top_k": 20})
    assert a.choices[0].text == b.choices[0].text  # same seed, same text
    full = client.completions.create(
        model="demo", prompt="The function returns", max_tokens=24, temperature=0
    )
    text = full.choices[0].text
    stop = text.strip().split()[2]
    cut = client.completions.create(
        model="demo", prompt="The function returns", max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)


def test_next_chat_turn_reuses_the_conversation_so_far(client):
    msgs = [{"role": "user", "content": "Tell me about the kingdom of the LORD. " * 6}]
    a = client.chat.completions.create(model="demo", messages=msgs, max_tokens=20, temperature=0)
    msgs += [
        {"role": "assistant", "content": a.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    b = client.chat.completions.create(model="demo", messages=msgs, max_tokens=8, temperature=0)
    cached = b.usage.prompt_tokens_details.cached_tokens
    # everything the first turn left in its slot: its prompt and all but the reply's last token
    assert cached >= a.usage.prompt_tokens + a.usage.completion_tokens - 1
    assert cached < b.usage.prompt_tokens


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "model": "gpt-4o"}, "model"),
        ({"prompt": "x", "max_tokens": 1024}, "max_tokens"),  # prompt + max_tokens > ctx
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, 99999]}, "prompt"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"prompt": "x", "echo": True}, "echo"),
    ],
)
def test_malformed_requests_are_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": "demo", **body})
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_malformed_chat_and_bad_json(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "robot", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=HELLO, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json=[1, 2], timeout=30)
    assert r.status_code == 400
    r = httpx.post(server.url + "/v1/completions", content=b"[" * 5000 + b"]" * 5000, timeout=30)
    assert r.status_code == 400  # nested too deep for the parser: refused, not a crash
    big = {"prompt": "word " * 40000, "max_tokens": 1}  # 200 KB: more than any 1024-token prompt
    r = httpx.post(server.url + "/v1/completions", json=big, timeout=30)
    assert r.status_code == 413 and "body is over" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()


def test_models_health_and_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    h = httpx.get(server.url + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "serving"
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for name in (
        "edgemoe_requests_running",
        "edgemoe_requests_waiting",
        "edgemoe_prompt_tokens_total",
        "edgemoe_generation_tokens_total",
        "edgemoe_time_to_first_token_seconds_bucket",
        "edgemoe_time_per_output_token_seconds_bucket",
        "edgemoe_expert_hits_total",
        "edgemoe_expert_misses_total",
        "edgemoe_flash_read_bytes_total",
        "edgemoe_memory_used_bytes",
        'edgemoe_memory_plan_bytes{part="kv_cache"}',
    ):
        assert name in text, name
    gen = [x for x in text.splitlines() if x.startswith("edgemoe_generation_tokens_total")]
    assert float(gen[0].split()[-1]) > 0


def test_the_page_and_its_panel(server):
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and "/static/app.js" in page.text
    for name in ("index.html", "app.js", "style.css"):  # everything from the package, no CDN
        r = httpx.get(server.url + "/static/" + name, timeout=30)
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text
    p = httpx.get(server.url + "/api/panel", timeout=30).json()
    assert p["state"] == "serving" and len(p["cached"]) == len(p["layers"]) == 4
    assert len(p["cached"][0]) == p["experts"] == 16
    assert p["plan"]["kv_cache"] > 0 and p["budget"] is None and p["series"]


def test_a_client_that_disconnects_frees_its_slot(server):
    def running() -> float:
        text = httpx.get(server.url + "/metrics", timeout=30).text
        line = next(x for x in text.splitlines() if x.startswith("edgemoe_requests_running "))
        return float(line.split()[-1])

    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"prompt": "In the beginning", "max_tokens": 900, "ignore_eos": True, "stream": True},
        timeout=60,
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # generating: leave mid-stream
    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running() == 0
    # a whole (non-streamed) request whose client goes away is dropped too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions",
            json={"prompt": "In the beginning", "max_tokens": 900, "ignore_eos": True},
            timeout=1.5,
        )
    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running() == 0
