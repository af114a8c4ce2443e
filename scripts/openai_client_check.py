#!/usr/bin/env python3
"""Drive `triaxkv serve` with the official `openai` Python client (PyPI `openai`).

Starts the server on a free loopback port with an API key, then checks through the client:
the model list; a greedy non-streamed answer and the same request streamed (the deltas must
join to the same text, with one finish reason); a request with `tools`; `stop`; and that the
client sees the server's errors as its own exception types (401 wrong key, 400 bad
`max_tokens`, 400 `context_length_exceeded`, 413 a body over `--max-body`). Exits non-zero on
any failed check.

    python3 -m venv /tmp/oa && /tmp/oa/bin/pip install openai
    /tmp/oa/bin/python scripts/openai_client_check.py [--bin PATH] [-- serve args...]
"""

import argparse
import os
import subprocess
import sys
import time

try:
    import openai
except ImportError:
    sys.exit("this check needs the `openai` package: pip install openai")

KEY = "check-key"
failures = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail else ""))
    if not ok:
        failures.append(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("TRIAXKV_BIN"))
    ap.add_argument("serve_args", nargs="*")
    args = ap.parse_args()
    binary = args.bin
    if not binary:
        target = os.environ.get("CARGO_TARGET_DIR", "target")
        binary = os.path.join(target, "debug", "triaxkv")
    proc = subprocess.Popen(
        [binary, "serve", "--port", "0", "--api-key", KEY, "--max-body", "1MiB", *args.serve_args],
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            sys.exit(f"the server did not start (first line {line!r})")
        url = line.split("listening on ", 1)[1].strip()
        print(f"server at {url}, openai {openai.__version__}")
        run(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    check("server exits cleanly on SIGTERM", proc.returncode == 0, f"exit {proc.returncode}")
    if failures:
        sys.exit(f"{len(failures)} check(s) failed: {', '.join(failures)}")
    print("all checks passed")


def run(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)
    models = client.models.list()
    ids = [m.id for m in models.data]
    check("models.list", len(ids) == 1, str(ids))
    model = ids[0] if ids else "default"

    messages = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    t = time.time()
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, seed=7
    )
    text = r.choices[0].message.content or ""
    check(
        "chat.completions (non-stream)",
        bool(text) and r.choices[0].finish_reason in ("stop", "length"),
        f"{text!r} ({r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens, "
        f"{time.time() - t:.1f} s)",
    )
    check(
        "usage counts",
        r.usage.prompt_tokens > 0
        and 0 < r.usage.completion_tokens <= 24
        and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens,
        str(r.usage),
    )

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, seed=7, stream=True
    )
    parts, finishes = [], []
    for chunk in stream:
        for c in chunk.choices:
            if c.delta and c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    streamed = "".join(parts)
    check("stream joins to the non-stream text", streamed == text, f"{streamed!r}")
    check("stream ends with one finish reason", len(finishes) == 1, str(finishes))

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather of a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris? Use the tool."}],
        tools=tools,
        max_tokens=48,
        temperature=0,
    )
    msg = r.choices[0].message
    calls = msg.tool_calls or []
    detail = (
        f"{len(calls)} tool call(s): " + ", ".join(f"{c.function.name}({c.function.arguments})" for c in calls)
        if calls
        else f"text {msg.content!r}"
    )
    well_formed = all(c.type == "function" and c.function.name for c in calls)
    check(
        "tools: a parsed tool call or text",
        well_formed and (calls or msg.content is not None),
        detail,
    )
    if calls:
        check("tool_calls finish reason", r.choices[0].finish_reason == "tool_calls")

    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stop=["Paris"]
    )
    out = r.choices[0].message.content or ""
    check("stop string is cut", "Paris" not in out, repr(out))

    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    try:
        bad.chat.completions.create(model=model, messages=messages, max_tokens=4)
        check("401 on a wrong API key", False, "no error")
    except openai.AuthenticationError as e:
        check("401 on a wrong API key", e.status_code == 401)
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=-1)
        check("400 on max_tokens -1", False, "no error")
    except openai.BadRequestError as e:
        check("400 on max_tokens -1", e.status_code == 400, str(e.body)[:120])
    # Over the context: 400 context_length_exceeded, as OpenAI answers it.
    long = " ".join(["token"] * 40000)
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": long}], max_tokens=4
        )
        check("400 on a prompt over the context", False, "no error")
    except openai.BadRequestError as e:
        code = (e.body or {}).get("code") if isinstance(e.body, dict) else None
        check(
            "400 context_length_exceeded on a prompt over the context",
            e.status_code == 400 and code == "context_length_exceeded",
            str(code),
        )
    # A body over the server's limit (started with --max-body 1MiB): 413.
    huge = "x" * (2 << 20)
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": huge}], max_tokens=4
        )
        check("413 on a body over --max-body", False, "no error")
    except openai.APIStatusError as e:
        check("413 on a body over --max-body", e.status_code == 413, str(e.body)[:100])


if __name__ == "__main__":
    main()
