"""
Teacher and validator requests at once: make_data.py's label verification and CoT distillation against a local
OpenAI-compatible server (127.0.0.1) that takes --delay seconds per request and answers requests concurrently,
as a vLLM server does. Runs make_data.py at --concurrency 1 and N on the same items, prints the requests/s of
each (from report.json: answers / seconds spent waiting for them), the ratio, and whether the two runs wrote
byte-identical files.

    python bench/teacher.py                     # 100 items, 0.2 s per request, concurrency 1 vs 64
    python bench/teacher.py --items 300 --concurrency 128
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers import FakeOpenAI  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--items", type=int, default=100, help="public items (each: 1 "
                "validator + 2 teacher requests)")
ap.add_argument("--delay", type=float, default=0.2, help="server seconds per request")
ap.add_argument("--concurrency", type=int, default=64, help="the concurrent side (against 1)")
args = ap.parse_args()

tmp = tempfile.mkdtemp(prefix="bench_teacher_")
# the validator picks the option that says RIGHT; item 0 is mislabeled
with open(f"{tmp}/pub.jsonl", "w") as f:
    for i in range(args.items):
        opts = {"A": f"wrong {i} a", "B": f"RIGHT {i}", "C": f"wrong {i} c", "D": f"wrong {i} d"}
        f.write(json.dumps(dict(question=f"Planted question number {i} about condition {i}?", options=opts,
                                answer_idx="A" if i == 0 else "B")) + "\n")

srv = FakeOpenAI(delay=args.delay)
rows = []
try:
    for c in (1, args.concurrency):
        out = f"{tmp}/c{c}"
        cmd = [sys.executable, "make_data.py", "--kg", "none", "--public", f"medqa={tmp}/pub.jsonl", "--out",
               out,
               "--teacher-url", srv.url, "--teacher-model", "t", "--validator-url", srv.url,
               "--validator-model", "v",
               "--test-frac", "0", "--sft-frac", "1.0", "--concurrency", str(c)]
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        rep = json.load(open(f"{out}/report.json"))
        req = [rep["validator_requests"], rep["teacher_requests"]]
        n, secs = sum(r["answered"] for r in req), sum(r["seconds"] for r in req)
        rows.append((c, n, secs, n / secs, time.time() - t0))
finally:
    srv.close()

print(f"{args.items} items, server {args.delay * 1000:.0f} ms per request, answering concurrently\n")
print("| concurrency | requests | seconds waiting | requests/s | whole run s |")
print("|---|---|---|---|---|")
for c, n, secs, rate, wall in rows:
    print(f"| {c} | {n} | {secs:.1f} | {rate:.1f} | {wall:.1f} |")
same = all(open(f"{tmp}/c1/{f}", "rb").read() == open(f"{tmp}/c{args.concurrency}/{f}", "rb").read()
           for f in ("items.jsonl", "sft.jsonl", "rl_train.jsonl", "review.jsonl"))
print(f"\nconcurrency {args.concurrency} / 1: {rows[1][3] / rows[0][3]:.1f}x the requests/s; "
      f"outputs byte-identical: {same}")
