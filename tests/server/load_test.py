#!/usr/bin/env python3
"""Load test for `q35jit serve`: N concurrent streaming chats for a bounded time against a server URL.

Each of --concurrency workers sends one streaming chat after another until --duration seconds have
passed (a request under way then finishes). Reports, over the completed requests:
  total tok/s       completion tokens of all requests / wall time
  per-stream tok/s  each request's (completion tokens - 1) / (last chunk - first chunk), p50 / p95
  TTFT              request sent -> first chunk with text, p50 / p95
  TBT               time between consecutive text chunks of a stream, p50 / p95
Token counts come from the server's usage (stream_options.include_usage). With --prompt-tokens N
each prompt is about N tokens long (distinct from its first words on, so no prefix cache serves it):
new long prompts then keep arriving while the other streams decode. Prints a table, or one
JSON object with --json. Python standard library only (http.client): runs where nothing can be installed.

  python3 tests/server/load_test.py --url http://127.0.0.1:8080 --concurrency 16 --duration 60
"""
import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse


def percentile(values, p):
    """Nearest-rank percentile (p in [0, 100]) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def sse_events(response):
    """The JSON events of an OpenAI-style SSE stream (http.client response), each with the
    time.perf_counter() of its arrival, as they arrive, up to `data: [DONE]` or the end."""
    while True:
        raw = response.readline()
        if not raw:
            return
        now = time.perf_counter()
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield now, json.loads(line[6:])


def one_chat(url, model, prompt, max_tokens, seed, headers, timeout):
    """One streaming chat (http.client, the SSE lines read as they arrive). Returns (completion_tokens,
    ttft_s, [chunk times], error or None)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json", **headers})
        r = conn.getresponse()
        if r.status != 200:
            return 0, None, [], f"HTTP {r.status}: {r.read()[:200].decode('utf-8', 'replace')}"
        times, tokens = [], 0
        for now, event in sse_events(r):
            if "error" in event:
                return 0, None, [], f"error in the stream: {json.dumps(event['error'])[:200]}"
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                    times.append(now)
        return tokens, (times[0] - t0) if times else None, times, None
    finally:
        conn.close()


def make_prompt(w, n, prompt_tokens):
    """Request n of worker w: a short question, or with prompt_tokens > 0 about that many tokens (one
    short word and a space are about one token of the Qwen vocabulary) that differ from the first words on."""
    head = f"Stream {w}, request {n}: tell me a story about the number {w * 1000 + n}."
    if prompt_tokens <= 0:
        return head
    words = ["apple", "river", "stone", "cloud", "green", "light", "music", "table", "paper", "field"]
    filler = " ".join(words[(i * 7 + w * 3 + n) % len(words)] for i in range(max(0, prompt_tokens - 24)))
    return f"{head} Context: {filler}"


def run(url, concurrency, duration, max_tokens, model="", api_key="", prompt_tokens=0):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results, errors, lock = [], [], threading.Lock()
    start = time.perf_counter()
    deadline = start + duration

    def worker(w):
        n = 0
        while time.perf_counter() < deadline:
            prompt = make_prompt(w, n, prompt_tokens)
            try:
                res = one_chat(url, model, prompt, max_tokens, w * 1000 + n, headers, max(60.0, duration * 4))
            except (OSError, http.client.HTTPException, ValueError) as e:
                res = (0, None, [], repr(e))
            with lock:
                (errors if res[3] else results).append(res[3] or res)
            n += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    ttft = [r[1] for r in results if r[1] is not None]
    tbt = [b - a for r in results for a, b in zip(r[2], r[2][1:])]
    stream_tps = [(r[0] - 1) / (r[2][-1] - r[2][0]) for r in results if r[0] > 1 and len(r[2]) > 1 and r[2][-1] > r[2][0]]

    def pcts(values, scale=1.0):
        return {"p50": percentile(values, 50) * scale, "p95": percentile(values, 95) * scale} if values else None

    return {"url": url, "concurrency": concurrency, "duration_s": duration, "wall_s": wall, "prompt_tokens": prompt_tokens,
            "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "completion_tokens": tokens, "total_tok_s": tokens / wall if wall > 0 else 0.0,
            "per_stream_tok_s": pcts(stream_tps), "ttft_ms": pcts(ttft, 1000.0), "tbt_ms": pcts(tbt, 1000.0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL (no /v1)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent chats (default 8)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds to keep starting requests (default 30)")
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each chat (default 128)")
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="about this many prompt tokens per request (default 0: a one-line question)")
    ap.add_argument("--model", default="", help="model name to send (default: none, the server's)")
    ap.add_argument("--api-key", default="", help="bearer token, if the server wants one")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    if a.concurrency < 1 or a.duration <= 0 or a.max_tokens < 1 or a.prompt_tokens < 0:
        ap.error("--concurrency and --max-tokens must be >= 1, --prompt-tokens >= 0 and --duration > 0")
    r = run(a.url, a.concurrency, a.duration, a.max_tokens, a.model, a.api_key, a.prompt_tokens)
    if a.json:
        print(json.dumps(r))
    else:
        def fmt(p, unit):
            return f"p50 {p['p50']:.1f} {unit}, p95 {p['p95']:.1f} {unit}" if p else "n/a"
        print(f"{r['requests']} requests ({r['errors']} errors) in {r['wall_s']:.1f} s, {r['concurrency']} streams")
        print(f"total            {r['total_tok_s']:.1f} tok/s ({r['completion_tokens']} completion tokens)")
        print(f"per stream       {fmt(r['per_stream_tok_s'], 'tok/s')}")
        print(f"TTFT             {fmt(r['ttft_ms'], 'ms')}")
        print(f"between tokens   {fmt(r['tbt_ms'], 'ms')}")
        if r["first_error"]:
            print(f"first error: {r['first_error']}", file=sys.stderr)
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
