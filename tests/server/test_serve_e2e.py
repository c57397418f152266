"""`q35jit serve` end to end: the official openai client (and raw HTTP where the client cannot send
what is tested) against a real server process on 127.0.0.1 running the tiny model on the CPU."""
import json
import math
import random
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import BIN, MODEL, NAME, Server

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast for a city. «Ünïcode» \"quoted\"",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "the city"},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
            "ratio": {"type": "number", "minimum": 0.5e-5}},
            "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "filters": {"type": "object"}}}}},
]


def tokenize(server, body):
    r = httpx.post(server.url + "/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def metric(server, name):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics:\n{text}"
    return float(m.group(1))


# ------------------------------------------------------------------ prompt rendering

CONVERSATIONS = [
    ([{"role": "user", "content": "Hello"}], None),
    ([{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "Hi there"}], None),
    ([{"role": "system", "content": "You help."}, {"role": "user", "content": "Q1"},
      {"role": "assistant", "content": "<think>\nplan A\n</think>\n\nA1"},
      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "reasoning_content": "why 2"},
      {"role": "user", "content": [{"type": "text", "text": "part one "}, {"type": "text", "text": "part two"}]}],
     None),
    # tools, a tool call after reasoning, parallel calls, tool results grouped, reasoning kept after the last query
    ([{"role": "system", "content": "sys"}, {"role": "user", "content": "Weather in Paris and Oslo?"},
      {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
       "tool_calls": [
           {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {
               "city": "Paris", "days": 3, "metric": True, "ratio": 1e-05}}},
           {"id": "c2", "type": "function", "function": {"name": "search", "arguments": {
               "query": "Oslo \"weather\"", "filters": {"lang": "nø", "n": [1, 2.5, None]}}}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
      {"role": "tool", "tool_call_id": "c2", "content": "  rain\n"},
      {"role": "assistant", "content": "Paris: sunny. Oslo: rain."},
      {"role": "user", "content": "Thanks"}], TOOLS),
    ([{"role": "user", "content": "call it"},
      {"role": "assistant", "content": "Let me check.", "tool_calls": [
          {"id": "c3", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
      {"role": "tool", "tool_call_id": "c3", "content": "{\"t\": 21}"}], TOOLS),
    ([{"role": "user", "content": "no system, tools only"}], TOOLS[:1]),
]


def openai_messages(messages):
    """The wire form: tool-call arguments as JSON strings."""
    out = []
    for m in messages:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {"name": c["function"]["name"],
                                                  "arguments": json.dumps(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("thinking", [True, False])
def test_prompt_matches_official_template_and_tokenizer(server, template, hf_tokenizer, case, thinking):
    messages, tools = CONVERSATIONS[case]
    expected = template.render(messages=messages, tools=tools, add_generation_prompt=True, enable_thinking=thinking)
    body = {"model": NAME, "messages": openai_messages(messages), "chat_template_kwargs": {"enable_thinking": thinking}}
    if tools:
        body["tools"] = tools
    got = tokenize(server, body)
    assert got["prompt"] == expected
    assert got["tokens"] == hf_tokenizer.encode(expected, add_special_tokens=False).ids


def test_usage_counts_equal_the_tokenizer(server, client, template, hf_tokenizer):
    messages = [{"role": "user", "content": "Count me, please: 1 2 3 ünïcode"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, seed=3)
    text = template.render(messages=messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(hf_tokenizer.encode(text, add_special_tokens=False).ids)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


# ------------------------------------------------------------------ chat completions

def test_chat_non_streaming_reasoning_on_and_off(client):
    on = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                        temperature=0)
    msg = on.choices[0].message
    # The random model never closes its think block: everything is reasoning, nothing is content.
    assert msg.reasoning_content and msg.content == "" and "<think>" not in msg.reasoning_content
    off = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                         temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content and off.choices[0].message.reasoning_content is None
    top = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                         temperature=0, extra_body={"enable_thinking": False})
    assert top.choices[0].message.content == off.choices[0].message.content


def test_chat_streaming_equals_non_streaming(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Tell me"}], max_tokens=20, seed=11, temperature=0.8)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == full.choices[0].message.reasoning_content
    assert content == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_seed_reproducibility(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Random?"}], max_tokens=24, temperature=1.0,
              extra_body={"enable_thinking": False})
    a = client.chat.completions.create(**kw, seed=42).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=42).choices[0].message.content
    c = client.chat.completions.create(**kw, seed=43).choices[0].message.content
    assert a == b and a != c


def test_stop_strings_across_token_boundaries(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Go on"}], max_tokens=40, temperature=0,
              extra_body={"enable_thinking": False, "logprobs": True})
    base = client.chat.completions.create(**kw)
    text = base.choices[0].message.content
    tokens = [t.token for t in base.choices[0].logprobs.content]
    assert "".join(tokens) == text
    # A stop string that starts inside token 5 and ends inside a later token.
    start = len("".join(tokens[:5])) + max(1, len(tokens[5]) // 2)
    stop = text[start:start + 6]
    assert len(stop) == 6
    for stream in (False, True):
        if stream:
            got = "".join(c.choices[0].delta.content or "" for c in
                          client.chat.completions.create(**kw, stop=[stop, "zzzz-unused"], stream=True) if c.choices)
        else:
            r = client.chat.completions.create(**kw, stop=stop)
            got = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop"
        assert got == text[:text.index(stop)]
        assert stop not in got


def test_logprobs(client):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=6, seed=1,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1.0 + 1e-5
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob


# ------------------------------------------------------------------ tools

def test_tool_call_round_trip(server, client, template):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=30, seed=5,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.message.tool_calls, choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict)
    assert "<tool_call>" not in (choice.message.content or "")
    # The same call, streamed: the client's deltas assemble to the same call.
    stream = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=30, seed=5,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            stream=True)
    name, arguments, ids = "", "", set()
    for c in stream:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            assert d.index == 0
            ids.add(d.id) if d.id else None
            name += d.function.name or ""
            arguments += d.function.arguments or ""
    assert name == "get_weather" and json.loads(arguments) == args and len(ids) == 1
    # Second half: the call and its result go back; the prompt is the template's, and the model answers.
    history = messages + [{"role": "assistant", "content": choice.message.content,
                           "tool_calls": [{"id": call.id, "type": "function",
                                           "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
                          {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = client.chat.completions.create(model=NAME, messages=history, tools=TOOLS, max_tokens=8, seed=5)
    assert r2.choices[0].finish_reason in ("length", "stop")
    jinja_history = [dict(m) for m in history]
    jinja_history[1]["tool_calls"] = [{"id": call.id, "type": "function",
                                       "function": {"name": "get_weather", "arguments": args}}]
    expected = template.render(messages=jinja_history, tools=TOOLS, add_generation_prompt=True)
    assert tokenize(server, {"messages": history, "tools": TOOLS})["prompt"] == expected


def test_tool_choice_required_picks_a_declared_function(client):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "do something"}],
                                       tools=TOOLS, tool_choice="required", max_tokens=20, seed=9)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name in ("get_weather", "search")


def test_tool_choice_none_and_auto(server, client):
    none = tokenize(server, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "none"})
    auto = tokenize(server, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
    assert "<tools>" not in none["prompt"] and "<tools>" in auto["prompt"]
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                       max_tokens=4, seed=1)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


# ------------------------------------------------------------------ completions, models, health, metrics

def test_completions_string_and_token_ids(client, hf_tokenizer):
    a = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=8, temperature=0)
    ids = hf_tokenizer.encode("The quick brown fox", add_special_tokens=False).ids
    b = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0, logprobs=2)
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == len(ids)
    assert len(b.choices[0].logprobs.tokens) == 8 and "".join(b.choices[0].logprobs.tokens) == b.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == a.choices[0].text


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("q35jit_requests_total", "q35jit_prompt_tokens_total", "q35jit_generation_tokens_total",
                 "q35jit_time_to_first_token_seconds_bucket", "q35jit_inter_token_latency_seconds_bucket",
                 "q35jit_queue_length", "q35jit_prefix_cache_hits_total"):
        assert name in text


def test_request_log_line(server, client):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "log me"}], max_tokens=3)
    time.sleep(0.2)
    line = [l for l in server.lines if r.id in l]
    assert line and re.search(r"prompt \d+ tokens .* 3 generated, ttft [\d.]+ ms, [\d.]+ tok/s", line[0]), line


# ------------------------------------------------------------------ errors

def post(server, path, body=None, raw=None, headers=None):
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers or {}, timeout=30)


@pytest.mark.parametrize("body,status,param", [
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": -3}, 400, "top_k"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools[0].function"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": {"type": "function",
      "function": {"name": "nope"}}}, 400, "tool_choice"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
])
def test_bad_requests_are_openai_errors(server, body, status, param):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_more_errors(server, client):
    r = post(server, "/v1/chat/completions", raw='{"messages": [')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = post(server, "/v1/chat/completions", body={"messages": [{"role": "user", "content": "word " * 3000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/completions", body={"prompt": [1, 2, 99999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(server, "/v1/chat/completions", raw="x" * 1_100_000)
    assert r.status_code == 413
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], n=2)
    assert "'n' must be 1" in str(e.value)


def test_api_key():
    s = Server("--api-key", "sekret")
    try:
        from openai import OpenAI
        ok = OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert ok.models.list().data[0].id == NAME
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": "x"}])
        assert httpx.get(s.url + "/health").status_code == 200  # health and metrics need no key
    finally:
        s.stop()


def test_negative_temperature_in_run_is_an_error():
    import subprocess
    from conftest import BIN, MODEL
    r = subprocess.run([str(BIN), "run", "--model", str(MODEL), "--device", "cpu", "--prompt", "x",
                        "--temperature", "-1"], capture_output=True, text=True)
    assert r.returncode != 0 and "--temperature" in r.stderr


# ------------------------------------------------------------------ queueing, disconnects, fuzz

def test_concurrent_clients_are_queued_and_all_answered(client):
    results, errors = {}, []

    def ask(i):
        try:
            r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"client {i}"}],
                                               max_tokens=16, seed=i)
            results[i] = r.usage.completion_tokens
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == {i: 16 for i in range(8)}


def test_queue_full_is_503():
    # One slot: requests beyond the running one wait in the queue, and beyond --max-queue get 503.
    s = Server("--max-queue", "1", "--max-batch", "1")
    try:
        statuses = []

        def ask():
            r = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "long"}], "max_tokens": 300})
            statuses.append(r.status_code)
            if r.status_code != 200:
                assert r.json()["error"]["code"] == "queue_full"

        threads = [threading.Thread(target=ask) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert statuses.count(503) >= 1 and statuses.count(200) >= 2
    finally:
        s.stop()


def test_client_disconnect_stops_generation(server):
    before = metric(server, "q35jit_generation_tokens_total")
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "a very long answer"}], "max_tokens": 1900,
            "stream": True}) as r:
        it = r.iter_lines()
        for _ in range(6):
            next(it)
    # The client is gone; the slot must be free and the generation short.
    deadline = time.time() + 10
    while metric(server, "q35jit_running_requests") != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(server, "q35jit_running_requests") == 0
    time.sleep(0.2)
    assert "client disconnected" in server.log()
    assert metric(server, "q35jit_generation_tokens_total") - before < 1000
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "next"}], "max_tokens": 2})
    assert r.status_code == 200


def send_raw(port, data, timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
            return out
        except (ConnectionResetError, BrokenPipeError, socket.timeout):
            return b""


def test_fuzz_malformed_and_truncated_requests(server):
    rng = random.Random(1234)
    good = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                       "tools": TOOLS, "stop": ["a"], "temperature": 0.5}).encode()

    def request(body, path=b"/v1/chat/completions", length=None):
        n = len(body) if length is None else length
        return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                + str(n).encode() + b"\r\nConnection: close\r\n\r\n" + body)

    statuses = {}
    for i in range(2000):
        kind = i % 6
        if kind == 0:  # the body truncated
            data = request(good[:rng.randrange(len(good))])
        elif kind == 1:  # bytes of the body flipped
            b = bytearray(good)
            for _ in range(rng.randrange(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = request(bytes(b))
        elif kind == 2:  # the HTTP message truncated
            full = request(good)
            data = full[:rng.randrange(len(full))]
        elif kind == 3:  # random bytes
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        elif kind == 4:  # Content-Length larger than the body
            data = request(good, length=len(good) + rng.randrange(1, 100))
        else:  # JSON values of the wrong types in every field
            body = json.loads(good)
            key = rng.choice(list(body))
            body[key] = rng.choice([None, 1, -1.5, "s", [], {}, [1, "x"], {"a": None}, True, "\u0000\ud7ff"])
            data = request(json.dumps(body).encode())
        resp = send_raw(server.port, data)
        m = re.match(rb"HTTP/1\.1 (\d+)", resp)
        status = int(m.group(1)) if m else 0
        statuses[status] = statuses.get(status, 0) + 1
        assert server.proc.poll() is None, f"server died on request {i}: {data[:200]!r}\n{server.log()[-3000:]}"
    assert statuses.get(400, 0) > 500 and 500 not in statuses, statuses
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ------------------------------------------------------------------ prefix cache

def test_prefix_cache_hit_on_second_turn(server, client):
    system = " ".join(f"rule {i}: answer politely and with care." for i in range(60))
    kw = dict(model=NAME, max_tokens=4, seed=1, extra_body={"enable_thinking": False})

    def timed(messages):
        t0 = time.perf_counter()
        r = client.chat.completions.create(messages=messages, **kw)
        return r, time.perf_counter() - t0

    hits0 = metric(server, "q35jit_prefix_cache_hits_total")
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "first question"}]
    r1, cold = timed(turn1)
    assert r1.usage.prompt_tokens > 1000 and r1.usage.prompt_tokens_details.cached_tokens == 0
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "second question"}]
    r2, warm = timed(turn2)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # Turn 2 re-renders turn 1's reply without its think block, so the prompts part at the start of
    # that reply: the cache resumes at the last <|im_start|> of turn 1 (a snapshot point).
    ids = tokenize(server, {"messages": turn1, "enable_thinking": False})["tokens"]
    im_start = tokenize(server, {"prompt": "<|im_start|>"})["tokens"][0]
    assert cached == len(ids) - 1 - ids[::-1].index(im_start), (cached, len(ids))
    assert metric(server, "q35jit_prefix_cache_hits_total") >= hits0 + 1
    assert metric(server, "q35jit_prefix_cache_hit_tokens_total") >= cached
    # A cold prompt of the same length (another system prompt) takes clearly longer.
    other = [{"role": "system", "content": system.replace("rule", "norm")}] + turn2[1:]
    r3, cold2 = timed(other)
    assert r3.usage.prompt_tokens_details.cached_tokens == 0
    assert warm < 0.6 * cold2, (warm, cold2)


def test_restored_prefix_gives_the_same_tokens_as_a_full_prefill(client):
    messages = [{"role": "system", "content": "shared " * 300}, {"role": "user", "content": "q"}]
    kw = dict(model=NAME, max_tokens=12, temperature=0, extra_body={"enable_thinking": False, "logprobs": True})
    first = client.chat.completions.create(messages=messages, **kw)
    again = client.chat.completions.create(messages=messages, **kw)  # resumes from the cache
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.choices[0].message.content == first.choices[0].message.content
    a = [t.logprob for t in first.choices[0].logprobs.content]
    b = [t.logprob for t in again.choices[0].logprobs.content]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


def test_no_memory_growth_over_hundreds_of_requests():
    s = Server("--prefix-cache-gb", "0.02")

    def rss_kb():
        with open(f"/proc/{s.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

    try:
        with httpx.Client(base_url=s.url, timeout=30) as h:
            def one(i):
                r = h.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": f"request number {i} " + "pad " * (i % 40)}],
                    "max_tokens": 4, "seed": i, "stream": i % 2 == 0})
                assert r.status_code == 200
            for i in range(80):
                one(i)
            base = rss_kb()
            for i in range(80, 380):
                one(i)
            grown = rss_kb() - base
        assert grown < 16 * 1024, f"RSS grew by {grown} KiB over 300 requests"
    finally:
        s.stop()


# ------------------------------------------------------------------ continuous batching (--max-batch)

@pytest.fixture(scope="module")
def batch_server():
    # No prefix cache: a restored prefix continues from state computed in other pieces, which may
    # differ in the last bits; here the replies alone and in a batch must be the same tokens.
    s = Server("--max-batch", "4", "--max-context", "1024", "--prefix-cache-gb", "0", "--prefill-chunk", "16")
    yield s
    s.stop()
    assert s.proc.returncode == 0, s.log()


@pytest.fixture(scope="module")
def batch_client(batch_server):
    from openai import OpenAI
    return OpenAI(base_url=batch_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


BATCH_CHATS = [  # (prompt, sampling): greedy and seeded, prompts of different lengths
    ("hi", {"temperature": 0}),
    ("Tell me about the sea. " * 6, {"temperature": 0}),
    ("Count from one to twenty, slowly, and explain each number.", {"temperature": 0.9, "seed": 7}),
    ("What is a prime? " * 3, {"temperature": 1.0, "top_p": 0.9, "seed": 123}),
    ("Write a poem about batching.", {"temperature": 0.7, "extra_body": {"top_k": 20}, "seed": 5}),
    ("x " * 40, {"temperature": 0}),
]


def stream_chat(client, prompt, sampling, max_tokens=40):
    """Text (reasoning + content), finish reason and completion tokens of a streamed chat."""
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True}, **sampling)
    text, finish, tokens = "", None, None
    for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        for c in chunk.choices:
            text += (getattr(c.delta, "reasoning_content", None) or "") + (c.delta.content or "")
            finish = c.finish_reason or finish
    return text, finish, tokens


def test_concurrent_streams_get_the_replies_they_get_alone(batch_server, batch_client):
    alone = [stream_chat(batch_client, p, s) for p, s in BATCH_CHATS]
    # Mostly distinct replies (the random tiny model may give two prompts one greedy reply), so
    # sequences whose outputs were mixed up would not compare equal.
    assert len({a[0] for a in alone}) >= 4
    together, errors = {}, []
    barrier = threading.Barrier(len(BATCH_CHATS))

    def ask(i):
        try:
            barrier.wait(30)
            together[i] = stream_chat(batch_client, *BATCH_CHATS[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(BATCH_CHATS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    for i, want in enumerate(alone):
        assert together[i] == want, f"chat {i}: {together[i]} != {want}"
    # Six requests on four slots: several sequences ran at once (slots above 0 were used).
    slots = {int(m) for m in re.findall(r"finish \w+ \(slot (\d+)\)", batch_server.log())}
    assert slots - {0}, batch_server.log()
    assert max(slots) <= 3


def test_cancel_mid_stream_frees_the_slot_while_others_go_on(batch_server, batch_client):
    want = stream_chat(batch_client, *BATCH_CHATS[2], max_tokens=120)
    other = {}
    t = threading.Thread(target=lambda: other.update(r=stream_chat(batch_client, *BATCH_CHATS[2], max_tokens=120)))
    with httpx.stream("POST", batch_server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "a very long answer"}], "max_tokens": 900,
            "stream": True}) as r:
        it = r.iter_lines()
        for _ in range(4):
            next(it)
        t.start()
        for _ in range(4):
            next(it)
    # The client is gone: its slot frees while the other stream goes on to the same reply as alone.
    t.join(120)
    assert other["r"] == want
    deadline = time.time() + 10
    while metric(batch_server, "q35jit_running_requests") != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(batch_server, "q35jit_running_requests") == 0
    assert "client disconnected" in batch_server.log()
    assert re.search(r"finish cancelled \(slot \d\)", batch_server.log())


def test_max_batch_flag_is_validated():
    import subprocess
    from conftest import BIN, MODEL
    for bad in ["0", "-2", "many", "5000"]:
        r = subprocess.run([str(BIN), "serve", "--model", str(MODEL), "--device", "cpu", "--max-batch", bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "--max-batch" in r.stderr, r.stderr


def test_gpu_flag_is_validated():
    import os
    import subprocess
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1")
    for bad, why in [("5", "shows 2 device(s)"), ("x", "integer"), ("-1", "--gpu")]:
        r = subprocess.run([str(BIN), "serve", "--model", str(MODEL), "--device", "cpu", "--gpu", bad],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode != 0 and "--gpu" in r.stderr and why in r.stderr, r.stderr


def test_load_test_script_reports_throughput_and_percentiles(batch_server):
    import subprocess
    import sys
    script = Path(__file__).resolve().parent / "load_test.py"
    # -S: no site-packages, as on the GPU machine (Python standard library only).
    r = subprocess.run([sys.executable, "-S", str(script), "--url", batch_server.url, "--concurrency", "4",
                        "--duration", "3", "--max-tokens", "12", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["errors"] == 0 and out["requests"] >= 4
    assert out["completion_tokens"] == pytest.approx(12 * out["requests"], rel=0.5)
    assert out["total_tok_s"] > 0
    for key in ["per_stream_tok_s", "ttft_ms", "tbt_ms"]:
        assert 0 < out[key]["p50"] <= out[key]["p95"], key
    # The server counted what the client counted.
    assert out["completion_tokens"] <= metric(batch_server, "q35jit_generation_tokens_total")


def test_load_test_script_sends_long_prompts(batch_server):
    import subprocess
    import sys
    script = Path(__file__).resolve().parent / "load_test.py"
    before = metric(batch_server, "q35jit_prompt_tokens_total")
    r = subprocess.run([sys.executable, "-S", str(script), "--url", batch_server.url, "--concurrency", "2",
                        "--duration", "2", "--max-tokens", "4", "--prompt-tokens", "300", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["errors"] == 0 and out["requests"] >= 2 and out["prompt_tokens"] == 300
    # Each request's prompt holds at least the asked-for tokens' worth of words (the chat template adds more).
    sent = metric(batch_server, "q35jit_prompt_tokens_total") - before
    assert sent >= 250 * out["requests"], (sent, out["requests"])
    bad = subprocess.run([sys.executable, "-S", str(script), "--prompt-tokens", "-1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--prompt-tokens" in bad.stderr


# ------------------------------------------------------------------ serve_bench.py (scripts/gpu_serve.sh's client)

SERVE_BENCH = Path(__file__).resolve().parent / "serve_bench.py"
SHORT = ["--history-tokens", "700", "--message-tokens", "20", "--reply-tokens", "4", "--repeats", "2",
         "--decode-tokens", "24", "--decode-prompt-tokens", "32", "--decode-repeats", "2", "--quiet"]


def serve_bench(*args, timeout=900):
    import subprocess
    import sys
    # -S: no site-packages, as on the GPU machine (Python standard library only).
    return subprocess.run([sys.executable, "-S", str(SERVE_BENCH), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_serve_bench_measures_starts_turn2_and_decode(tmp_path):
    out = tmp_path / "run.json"
    r = serve_bench("--starts", "2", "--cold", "--cache-dir", str(tmp_path / "jit"), *SHORT, "--json", str(out),
                    "--server-log", str(tmp_path / "server.log"), "--",
                    str(BIN), "serve", "--model", str(MODEL), "--device", "cpu", "--port", "0",
                    "--prefix-cache-block", "256")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["problems"] == []
    # (c): two starts, the first with the empty cache folder, each up before its first token.
    assert [s["cold"] for s in res["starts"]] == [True, False]
    for s in res["starts"]:
        assert 0 < s["health_ms"] < s["first_token_ms"] < 120000
        assert s["load_ms_logged"] is not None and s["load_ms_logged"] <= s["health_ms"]
        assert s["tokenizer_ms_logged"] is not None and s["tokenizer_ms_logged"] <= s["load_ms_logged"]
    # (a): the history and the message have the asked token counts (the server's tokenizer), turn 2
    # resumes from the cache at the start of turn 1's reply and prefills only the rest; the new chat
    # prefills everything; the server's counters saw the hits.
    t = res["turn2"]
    assert 700 <= t["history_tokens"] <= 704 and 20 <= t["message_tokens"] <= 22
    hit, miss = t["hit"], t["miss"]
    assert t["cache_hit_every_time"]
    assert t["history_tokens"] - 16 <= hit["cached_tokens"] < t["history_tokens"]
    assert hit["prefilled_tokens"] == hit["prompt_tokens"] - hit["cached_tokens"]
    assert 20 < hit["prefilled_tokens"] < 20 + 4 * 8 + 32
    assert miss["cached_tokens"] == 0 and miss["prefilled_tokens"] == miss["prompt_tokens"] == hit["prompt_tokens"]
    assert hit["cache_hits"] >= 1 and hit["cache_hit_tokens"] == hit["cached_tokens"]
    assert miss["cache_hits"] == 0
    assert 0 < hit["server_ttft_ms"] <= hit["client_ttft_ms"]
    assert 0 < miss["server_ttft_ms"] <= miss["client_ttft_ms"]
    assert hit["server_ttft_ms"] < 0.6 * miss["server_ttft_ms"], (hit, miss)
    # (b): every asked token generated and counted by the server (ignore_eos), rates from both sides.
    d = res["decode"]
    assert d["tokens"] == 24 and d["decode_tokens"] == 24 and 32 <= d["prompt_tokens"] <= 34
    assert d["client_tok_s"] > 0 and d["server_tok_s"] > 0
    assert 0.5 < d["client_tok_s"] / d["server_tok_s"] < 2.0, d
    assert d["mid_context"] == d["prompt_tokens"] + 12
    assert "stopped" in (tmp_path / "server.log").read_text()
    # The summary block of the saved run.
    rep = serve_bench("--report", str(out))
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "prefix cache hit" in rep.stdout and "decode (24 tokens" in rep.stdout and "===== OK" in rep.stdout


def test_serve_bench_fails_when_the_cache_is_not_hit(tmp_path):
    s = Server("--prefix-cache-gb", "0")
    try:
        short = [*SHORT[:SHORT.index("--decode-tokens")], "--decode-tokens", "0", "--warmup", "0", "--quiet"]
        r = serve_bench("--url", s.url, *short, "--json", str(tmp_path / "a.json"))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "not resumed from the prefix cache" in r.stdout
        # Told that there is no cache: the same figures pass, with nothing restored.
        r = serve_bench("--url", s.url, *short, "--no-expect-cache", "--json", str(tmp_path / "b.json"))
        assert r.returncode == 0, r.stdout + r.stderr
        res = json.loads((tmp_path / "b.json").read_text())
        assert res["turn2"]["hit"]["cached_tokens"] == 0 and "no prefix cache" in r.stdout
    finally:
        s.stop()


# ------------------------------------------------------------------ prefix cache memory, idle prefill (issue 10)

def serve_fails(*flags):
    import subprocess
    r = subprocess.run([str(BIN), "serve", "--model", str(MODEL), "--device", "cpu", "--port", "0", *flags],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stderr
    return r.stderr


def test_prefix_cache_budget_flags_are_validated():
    for bad in ["-1", "nan", "inf"]:
        assert "--prefix-cache-gb must be a number of GiB >= 0" in serve_fails("--prefix-cache-gb", bad)
        assert "--prefix-cache-gpu-gb must be a number of GiB >= 0" in serve_fails("--prefix-cache-gpu-gb", bad)
    assert "--prefix-cache-gb expects a number, got 'lots'" in serve_fails("--prefix-cache-gb", "lots")
    err = serve_fails("--prefix-cache-gb", "1000000")
    assert "--prefix-cache-gb 1000000 is more than this machine's" in err and "GiB of memory" in err
    err = serve_fails("--prefix-cache-gpu-gb", "1")
    assert "--prefix-cache-gpu-gb applies to --device cuda" in err and "--prefix-cache-gb" in err
    assert "--prefix-cache-block" in serve_fails("--prefix-cache-block", "-1")
    assert "--idle-prefill-chunk" in serve_fails("--idle-prefill-chunk", "0")
    for flag in ("--prefix-cache-gpu-gb", "--prefix-cache-gb", "--idle-prefill-chunk"):
        import subprocess
        h = subprocess.run([str(BIN), "serve", "--help"], capture_output=True, text=True, timeout=30).stdout
        assert flag in h
    assert "half the GPU memory free" in h


def test_prefix_cache_metrics_count_hits_misses_and_bytes():
    # The CPU engine's one tier: 0.05 GiB of host memory; no device tier. --prefix-cache-gpu-gb 0 is accepted.
    s = Server("--prefix-cache-gb", "0.05", "--prefix-cache-gpu-gb", "0", "--max-batch", "2")
    try:
        assert any("prefix cache: 0.05 GiB of host memory" in line for line in s.lines), s.log()
        msgs = [{"role": "system", "content": "cache me " * 120}, {"role": "user", "content": "hello"}]
        body = {"messages": msgs, "max_tokens": 3, "temperature": 0, "enable_thinking": False}
        m0 = httpx.get(s.url + "/metrics", timeout=10).text

        def value(text, name):
            m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
            assert m, f"{name} not in /metrics:\n{text}"
            return float(m.group(1))

        r1 = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert r1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        r2 = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).json()
        cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0
        time.sleep(0.2)
        m1 = httpx.get(s.url + "/metrics", timeout=10).text
        d = lambda name: value(m1, name) - value(m0, name)  # noqa: E731
        assert d("q35jit_prefix_cache_queries_total") == 2
        assert d("q35jit_prefix_cache_misses_total") == 1 and d("q35jit_prefix_cache_hits_total") == 1
        assert d("q35jit_prefix_cache_hit_tokens_total") == cached
        assert value(m1, 'q35jit_prefix_cache_capacity_bytes{tier="host"}') == int(0.05 * 2 ** 30)
        assert value(m1, 'q35jit_prefix_cache_capacity_bytes{tier="device"}') == 0
        held = value(m1, "q35jit_prefix_cache_bytes")
        assert held > 0 and value(m1, 'q35jit_prefix_cache_tier_bytes{tier="host"}') == held
        assert value(m1, 'q35jit_prefix_cache_tier_bytes{tier="device"}') == 0
        assert d('q35jit_prefix_cache_saved_bytes_total{tier="host"}') >= held
        assert d('q35jit_prefix_cache_restored_bytes_total{tier="host"}') > 0
        assert d('q35jit_prefix_cache_restored_bytes_total{tier="device"}') == 0
        assert value(m1, "q35jit_prefix_cache_entries") >= 1
    finally:
        s.stop()
    assert s.proc.returncode == 0, s.log()


def test_idle_prefill_runs_in_large_pieces_and_snapshots_only_at_the_turn_start():
    # --prefill-chunk 16 bounds the prefill only while other sequences decode; alone, a prompt runs in
    # pieces of --idle-prefill-chunk, cut at the start of its last turn (the one snapshot point).
    msgs = [{"role": "system", "content": "idle " * 150}, {"role": "user", "content": "a question"}]
    body = {"messages": msgs, "max_tokens": 2, "temperature": 0, "enable_thinking": False}
    calls = {}
    for name, flags in [("idle", ("--idle-prefill-chunk", "4096")), ("bounded", ())]:
        s = Server("--prefill-chunk", "16", *flags)
        try:
            r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).json()
            n = r["usage"]["prompt_tokens"]
            time.sleep(0.2)
            line = [l for l in s.lines if r["id"] in l]
            m = re.search(r"prompt (\d+) tokens \(0 cached, (\d+) prefill calls\)", line[0]) if line else None
            assert m and int(m.group(1)) == n, s.log()
            calls[name] = int(m.group(2))
            # The next turn resumes at that snapshot (the last <|im_start|> of the prompt).
            ids = tokenize(s, {"messages": msgs, "enable_thinking": False})["tokens"]
            im_start = tokenize(s, {"prompt": "<|im_start|>"})["tokens"][0]
            turn2 = msgs + [{"role": "assistant", "content": r["choices"][0]["message"]["content"]},
                            {"role": "user", "content": "more"}]
            r2 = httpx.post(s.url + "/v1/chat/completions", json=dict(body, messages=turn2), timeout=60).json()
            assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == len(ids) - 1 - ids[::-1].index(im_start)
        finally:
            s.stop()
    assert n > 150
    assert calls["idle"] == 2, calls            # up to the turn start, then the rest
    assert calls["bounded"] >= n // 16, calls    # pieces of 16 (the CPU engine's default)
