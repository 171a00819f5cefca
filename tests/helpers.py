import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_toy_sft(path, n=120, seed=0):
    """A toy chat set: arithmetic with a rationale and an <answer> tag."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(0, 9), r.randint(0, 9)
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "Add."}, {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}. <answer>{a + b}</answer>"}]})
                + "\n")


def run(args, nproc=1, timeout=300):
    """Run a script as a user would: python, or torchrun with nproc CPU ranks."""
    # keep the caller's entries
    pythonpath = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    if nproc == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}"] + args
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def config_only(tmp_path, cfg, name):
    """A model folder with config.json and a small tokenizer, no weights (what --dry-run reads), and a one-item
    RL file beside it with a 300-word question. Returns (folder, data file)."""
    from hf_io import config_to_hf, train_tokenizer
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_to_hf(cfg, "bfloat16")))
    train_tokenizer(["a b c"] * 10, 300, str(d))
    data = tmp_path / "rl.jsonl"
    data.write_text(json.dumps(dict(id="1", question="q " * 300, options={"A": "x", "B": "y"}, answer="A"))
                    + "\n")
    return d, data


def metrics(path):
    return [json.loads(l) for l in open(path)]


class FakeOpenAI:
    """Speaks POST /v1/chat/completions, answering requests concurrently. Teacher prompts: a wrong trace
    first, the right one after a refinement turn. Validator prompts: always picks the option whose text
    says RIGHT. fail_after: HTTP 500 from then on. delay: seconds per answer. throttle: the first N
    requests get HTTP 429 (Retry-After: 0). hang_after: accept, then never answer, from then on. nulls: the
    first N answers are HTTP 200 with "content": null (a content filter). echo_auth: every request gets HTTP
    401 whose reason phrase echoes the Authorization header. calls counts answered requests."""

    def __init__(self, fail_after=None, delay=0.0, throttle=0, hang_after=None, nulls=0, echo_auth=False):
        self.calls, self.fail_after, self.delay, self.throttle, self.seen = 0, fail_after, delay, throttle, 0
        self.hang_after, self.nulls, self.echo_auth = hang_after, nulls, echo_auth
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.seen += 1
                    hang = outer.hang_after is not None and outer.calls >= outer.hang_after
                    throttled = outer.seen <= outer.throttle
                    failing = outer.fail_after is not None and outer.calls >= outer.fail_after
                    failed = not throttled and failing
                    outer.calls += not (throttled or failed or hang)
                if hang:
                    time.sleep(3600)
                    return
                if outer.echo_auth:
                    self.send_response(401, f"Unauthorized: {self.headers.get('Authorization')}")
                    self.end_headers()
                    return
                if throttled or failed:
                    self.send_response(429 if throttled else 500)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                time.sleep(outer.delay)
                msgs = body["messages"]
                first = msgs[0]["content"]
                m = re.search(r"Correct answer: ([A-Z])\.", first)
                if m:   # teacher
                    L = m.group(1)
                    if len(msgs) == 1:
                        text = "<think>Considering the findings, option Z fits.</think>\n<answer>Z</answer>"
                    else:
                        text = (f"<think>Weighing each finding in turn, the alternatives fail; {L} fits all."
                                f"</think>\n<answer>{L}</answer>")
                    choices = [text] * body.get("n", 1)
                else:   # validator
                    user = msgs[-1]["content"]
                    right = re.search(r"^([A-Z])\. .*RIGHT", user, re.M)
                    choices = [f"<answer>{right.group(1) if right else 'A'}</answer>"] * body.get("n", 1)
                with outer.lock:
                    null = outer.nulls > 0
                    outer.nulls -= null
                out = json.dumps({"choices": [{"index": i, "message": {"role": "assistant",
                                                                       "content": None if null else c}}
                                              for i, c in enumerate(choices)]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        class Server(ThreadingHTTPServer):
            # the listen backlog (5 by default) a real server such as vLLM's is far above
            request_queue_size = 256
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
