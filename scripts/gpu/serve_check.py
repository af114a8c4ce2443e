#!/usr/bin/env python3
"""`triaxkv serve --gpu` end to end (standard library only: the GPU machine has no network).

1. Greedy answers of the GPU server and of the CPU server (same binary, same model) for a
   few prompts: reported side by side, with the length of the common token prefix (bf16
   weights and activations on the GPU vs f32 on the CPU: a late divergence is expected,
   an early one is a bug).
2. Load: CLIENTS concurrent clients, each a multi-turn agent-like conversation (the reply
   and a synthetic tool result appended, resent whole each turn: prefix reuse) against the
   GPU server for DURATION seconds; completion tokens/s, request latency p50/p99, errors,
   and /metrics afterwards (live KV bytes must return to 0).

    python3 scripts/gpu/serve_check.py --bin ./triaxkv --model M.gguf --out DIR \
        [--profile P.json [--wait-fp8] [--sinks-fp8] [--decode-fp8] [--window-fp8]] [--clients 64] [--duration 60]

   A profile allocated with `--hold-fp8` turns the four FP8 flags on by itself.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "List three uses of a hash map.",
]

TOOL_RESULT = (
    "ls -la output:\n" + "\n".join(f"-rw-r--r-- 1 agent agent {1000 + 37 * i} file_{i}.py" for i in range(40))
)


def start(bin_path, args, log):
    p = subprocess.Popen(
        [bin_path, "serve", "--port", "0"] + args,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    line = p.stdout.readline()
    if not line.startswith("listening on "):
        p.kill()
        sys.exit(f"server did not start: {line!r} (see {log.name})")
    return p, line.split("listening on ", 1)[1].strip()


def post(url, body, timeout=600):
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def metrics(url):
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return r.read().decode()


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


def greedy(url, prompt, n=48):
    r = post(
        url,
        {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": n,
            "temperature": 0,
        },
    )
    return r["choices"][0]["message"]["content"] or "", r["usage"]["completion_tokens"]


def client(url, k, stop_at, out, lock):
    messages = [
        {"role": "system", "content": "You are a coding agent. Use tools to inspect the repository."},
        {"role": "user", "content": f"Task {k}: find the file that defines the parser and summarise it."},
    ]
    while time.time() < stop_at:
        t = time.time()
        try:
            r = post(url, {"messages": messages, "max_tokens": 64 + 16 * (k % 5), "temperature": 0})
            dt = time.time() - t
            text = r["choices"][0]["message"]["content"] or ""
            with lock:
                out["latency"].append(dt)
                out["tokens"] += r["usage"]["completion_tokens"]
                out["prompt"] += r["usage"]["prompt_tokens"]
                out["requests"] += 1
            messages.append({"role": "assistant", "content": text})
            messages.append({"role": "user", "content": TOOL_RESULT[: 400 + 97 * (len(messages) % 9)]})
            if len(messages) > 14:
                messages = messages[:2]
        except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
            with lock:
                out["errors"].append(repr(e)[:200])
            time.sleep(0.5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--kv-memory", default="8GiB")
    ap.add_argument("--cpu-only", action="store_true", help="dry run of this script: both servers on the CPU")
    ap.add_argument("--wait-fp8", action="store_true", help="GPU server: tokens waiting for a key group in FP8 blocks")
    ap.add_argument("--sinks-fp8", action="store_true", help="GPU server: the sinks in FP8 blocks too")
    ap.add_argument("--decode-fp8", action="store_true", help="GPU server: generated tokens written into the FP8 waiting blocks")
    ap.add_argument("--window-fp8", action="store_true", help="GPU server: the window kept in the FP8 waiting blocks")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = {}
    gpu_args = ([] if args.cpu_only else ["--gpu"]) + ["--model", args.model, "--kv-memory", args.kv_memory, "--max-seqs", "128"]
    if args.profile:
        gpu_args += ["--profile", args.profile]
    gpu_args += ["--wait-fp8"] * args.wait_fp8 + ["--sinks-fp8"] * args.sinks_fp8 + ["--decode-fp8"] * args.decode_fp8
    gpu_args += ["--window-fp8"] * args.window_fp8
    with open(os.path.join(args.out, "serve-gpu.log"), "w") as glog, open(
        os.path.join(args.out, "serve-cpu.log"), "w"
    ) as clog:
        gpu, gurl = start(args.bin, gpu_args, glog)
        cpu, curl = start(args.bin, ["--model", args.model], clog)
        try:
            same = []
            for p in PROMPTS:
                g, gn = greedy(gurl, p)
                c, cn = greedy(curl, p)
                common = 0
                while common < min(len(g), len(c)) and g[common] == c[common]:
                    common += 1
                same.append({"prompt": p, "gpu": g, "cpu": c, "common_chars": common,
                             "gpu_tokens": gn, "cpu_tokens": cn, "equal": g == c})
                print(f"greedy {'EQUAL' if g == c else 'differs'} (common prefix {common} chars of {len(g)}/{len(c)}): {p}")
            report["greedy"] = same
            cpu.terminate()
            out = {"latency": [], "tokens": 0, "requests": 0, "errors": [], "prompt": 0}
            lock = threading.Lock()
            stop_at = time.time() + args.duration
            t0 = time.time()
            threads = [
                threading.Thread(target=client, args=(gurl, k, stop_at, out, lock))
                for k in range(args.clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.time() - t0
            lat = sorted(out["latency"]) or [float("nan")]
            m = ""
            for _ in range(60):
                m = metrics(gurl)
                if metric(m, "triaxkv_live_sequences") == 0:
                    break
                time.sleep(1)
            report["load"] = {
                "clients": args.clients,
                "wall_s": wall,
                "requests": out["requests"],
                "completion_tokens": out["tokens"],
                "completion_tokens_per_s": out["tokens"] / wall,
                "prompt_tokens": out["prompt"],
                "latency_p50_s": lat[len(lat) // 2],
                "latency_p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                "errors": len(out["errors"]),
                "first_errors": out["errors"][:5],
                "live_sequences_after": metric(m, "triaxkv_live_sequences"),
                "live_kv_bytes_after": metric(m, 'triaxkv_kv_bytes{owner="live"}'),
                "preemptions": metric(m, "triaxkv_preemptions_total"),
                "prefix_hits": metric(m, 'triaxkv_prefix_cache_lookups_total{result="hit"}'),
                "prefix_reused_tokens": metric(m, "triaxkv_prefix_cache_reused_tokens_total"),
            }
            with open(os.path.join(args.out, "metrics.txt"), "w") as f:
                f.write(m)
            print(json.dumps(report["load"], indent=1))
        finally:
            gpu.terminate()
            cpu.terminate()
            gpu.wait(timeout=60)
    with open(os.path.join(args.out, "serve_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    load = report["load"]
    ok = load["errors"] == 0 and load["live_kv_bytes_after"] == 0 and load["requests"] > 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
