"""Fixtures for the `q35jit serve` end-to-end tests: real server processes on 127.0.0.1 (tiny model,
--device cpu), the official `openai` client, and jinja2 rendering of the Qwen3.5 chat template."""
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

SOURCE = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("Q35JIT_BIN", SOURCE / "build" / "q35jit"))
MODEL = SOURCE / "tests" / "fixtures" / "tiny-qwen35moe"
TEMPLATE = SOURCE / "tests" / "fixtures" / "qwen35-chat-template" / "chat_template.jinja"
NAME = "tiny-qwen35moe"


class Server:
    """One `q35jit serve` process; stderr is collected line by line."""

    def __init__(self, *flags):
        cmd = [str(BIN), "serve", "--model", str(MODEL), "--device", "cpu", "--port", "0", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.port = None
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()
        if not ready.wait(60) or self.port is None:
            self.stop()
            raise RuntimeError("q35jit serve did not start:\n" + "\n".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self):
        return "\n".join(self.lines)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(5)


@pytest.fixture(scope="session")
def server():
    s = Server("--max-context", "2048", "--max-queue", "16", "--prefix-cache-block", "256",
               "--max-request-bytes", "1000000")
    yield s
    s.stop()
    assert s.proc.returncode == 0, s.log()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def template():
    """The chat template rendered as transformers renders it (apply_chat_template)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(TEMPLATE.read_text())


@pytest.fixture(scope="session")
def hf_tokenizer():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(MODEL / "tokenizer.json"))
