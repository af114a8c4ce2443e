"""Paired KL differences of this directory's runs, position by position (same 96 positions).

    python3 paired.py      # from this directory
"""
import json, math
def kl(path, name=None):
    j = json.load(open(path))
    for p in j["profiles"]:
        if name is None or p["name"] == name:
            return [x for t in p["per_trajectory"] for x in t["kl"]], p
def pair(a, b):
    d = [x - y for x, y in zip(a[0], b[0], strict=True)]
    n = len(d); m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    return m, 1.96 * sd / math.sqrt(n)
base = kl("int2-plain/eval.json")
base2 = kl("layer-axis/eval.json", "tag-only-2.57-w32-fp8")
for path, name, b in [("int2-ko0.0005", None, base), ("int2-ko0.002", None, base), ("int2-ko0.003", None, base), ("int2-ko0.0075", None, base), ("ko0.005", "int2-w32-fp8-ko0.005", base), ("ko0.01", "int2-w32-fp8-ko0.01", base), ("int2-kb32", None, base), ("int2-kb128", None, base), ("int2-kb128-ko0.005", None, base), ("int2-kb128-ko0.01", None, base), ("v3-head0.005", None, base), ("v3-pooled0.005", None, base), ("v2-profile3", None, base2),
                      ("ko0.005", "tag-only-2.57-w32-fp8-ko0.005", base2), ("ko0.01", "tag-only-2.57-w32-fp8-ko0.01", base2)]:
    a = kl(f"{path}/eval.json", name)
    m, ci = pair(a, b)
    print(f"{a[1]['name']}: KL {a[1]['fidelity']['mean_kl']:.3f} bits {a[1]['effective_bits']:.3f}  vs base {b[1]['fidelity']['mean_kl']:.3f}: {m:+.3f} ± {ci:.3f}")

all9 = kl("../eval-test-window-fp8/all9-w32/eval.json")
a = kl("all9-ko0.005/eval.json")
m, ci = pair(a, all9)
print(f"all nine: {a[1]['name']}: KL {a[1]['fidelity']['mean_kl']:.3f} bits {a[1]['effective_bits']:.3f}  vs "
      f"{all9[1]['name']} {all9[1]['fidelity']['mean_kl']:.3f} bits {all9[1]['effective_bits']:.3f}: {m:+.3f} ± {ci:.3f}")
for t, u in zip(a[1]["per_trajectory"], all9[1]["per_trajectory"]):
    x, y = sum(t["kl"]) / len(t["kl"]), sum(u["kl"]) / len(u["kl"])
    print(f"  {t['id'][:50]:50s} {x:.3f} vs {y:.3f}")

for r in ["v3-all9-head", "v3-all9-pooled"]:
    a = kl(f"{r}/eval.json")
    m, ci = pair(a, all9)
    print(f"all nine, final version ({r}): KL {a[1]['fidelity']['mean_kl']:.3f} bits "
          f"{a[1]['effective_bits']:.3f}; minus none {m:+.3f} ± {ci:.3f}")
m, ci = pair(kl("v3-all9-pooled/eval.json"), kl("v3-all9-head/eval.json"))
print(f"all nine: pooled over KV heads minus per head {m:+.3f} ± {ci:.3f}")
