#!/usr/bin/env python3
"""tokenizer.json for the tiny Qwen2-VL fixture (stdlib only): the tiny Qwen2 fixture's
byte-level BPE (ids 0..299, ChatML specials at 0..2) with Qwen2-VL's vision tokens added at the
ids the fixture model uses (config.json: image 300, vision start 301, vision end 302, video
303).

    python3 scripts/vlm/make_tokenizer.py tests/fixtures/tiny-qwen2 tests/fixtures/tiny-qwen2vl
"""
import json
import os
import sys

src, dst = sys.argv[1], sys.argv[2]
with open(os.path.join(src, "tokenizer.json")) as f:
    tok = json.load(f)
with open(os.path.join(dst, "config.json")) as f:
    cfg = json.load(f)
added = {
    cfg["image_token_id"]: "<|image_pad|>",
    cfg["vision_start_token_id"]: "<|vision_start|>",
    cfg["vision_end_token_id"]: "<|vision_end|>",
    cfg["video_token_id"]: "<|video_pad|>",
}
vocab = tok["model"]["vocab"]
assert max(vocab.values()) < min(added), "the added ids must follow the BPE vocabulary"
for i, content in sorted(added.items()):
    tok["added_tokens"].append({"id": i, "content": content, "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False,
                                "special": True})
with open(os.path.join(dst, "tokenizer.json"), "w") as f:
    json.dump(tok, f, ensure_ascii=False, indent=1)
print("wrote", os.path.join(dst, "tokenizer.json"))
