"""Paired KL differences of this directory's runs, position by position (same 96 positions).

    python3 paired.py      # from this directory
"""
import json
import math


def kl(path, name):
    j = json.load(open(path))
    for p in j["profiles"]:
        if p["name"] == name:
            return [x for t in p["per_trajectory"] for x in t["kl"]], p
    raise SystemExit(f"{name} not in {path}")


def pair(a, b):
    d = [x - y for x, y in zip(a[0], b[0], strict=True)]
    n = len(d)
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    return m, 1.96 * sd / math.sqrt(n), n


w0 = kl("../eval-test-sinks-fp8/tag-only-2.55-w0.json", "tag-only-2.55-w0-wait8-sink8")
runs = [
    ("win16/eval.json", "tag-only-2.8-wait8-sink8"),
    ("win8/eval.json", "tag-only-2.8-wait8-sink8-win8"),
    ("win16/eval.json", "tag-only-2.65-w32-wait8-sink8"),
    ("win8/eval.json", "tag-only-2.65-w32-wait8-sink8-win8"),
    ("hold/eval.json", "tag-only-2.6-w32-fp8"),
    ("hold/eval.json", "tag-only-2.65-w64-fp8"),
]
print(f"tag-only-2.55-w0 (FP8 waiting and sinks): mean KL {w0[1]['fidelity']['mean_kl']:.3f}, "
      f"measured bits {w0[1]['effective_bits']:.3f}")
for path, name in runs:
    a = kl(path, name)
    m, ci, n = pair(a, w0)
    print(f"{name}: mean KL {a[1]['fidelity']['mean_kl']:.3f}, measured bits "
          f"{a[1]['effective_bits']:.3f}; minus tag-only-2.55-w0: {m:+.3f} ± {ci:.3f} ({n} positions)")
for name in ["tag-only-2.8-wait8-sink8", "tag-only-2.65-w32-wait8-sink8"]:
    m, ci, _ = pair(kl("win8/eval.json", name + "-win8"), kl("win16/eval.json", name))
    print(f"{name}: FP8 window minus 16-bit window {m:+.3f} ± {ci:.3f}")
same = kl("hold/eval.json", "tag-only-2.65-w64-fp8")[0] == kl("win8/eval.json", "tag-only-2.8-wait8-sink8-win8")[0]
print(f"tag-only-2.65-w64-fp8 (hold_fp8, no flags) equals tag-only-2.8 with the three flags at every position: {same}")
