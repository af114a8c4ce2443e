"""PyTorch SDPA (flash backend, BF16, GQA) decode timing on the kernel harness's shapes.

One query token per sequence, 32 query / 8 KV heads, head dim 128. Same timing method as
attn_harness.cu: CUDA events, L2 flushed before every call, median of 25 after warm-up.
Usage: python3 sdpa_baseline.py OUT.json
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_call(fn, flush, iters=25):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        flush.fill_(i)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    out_path = sys.argv[1]
    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    rows = []
    hq, hkv, d = 32, 8, 128
    print(f"{'batch':>5} {'ctx':>7} {'us':>9} {'GB/s':>8}")
    # The grid of `triaxkv bench attention`'s defaults; SDPA_BATCH / SDPA_CONTEXT widen it.
    batches = [int(x) for x in os.environ.get("SDPA_BATCH", "1,8,32").split(",")]
    contexts = [int(x) for x in os.environ.get("SDPA_CONTEXT", "4096,32768,131072").split(",")]
    for batch in batches:
        for ctx in contexts:
            try:
                q = torch.randn(batch, hq, 1, d, device=dev, dtype=torch.bfloat16)
                k = torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.bfloat16)
                v = torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.bfloat16)
            except torch.OutOfMemoryError:
                print(f"{batch:5d} {ctx:7d}  skipped: out of memory")
                continue

            def call():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            us = time_call(call, flush)
            nbytes = 2 * k.numel() * k.element_size()
            gbs = nbytes / (us * 1e-6) / 1e9
            print(f"{batch:5d} {ctx:7d} {us:9.1f} {gbs:8.0f}")
            rows.append({"batch": batch, "context": ctx, "us": round(us, 2), "bytes": nbytes, "gbs": round(gbs, 1)})
            del q, k, v
            torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
