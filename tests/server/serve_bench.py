#!/usr/bin/env python3
"""Serving figures of `q35jit serve`, measured by a client (Python standard library only: http.client,
SSE parsing by hand; runs where nothing can be installed).

  (c) start    process start -> /health ok -> first streamed token, per server start: with --cold
               the first start gets an empty Q35JIT_CACHE_DIR (every kernel through NVRTC) and the
               later ones reuse it (warm kernel cache); needs the server command after `--`
  (a) turn 2   time to first token of the second turn of a chat: a --history-token first turn (its
               reply --reply-tokens long), then the same chat + a --message-token user message.
               "hit": turn 2 resumes from the prefix cache; "miss": the same turn 2 in a chat the
               server has never seen (a full prefill). The server's cached_tokens, the tokens it
               prefilled and its own TTFT (from /metrics) are reported beside the client's
  (b) decode   one streaming chat of --decode-tokens tokens (temperature 0, ignore_eos) after a
               --decode-prompt-token prompt: (tokens - 1) / (last token - first token), the server's
               own tok/s (/metrics inter-token latency) and the gaps between streamed chunks (p50 /
               p95); with --bench-json, against `q35jit bench` at the same context
Every figure is the median of --repeats. TTFT is request sent -> first SSE chunk carrying text.

  serve_bench.py --url http://127.0.0.1:8080                 (a) and (b) against a running server
  serve_bench.py --starts 3 --cold -- q35jit serve --synthetic 35b-a3b --tokenizer DIR --port 0
                 starts the server 3 times (the command must print the "serving ... on http://H:P"
                 line, as `serve --port 0` does), (c) each time, (a) and (b) on the last; stops it
                 with SIGTERM and checks it exits 0
  serve_bench.py --report run1.json run2.json ... [--bench-json bench.json]   the summary block

--json FILE writes every figure; exit status 1 when a request failed, the prefix cache was not hit
by turn 2, the server counted other token totals than the client, or the server did not stop cleanly.
"""
import argparse
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_test import percentile, sse_events  # noqa: E402  (beside this file, in tests/server and in dist/)

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact water room mother area money story month lot right study "
         "book job word business issue side kind head house service friend father power hour game line end member "
         "law car city community name president team minute idea kid body information back parent face others "
         "level office door health art war history party result change morning reason research girl guy moment "
         "air teacher force education river garden music bridge forest window paper light ocean stone market "
         "table letter winter summer bread cloud train island").split()


def median(v):
    s = sorted(v)
    if not s:
        return None
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class BenchError(Exception):
    pass


class Client:
    """Requests to one server; SSE streams read line by line as they arrive."""

    def __init__(self, url, timeout=120.0, api_key=""):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, method, path, body=None, timeout=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=self.headers)
            r = conn.getresponse()
            return r.status, r.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def post_json(self, path, body):
        status, text = self.request("POST", path, body)
        if status != 200:
            raise BenchError(f"POST {path}: HTTP {status}: {text[:300]}")
        return json.loads(text)

    def metrics(self):
        status, text = self.request("GET", "/metrics")
        if status != 200:
            raise BenchError(f"GET /metrics: HTTP {status}")
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*(?:\{[^}]*\})?) (\S+)$", line)  # with labels: name{k="v"}
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def stream(self, path, body):
        """One streaming request. Returns a dict: t_sent, t_first (first chunk with text), times (every
        chunk with text), t_end (finish_reason chunk), usage, text, finish_reason."""
        body = dict(body, stream=True, stream_options={"include_usage": True})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            data = json.dumps(body)
            t_sent = time.perf_counter()
            conn.request("POST", path, body=data, headers=self.headers)
            r = conn.getresponse()
            if r.status != 200:
                raise BenchError(f"POST {path}: HTTP {r.status}: {r.read()[:300].decode('utf-8', 'replace')}")
            res = {"t_sent": t_sent, "t_first": None, "times": [], "t_end": None, "usage": None, "text": "",
                   "finish_reason": None}
            for now, event in sse_events(r):
                if "error" in event:
                    raise BenchError(f"POST {path}: error in the stream: {json.dumps(event['error'])[:300]}")
                if event.get("usage"):
                    res["usage"] = event["usage"]
                for choice in event.get("choices", []):
                    piece = choice.get("text")
                    if piece is None:
                        d = choice.get("delta", {})
                        piece = (d.get("content") or "") + (d.get("reasoning_content") or "")
                        if d.get("tool_calls"):
                            piece += json.dumps(d["tool_calls"])
                    if piece:
                        res["text"] += piece
                        res["times"].append(now)
                        if res["t_first"] is None:
                            res["t_first"] = now
                    if choice.get("finish_reason"):
                        res["finish_reason"] = choice["finish_reason"]
                        res["t_end"] = now
            if res["usage"] is None:
                raise BenchError(f"POST {path}: the stream ended without usage")
            return res
        finally:
            conn.close()


def chat_body(messages, max_tokens, ignore_eos=True):
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos,
            "chat_template_kwargs": {"enable_thinking": False}}


def filler(n_words, rng):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


class Words:
    """An endless reproducible stream of common English words: text(w) is its first w words."""

    def __init__(self, seed, prefix=""):
        self.rng, self.words, self.prefix = random.Random(seed), [], prefix

    def text(self, w):
        while len(self.words) < w:
            self.words.append(self.rng.choice(WORDS))
        return self.prefix + " ".join(self.words[:w])


def fit_tokens(count, target, make, start_words):
    """The smallest word count w (searching from start_words) with count(make(w)) >= target, and its text;
    count() asks the server's /tokenize, so the counts hold for whatever tokenizer the server has."""
    w = max(1, start_words)
    n = count(make(w))
    # Proportional steps while far, then word by word.
    for _ in range(8):
        if abs(n - target) <= 3:
            break
        w = max(1, int(round(w * target / max(n, 1))))
        n = count(make(w))
    for _ in range(64):
        if n <= target or w == 1:
            break
        w -= 1
        n = count(make(w))
    for _ in range(64):
        if n >= target:
            break
        w += 1
        n = count(make(w))
    return make(w), n


class Conversation:
    """Texts of the turn-2 figure, fitted to the token counts with the server's tokenizer."""

    def __init__(self, client, history_tokens, message_tokens, seed=7):
        self.client = client
        history, message = Words(seed), Words(seed + 1, "And now: ")

        def chat_count(text):  # the whole turn-1 prompt (system, user, the template's tokens)
            return self.client.post_json("/tokenize", chat_body(self.turn1_messages("0" * 8, text), 1))["count"]

        def text_count(text):
            return self.client.post_json("/tokenize", {"prompt": text})["count"]

        self.history, self.history_tokens = fit_tokens(chat_count, history_tokens, history.text, history_tokens)
        self.message, self.message_tokens = fit_tokens(text_count, message_tokens, message.text, message_tokens)

    @staticmethod
    def turn1_messages(nonce, history):
        return [{"role": "system", "content": f"You are a helpful assistant. Session {nonce}."},
                {"role": "user", "content": history}]

    def turn1(self, nonce):
        return self.turn1_messages(nonce, self.history)

    def turn2(self, nonce, reply):
        return self.turn1(nonce) + [{"role": "assistant", "content": reply}, {"role": "user", "content": self.message}]


def metric_delta(before, after, name):
    return after.get(name, 0.0) - before.get(name, 0.0)


def measure_turn2(client, conv, repeats, reply_tokens, expect_cache, problems, log):
    """(a): per repeat, a new chat (nonce): turn 1, then turn 2 (cache hit), then turn 2 of another new chat
    whose turn 1 never ran (miss)."""
    rows = {"hit": [], "miss": []}
    rng = random.Random()
    for rep in range(repeats):
        nonce = f"{rng.randrange(10 ** 8):08d}"  # digits: one token each, so every chat has the fitted length
        t1 = client.stream("/v1/chat/completions", chat_body(conv.turn1(nonce), reply_tokens))
        reply = t1["text"]
        for kind in ("hit", "miss"):
            n = nonce if kind == "hit" else f"{rng.randrange(10 ** 8):08d}"
            m0 = client.metrics()
            r = client.stream("/v1/chat/completions", chat_body(conv.turn2(n, reply), 2))
            m1 = client.metrics()
            u = r["usage"]
            cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
            row = {"client_ttft_ms": (r["t_first"] - r["t_sent"]) * 1e3 if r["t_first"] else None,
                   "server_ttft_ms": metric_delta(m0, m1, "q35jit_time_to_first_token_seconds_sum") * 1e3,
                   "prompt_tokens": u["prompt_tokens"], "cached_tokens": cached,
                   "prefilled_tokens": u["prompt_tokens"] - cached,
                   "cache_hits": metric_delta(m0, m1, "q35jit_prefix_cache_hits_total"),
                   "cache_hit_tokens": metric_delta(m0, m1, "q35jit_prefix_cache_hit_tokens_total"),
                   # the restore's bytes by the tier they came from (GPU memory, host memory)
                   "restored_mb_device": metric_delta(
                       m0, m1, 'q35jit_prefix_cache_restored_bytes_total{tier="device"}') / 1e6,
                   "restored_mb_host": metric_delta(m0, m1, 'q35jit_prefix_cache_restored_bytes_total{tier="host"}') / 1e6}
            rows[kind].append(row)
            log(f"turn 2 ({kind}) rep {rep + 1}: client TTFT {fmt(row['client_ttft_ms'])} ms, server "
                f"{fmt(row['server_ttft_ms'])} ms, prompt {row['prompt_tokens']} tokens, {cached} cached")
    hit_ok = all(r["cached_tokens"] > 0 and r["cache_hits"] >= 1 and r["cache_hit_tokens"] >= r["cached_tokens"]
                 for r in rows["hit"])
    for r in rows["miss"]:
        if r["cached_tokens"] > conv.history_tokens // 4:
            problems.append(f"turn 2 of a new chat restored {r['cached_tokens']} tokens from the cache")
    out = {"history_tokens": conv.history_tokens, "message_tokens": conv.message_tokens, "repeats": repeats,
           "reply_tokens": reply_tokens, "cache_hit_every_time": hit_ok, "expect_cache": expect_cache}
    for kind, rs in rows.items():
        out[kind] = {k: median([r[k] for r in rs if r[k] is not None]) for k in rs[0]} if rs else None
        if out[kind]:
            out[kind]["client_ttft_ms_all"] = [r["client_ttft_ms"] for r in rs]
    return out


def measure_decode(client, prompt_tokens, tokens, repeats, problems, log, salt=0):
    """(b): streaming greedy decode of `tokens` tokens (ignore_eos) after a `prompt_tokens` prompt."""
    rng = random.Random(11 + salt)
    nonce = "0 000000 "  # the form of the per-repeat first words below

    def count(text):
        return client.post_json("/tokenize", chat_body([{"role": "user", "content": nonce + text}], 1))["count"]

    text, n_prompt = fit_tokens(count, prompt_tokens, Words(13).text, prompt_tokens)
    rows = []
    for rep in range(repeats):
        # A new first word each time, so no repeat resumes from the cache.
        content = f"{rep % 10} {rng.randrange(10 ** 6):06d} " + text
        m0 = client.metrics()
        r = client.stream("/v1/chat/completions", chat_body([{"role": "user", "content": content}], tokens))
        m1 = client.metrics()
        n = r["usage"]["completion_tokens"]
        if n != tokens:
            problems.append(f"decode: {n} tokens generated, {tokens} asked (ignore_eos)")
        server_tokens = metric_delta(m0, m1, "q35jit_generation_tokens_total")
        if server_tokens != n:
            problems.append(f"decode: the server counted {server_tokens:.0f} generated tokens, the usage {n}")
        gaps = [(b - a) * 1e3 for a, b in zip(r["times"], r["times"][1:])]
        span = (r["t_end"] or r["times"][-1]) - r["t_first"] if r["t_first"] else 0
        itl_sum = metric_delta(m0, m1, "q35jit_inter_token_latency_seconds_sum")
        itl_n = metric_delta(m0, m1, "q35jit_inter_token_latency_seconds_count")
        row = {"client_tok_s": (n - 1) / span if span > 0 and n > 1 else None,
               "server_tok_s": itl_n / itl_sum if itl_sum > 0 else None,
               "chunks": len(r["times"]), "gap_p50_ms": percentile(gaps, 50) if gaps else None,
               "gap_p95_ms": percentile(gaps, 95) if gaps else None,
               "ttft_ms": (r["t_first"] - r["t_sent"]) * 1e3 if r["t_first"] else None, "tokens": n}
        rows.append(row)
        log(f"decode rep {rep + 1}: {n} tokens, client {fmt(row['client_tok_s'])} tok/s, server "
            f"{fmt(row['server_tok_s'])} tok/s, {row['chunks']} chunks, gap p50 {fmt(row['gap_p50_ms'], 3)} / p95 "
            f"{fmt(row['gap_p95_ms'], 3)} ms")
    out = {k: median([r[k] for r in rows if r[k] is not None]) for k in rows[0]}
    out.update(prompt_tokens=n_prompt, decode_tokens=tokens, repeats=repeats,
               mid_context=n_prompt + tokens // 2, client_tok_s_all=[r["client_tok_s"] for r in rows])
    return out


def fmt(v, digits=1):
    return "n/a" if v is None else f"{v:.{digits}f}"


class ServerProcess:
    """The server command, started now; its stderr collected; the URL from its 'serving ... on' line."""

    def __init__(self, cmd, env, log, start_timeout):
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.lines, self.url, self.t_serving = [], None, None
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"serving .* on (http://\S+:\d+)", line)
                if m and not self.url:
                    self.t_serving = time.perf_counter()
                    self.url = m.group(1).replace("://0.0.0.0:", "://127.0.0.1:")
                    ready.set()
            ready.set()

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()
        if not ready.wait(start_timeout) or not self.url:
            self.stop()
            raise BenchError("the server did not start:\n" + "\n".join(self.lines[-20:]))

    def stop(self, timeout=60):
        """SIGTERM, then the exit status (SIGKILL after `timeout` s: None)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.thread.join(5)
                return None
        self.thread.join(5)
        return self.proc.returncode


def first_token_after_start(server, client, log):
    """(c): /health polled from the 'serving' line, then one short streaming chat."""
    deadline = time.perf_counter() + 60
    while True:
        try:
            status, _ = client.request("GET", "/health", timeout=5)
            if status == 200:
                break
        except OSError:
            pass
        if time.perf_counter() > deadline:
            raise BenchError("/health did not answer 200 within 60 s of the serving line")
        time.sleep(0.002)
    t_health = time.perf_counter()
    r = client.stream("/v1/chat/completions", chat_body([{"role": "user", "content": "Hello, who are you?"}], 4))
    if r["t_first"] is None:
        raise BenchError("the first request streamed no text")
    loaded = next((m for line in server.lines
                   for m in [re.search(r"loaded .*? in (\d+) ms(?: \(tokenizer (\d+) ms)?", line)] if m), None)
    load = float(loaded.group(1)) if loaded else None
    tokenizer = float(loaded.group(2)) if loaded and loaded.group(2) else None
    out = {"health_ms": (t_health - server.t_spawn) * 1e3, "first_token_ms": (r["t_first"] - server.t_spawn) * 1e3,
           "first_request_ttft_ms": (r["t_first"] - r["t_sent"]) * 1e3, "load_ms_logged": load,
           "tokenizer_ms_logged": tokenizer}
    log(f"start: /health ok after {out['health_ms']:.0f} ms, first token after {out['first_token_ms']:.0f} ms "
        f"(that request's TTFT {out['first_request_ttft_ms']:.1f} ms; the server logged its load as {fmt(load, 0)} ms)")
    return out


def run_measurements(client, a, problems, log):
    """(a) and (b); a failure in one is a problem and the other still runs."""
    out = {}
    if a.history_tokens > 0 and a.repeats > 0:
        try:
            conv = Conversation(client, a.history_tokens, a.message_tokens)
            log(f"turn 2: history {conv.history_tokens} tokens, new message {conv.message_tokens} tokens")
            if a.warmup > 0:
                measure_turn2(client, conv, a.warmup, a.reply_tokens, a.expect_cache, [], lambda m: log("warm-up " + m))
            out["turn2"] = measure_turn2(client, conv, a.repeats, a.reply_tokens, a.expect_cache, problems, log)
            if a.expect_cache and not out["turn2"]["cache_hit_every_time"]:
                problems.append("turn 2 was not resumed from the prefix cache every time (cached_tokens / "
                                "q35jit_prefix_cache_hits_total)")
            if not a.expect_cache and out["turn2"]["hit"]["cached_tokens"]:
                problems.append("the prefix cache restored tokens although --no-expect-cache was given")
        except Exception as e:  # noqa: BLE001
            problems.append(f"turn 2: {type(e).__name__}: {e}")
    if a.decode_tokens > 0 and a.decode_repeats > 0:
        try:
            if a.warmup > 0:
                measure_decode(client, a.decode_prompt_tokens, min(a.decode_tokens, 16), a.warmup, [],
                               lambda m: log("warm-up " + m), salt=1)
            out["decode"] = measure_decode(client, a.decode_prompt_tokens, a.decode_tokens, a.decode_repeats, problems,
                                           log)
        except Exception as e:  # noqa: BLE001
            problems.append(f"decode: {type(e).__name__}: {e}")
    return out


def bench_decode(path, context):
    """`q35jit bench --json` decode figures at `context` (the first config set's)."""
    with open(path) as f:
        b = json.load(f)
    for name, s in b.get("configs", {}).items():
        for d in s.get("decode", []):
            if d["context"] == context:
                return {"set": name, "context": context, "ms_per_token": d["ms_per_token"],
                        "ms_per_token_host_loop": d.get("ms_per_token_host_loop"), "tok_s": d["tok_s"],
                        "device": b.get("device", {}).get("name")}
    return None


def report(runs, bench_json=None):
    """The summary block of several runs' JSON (as --json writes them)."""
    lines = ["===== q35jit serve: figures"]
    for r in runs:
        lines.append(f"-- run '{r.get('label', '?')}': {r.get('server', r.get('url', ''))}")
        for i, s in enumerate(r.get("starts", [])):
            kind = "cold" if s.get("cold") else "warm"
            lines.append(f"   start {i + 1} ({kind} kernel cache): /health {s['health_ms']:.0f} ms, first token "
                         f"{s['first_token_ms']:.0f} ms after process start (load logged {fmt(s['load_ms_logged'], 0)} ms, "
                         f"of which tokenizer {fmt(s.get('tokenizer_ms_logged'), 0)} ms)")
        if len(r.get("starts", [])) > 1:
            warm = [s["first_token_ms"] for s in r["starts"] if not s.get("cold")]
            if warm:
                lines.append(f"   warm starts, median: first token {median(warm):.0f} ms after process start")
        t = r.get("turn2")
        if t:
            lines.append(f"   turn 2 TTFT (history {t['history_tokens']} tokens, message {t['message_tokens']}, "
                         f"median of {t['repeats']}):")
            for kind in ("hit", "miss"):
                k = t.get(kind)
                if k:
                    if not t.get("expect_cache", True):
                        what = "no prefix cache  " if kind == "hit" else "no cache, again  "
                    else:
                        what = "prefix cache hit " if kind == "hit" else "new chat (miss) "
                    restored = ""
                    if k.get("restored_mb_device") or k.get("restored_mb_host"):
                        restored = (f"; restored {k.get('restored_mb_device', 0):.1f} MB from GPU memory, "
                                    f"{k.get('restored_mb_host', 0):.1f} MB from host memory")
                    lines.append(f"     {what}: client {fmt(k['client_ttft_ms'])} ms, server {fmt(k['server_ttft_ms'])} ms; "
                                 f"prompt {k['prompt_tokens']:.0f}, cached {k['cached_tokens']:.0f}, prefilled "
                                 f"{k['prefilled_tokens']:.0f} tokens{restored}")
        d = r.get("decode")
        if d:
            lines.append(f"   decode ({d['decode_tokens']} tokens after a {d['prompt_tokens']}-token prompt, median of "
                         f"{d['repeats']}): client {fmt(d['client_tok_s'])} tok/s, server {fmt(d['server_tok_s'])} tok/s; "
                         f"chunk gaps p50 {fmt(d['gap_p50_ms'], 3)} ms, p95 {fmt(d['gap_p95_ms'], 3)} ms")
            if bench_json:
                b = bench_decode(bench_json, d["mid_context"])
                if b and d["client_tok_s"]:
                    srv_ms = 1000.0 / d["client_tok_s"]
                    lines.append(f"     q35jit bench at context {b['context']} ({b['set']}): {b['ms_per_token']:.3f} ms/token "
                                 f"chained = {b['tok_s']:.1f} tok/s; host loop {fmt(b['ms_per_token_host_loop'], 3)} ms")
                    lines.append(f"     server / bench: {srv_ms:.3f} / {b['ms_per_token']:.3f} ms per token = "
                                 f"{100.0 * (srv_ms / b['ms_per_token'] - 1):+.1f}% (target within 3%)"
                                 + (f"; vs the host loop {100.0 * (srv_ms / b['ms_per_token_host_loop'] - 1):+.1f}%"
                                    if b['ms_per_token_host_loop'] else ""))
                elif not b:
                    lines.append(f"     (no bench decode figure at context {d['mid_context']} in {bench_json})")
        for p in r.get("problems", []):
            lines.append(f"   PROBLEM: {p}")
        if r.get("problems") and r.get("server_log_tail"):
            lines.append("   the server's last lines:")
            lines.extend(f"     {line}" for line in r["server_log_tail"])
    bad = sum(len(r.get("problems", [])) for r in runs)
    lines.append(f"===== {'OK' if bad == 0 else f'{bad} problem(s)'}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (no /v1); else the command after -- is started")
    ap.add_argument("--starts", type=int, default=1, help="server starts measured, (a) and (b) on the last (default 1)")
    ap.add_argument("--cold", action="store_true",
                    help="the first start with an empty kernel cache (--cache-dir, or a new folder under /tmp removed at "
                         "the end), the later starts reuse it (warm)")
    ap.add_argument("--cache-dir", help="Q35JIT_CACHE_DIR for the server (with --cold: must be empty or absent)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed turn-2 and decode rounds before the timed ones (kernels of new sizes; default 1)")
    ap.add_argument("--server-log", help="write the last server's stderr to this file")
    ap.add_argument("--history-tokens", type=int, default=4000, help="turn 1 prompt tokens (default 4000; 0: skip (a))")
    ap.add_argument("--message-tokens", type=int, default=50, help="turn 2's new user message tokens (default 50)")
    ap.add_argument("--reply-tokens", type=int, default=8, help="turn 1's reply tokens (default 8)")
    ap.add_argument("--repeats", type=int, default=5, help="turn-2 repetitions (default 5)")
    ap.add_argument("--no-expect-cache", dest="expect_cache", action="store_false",
                    help="the server runs without a prefix cache (--prefix-cache-gb 0 --prefix-cache-gpu-gb 0): no hit "
                         "expected")
    ap.add_argument("--decode-tokens", type=int, default=512, help="tokens of the decode stream (default 512; 0: skip (b))")
    ap.add_argument("--decode-prompt-tokens", type=int, default=128, help="its prompt (default 128)")
    ap.add_argument("--decode-repeats", type=int, default=3, help="decode streams (default 3)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the server to start (default 300)")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--label", default="", help="name of this run in the report")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--report", nargs="+", metavar="RUN_JSON", help="print the summary block of these runs and exit")
    ap.add_argument("--bench-json", help="`q35jit bench --json` output: decode compared at the same context")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the server command (with --port 0)")
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd

    if a.report:
        runs = []
        for p in a.report:
            try:
                with open(p) as f:
                    runs.append(json.load(f))
            except (OSError, ValueError) as e:
                runs.append({"label": p, "problems": [f"no figures: {e}"]})
        print(report(runs, a.bench_json))
        return 0 if all(not r.get("problems") for r in runs) else 1
    if bool(a.url) == bool(cmd):
        ap.error("give --url URL or the server command after --")

    def log(msg):
        if not a.quiet:
            print(f"[serve_bench] {msg}", file=sys.stderr, flush=True)

    def interrupted(signum, frame):
        raise KeyboardInterrupt  # SIGTERM (e.g. from `timeout`): stop the server on the way out

    signal.signal(signal.SIGTERM, interrupted)
    problems = []
    result = {"label": a.label or ("url" if a.url else "serve"), "problems": problems}
    try:
        if a.url:
            result["url"] = a.url
            client = Client(a.url, a.timeout, a.api_key)
            result.update(run_measurements(client, a, problems, log))
        else:
            result["server"] = " ".join(cmd)
            env = dict(os.environ)
            cache = None
            if a.cache_dir:
                if a.cold and os.path.isdir(a.cache_dir) and os.listdir(a.cache_dir):
                    raise BenchError(f"--cold: --cache-dir {a.cache_dir} is not empty")
                os.makedirs(a.cache_dir, exist_ok=True)
                env["Q35JIT_CACHE_DIR"] = a.cache_dir
            elif a.cold:
                cache = tempfile.mkdtemp(prefix="q35-serve-cold-")
                env["Q35JIT_CACHE_DIR"] = cache
            result["cache_dir"] = env.get("Q35JIT_CACHE_DIR", "(default)")
            result["starts"] = []
            for i in range(max(1, a.starts)):
                server = ServerProcess(cmd, env, log, a.start_timeout)
                try:
                    client = Client(server.url, a.timeout, a.api_key)
                    s = first_token_after_start(server, client, log)
                    s["cold"] = a.cold and i == 0
                    result["starts"].append(s)
                    if i == max(1, a.starts) - 1:
                        result.update(run_measurements(client, a, problems, log))
                finally:
                    rc = server.stop()
                    result["server_log_tail"] = server.lines[-8:]
                    if a.server_log:
                        with open(a.server_log, "w") as f:
                            f.write("\n".join(server.lines) + "\n")
                    if rc != 0:
                        problems.append(f"the server exited with {rc} after SIGTERM (0 expected)")
                    elif not any(l.endswith("stopped") for l in server.lines):
                        problems.append("the server exited without its 'stopped' line")
            if cache:
                import shutil
                shutil.rmtree(cache, ignore_errors=True)
    except KeyboardInterrupt:
        problems.append("interrupted (SIGINT / SIGTERM) before the end")
    except Exception as e:  # noqa: BLE001 -- every failure is reported in the JSON and the summary
        problems.append(f"{type(e).__name__}: {e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    print(report([result], a.bench_json))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
