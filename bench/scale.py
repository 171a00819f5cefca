"""
Real shapes on a CPU: what the memory plan says against what a process measures.

    python bench/scale.py logits      # scoring / SFT loss at Qwen's 151,936-token vocabulary: plain, chunked
    python bench/scale.py rehearsal   # a Qwen2.5-0.5B-shaped model, 2 gloo ranks, FSDP2: SFT + GRPO step
    python bench/scale.py rehearsal --shape qwen2.5-1.5b --nproc 1 --device cuda --bf16   # on one GPU
    python bench/scale.py rehearsal --only grpo --rollout-tp 1 2   # tensor-parallel rollouts against gathered
    python bench/scale.py roofline --shape qwen2.5-1.5b   # one GPU: SFT MFU, decode vs the HBM roofline

logits: a narrow model (hidden 64, 2 layers) with the full vocabulary, so that nearly all memory is the
(tokens x vocab) tensors; each case runs in its own process and prints its peak resident memory, with the
chunk size at "plain" (one chunk: full fp32 logits) and at the default.

rehearsal: a random-init checkpoint of the given shape is written in the Hugging Face layout (several
safetensors shards, the demo's small tokenizer beside it), then train_sft.py (one step on packed rows,
activation checkpointing) and train_grpo.py (one step, KL on) run under torchrun. Each rank prints the
memory plan at start and its measured peak at the end; this script prints them side by side. With
--rollout-tp 1 2 the GRPO step runs once per degree, and the rollout phase's measured rise (each rank's
peak while it generates, over its memory before) is printed beside the plan's rollout terms and as a
multiple of the policy's bytes; then, on the same checkpoint, tensor-parallel logits and greedy completions
against the gathered policy's (tp_check).
"""
import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def logits_case(kind, chunk, n, length, vocab):
    """One case in this process; prints a JSON line with the peak."""
    import torch
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    m = Transformer(cfg).init_weights(0)
    base = peak_gb()
    t0 = time.time()
    if kind == "grpo":   # n completions of `length` tokens behind 64-token prompts, one padded row each
        from train_grpo import completion_logprobs
        prompts = [torch.randint(0, vocab, (64,)).tolist()] * n
        outs = [torch.randint(0, vocab, (length,)).tolist() for _ in range(n)]
        lp, mask, _ = completion_logprobs(m, prompts, outs, torch.device("cpu"), 0, chunk=chunk)
        (lp * mask).sum().backward()
    else:                # packed SFT rows of `length` tokens, every target in the loss
        from train_sft import masked_loss_sum
        ids = torch.randint(0, vocab, (n, length))
        loss, _ = masked_loss_sum(m, ids, torch.ones_like(ids), torch.zeros_like(ids), chunk=chunk)
        loss.backward()
    print(json.dumps(dict(kind=kind, chunk=chunk, peak_gb=round(peak_gb(), 2), before_gb=round(base, 2),
                          logits_gb=round(n * length * vocab * 4 / 2**30, 2), s=round(time.time() - t0, 1))))


def logits_bench(args):
    rows = []
    for kind, n, length in (("grpo", 16, 512), ("sft", 4, 2048)):
        for chunk in (10**9, 0):
            p = subprocess.run([sys.executable, __file__, "_case", kind, str(chunk), str(n), str(length),
                                str(args.vocab)], capture_output=True, text=True, cwd=ROOT)
            if p.returncode:
                sys.exit(p.stderr[-2000:])
            rows.append((f"{kind} {n} x {length}", "plain (one chunk)" if chunk else "chunked (default)",
                         json.loads(p.stdout.strip().splitlines()[-1])))
    print(f"\nvocabulary {args.vocab:,}; peak resident memory of the process (ru_maxrss), forward + backward")
    print("| case | loss path | peak GB | before the call GB | fp32 logits alone GB | seconds |")
    print("|---|---|---|---|---|---|")
    for case, path, r in rows:
        print(f"| {case} | {path} | {r['peak_gb']} | {r['before_gb']} | {r['logits_gb']} | {r['s']} |")
    for i in range(0, len(rows), 2):
        print(f"{rows[i][0]}: chunked peak = {rows[i + 1][2]['peak_gb'] / rows[i][2]['peak_gb']:.2f}x the "
              "plain one")


SHAPES = {   # real models' shapes (random weights): Qwen2.5-0.5B and -1.5B
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True),
}


def make_checkpoint(shape, out, data):
    """A random-init checkpoint of the shape, HF layout in several safetensors shards, with a small BPE
    tokenizer trained on the SFT data (the embedding is larger than the tokenizer's vocabulary, as Qwen's
    own is)."""
    import torch
    from hf_io import save_model, train_tokenizer
    from model import ModelConfig, Transformer
    texts = [m["content"] for line in open(data) for m in json.loads(line)["messages"]]
    tok = train_tokenizer(texts, 4096, out)
    cfg = ModelConfig(vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                      **SHAPES[shape])
    torch.manual_seed(0)
    save_model(Transformer(cfg).init_weights(0), out, max_shard_bytes=400 * 2**20)


def torchrun(args, nproc, device, log):
    """Run a trainer; return its output (and keep it in log)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    t0 = time.time()
    p = subprocess.run(cmd + ["--device", device], cwd=ROOT, env=env, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(p.stdout + p.stderr)
    if p.returncode:
        sys.exit(f"{' '.join(args[:1])} failed (see {log}):\n" + (p.stdout + p.stderr)[-3000:])
    return p.stdout + p.stderr, time.time() - t0


TP_CHECK = r'''
import sys, torch, torch.distributed as dist
from common import init_distributed
from fsdp import load_sharded
import engine, tp
from memplan import Meter
from model import SamplingParams as SP
rank, world, device = init_distributed(sys.argv[sys.argv.index("--device") + 1])
model = load_sharded(sys.argv[1], device, world)
group = tp.Group(world, world, rank)
# the policy to generate with alone: built (or gathered), packed for oneDNN on a CPU, one token decoded
meter, whole = Meter(device), sum(p.numel() * p.element_size() for p in model.parameters())
with torch.no_grad():
    for name, grp in (("tp", group), ("gathered", None)):
        with meter.phase(name), tp.policy(model, grp) as m:
            engine.generate(m, [[11, 12, 13]], SP(1, 0.0), slots=1)
rises = [None] * world
dist.all_gather_object(rises, {k: meter.peaks[k][0] for k in ("tp", "gathered")})
if rank == 0:
    print("tp_check: the policy to generate with (built or gathered, packed on a CPU, one token decoded), peak "
          "rise per rank: " + "; ".join(f"{k} " + " / ".join(f"{r[k] / 2**30:.2f} GB ({r[k] / whole:.2f}x)"
                                                                for r in rises) for k in ("tp", "gathered"))
          + f" of the policy's {whole / 2**30:.2f} GB", flush=True)
g = torch.Generator().manual_seed(0)   # the same prompts on every rank: a group shares its queue anyway
prompts = [torch.randint(10, 4000, (int(n),), generator=g).tolist()
           for n in torch.randint(8, 40, (6,), generator=g)]
ids = torch.tensor([prompts[0]], device=device)
with torch.no_grad():
    with tp.policy(model, group) as m:
        lt = m(ids)[0].double()
        a = engine.generate(m, prompts, SP(24, 0.0), slots=4)[0]
        s = engine.generate(m, prompts[:2], SP(24, num_samples=2), 7, slots=3)[0]
    with tp.policy(model, None) as m:
        lf = m(ids)[0].double()
        b = engine.generate(m, prompts, SP(24, 0.0), slots=4)[0]
        u = engine.generate(m, prompts[:2], SP(24, num_samples=2), 7, slots=3)[0]
rel = float((lt - lf).abs().max() / lf.abs().max())
if rank == 0:
    print(f"tp_check: logits of a {ids.shape[1]}-token prompt, max |tp - gathered| / max |gathered| = "
          f"{rel:.2e}; "
          f"greedy completions equal: {sum(x == y for x, y in zip(a, b))}/{len(a)}; sampled (seed 7) equal: "
          f"{sum(x == y for x, y in zip(s, u))}/{len(s)}", flush=True)
dist.destroy_process_group()
'''


def rehearsal(args):
    tmp = args.work or tempfile.mkdtemp(prefix="scale_")
    ck = os.path.join(tmp, args.shape)
    bf16 = ["--bf16"] if args.bf16 else []
    if not os.path.exists(os.path.join(ck, "config.json")):
        subprocess.run([sys.executable, "make_data.py", "--out", f"{tmp}/data", "--kg-questions", "400",
                        "--kg-max-diseases", "40", "--seed", "0"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run([sys.executable, __file__, "_checkpoint", args.shape, ck, f"{tmp}/data/sft.jsonl"],
                       cwd=ROOT,
                       check=True)
    files = [f for f in os.listdir(ck) if f.endswith(".safetensors")]
    model_bytes = sum(os.path.getsize(os.path.join(ck, f)) for f in files)
    print(f"checkpoint: {args.shape}, {len(files)} safetensors shards, {model_bytes / 2**30:.2f} GB; "
          f"{args.nproc} rank(s) on {args.device}{' bf16' if args.bf16 else ''}")
    runs = {
        "SFT": ["train_sft.py", "--init", ck, "--data", f"{tmp}/data/sft.jsonl", "--out", f"{tmp}/sft",
                "--steps", "1",
                "--seq-len", "2048", "--rows-per-step", str(args.nproc), "--micro-rows", "1", "--act-ckpt",
                "--eval-every", "1000", "--save-every", "1"] + bf16,
        "GRPO": ["train_grpo.py", "--init", ck, "--data", f"{tmp}/data/rl_train.jsonl", "--out",
                 f"{tmp}/grpo",
                 "--steps", "1", "--questions-per-step", "4", "--group-size", "4", "--stage2-group-size", "4",
                 "--max-new-tokens", "256", "--temperature", "1.0", "--kl-beta", "0.04", "--micro-batch", "4",
                 "--act-ckpt", "--val-size", "2", "--eval-every", "1000", "--save-every", "1"] + bf16,
    }
    if args.rollout_tp:
        grpo = runs.pop("GRPO")
        # slots: the step's requests (4 x 4 over the ranks), so the plan's KV cache is the one the step fills
        per_rank = 16 // args.nproc
        runs.update({f"GRPO tp {n}": grpo + ["--rollout-tp", str(n), "--gen-slots", str(per_rank * n)]
                     for n in args.rollout_tp})
    table, rollout = [], []
    for name, cmd in runs.items():
        if args.only and not name.lower().startswith(args.only):
            continue
        key = name.lower().replace(" ", "_")
        cmd[cmd.index("--out") + 1] = f"{tmp}/{key}"
        shutil.rmtree(f"{tmp}/{key}", ignore_errors=True)
        out, secs = torchrun(cmd, args.nproc, args.device, f"{tmp}/{key}.log")
        m = re.search(r"memory per rank: peak ([\d. /]+) GB \(plan ([\d.]+) GB\)(.*)", out)
        plan_lines = out[out.index("memory plan per rank"):].split("\n")
        end = next(i for i, l in enumerate(plan_lines) if l.strip().startswith("total"))
        print("\n".join(plan_lines[:end + 1]))
        peaks = [float(x) for x in m.group(1).split("/")]
        phases = dict((k, [float(v) for v in re.findall(r"\+([\d.]+)", vals)])
                      for k, vals in re.findall(r"; (\w+) ([+\d. /]+) GB", m.group(3)))
        table.append((name, float(m.group(2)), peaks, phases, secs))
        if name.startswith("GRPO"):   # the plan's rollout terms beside the rollout phase's measured rise
            planned = sum(float(g) for g in re.findall(r"rollout\s+([\d.]+) GB", "\n".join(plan_lines[:end])))
            rollout.append((name, planned, phases.get("rollout", [])))
    print("\n| run | rank | plan GB | measured peak GB | measured / plan | load: rise GB (x model bytes) | "
          "save: rise GB | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, planned, peaks, phases, secs in table:
        for r, pk in enumerate(peaks):
            load = phases.get("load", [0] * len(peaks))[r]
            save = phases.get("save", [0] * len(peaks))[r]
            print(f"| {name} | {r} | {planned:.2f} | {pk:.2f} | {pk / planned:.2f} | {load:.2f} "
                  f"({load * 2**30 / model_bytes:.2f}) | {save:.2f} | {secs:.0f} |")
    if rollout:
        print(f"\nthe rollout phase, per rank (the policy: {model_bytes / 2**30:.2f} GB in the checkpoint's "
              "dtype)")
        print("| run | rank | plan: rollout terms GB | measured rise GB | measured / plan | "
              "rise / policy bytes |")
        print("|---|---|---|---|---|---|")
        for name, planned, rises in rollout:
            for r, rise in enumerate(rises):
                print(f"| {name} | {r} | {planned:.2f} | {rise:.2f} | {rise / planned:.2f} | "
                      f"{rise * 2**30 / model_bytes:.2f} |")
    if any(n > 1 for n in args.rollout_tp or ()):
        with open(f"{tmp}/tp_check.py", "w") as f:
            f.write(TP_CHECK)
        out, _ = torchrun([f"{tmp}/tp_check.py", ck], args.nproc, args.device, f"{tmp}/tp_check.log")
        print("\n" + "\n".join(l for l in out.splitlines() if l.startswith("tp_check:")))


# bf16 dense tensor-core peak (FLOP/s) and HBM bandwidth (bytes/s), from the vendors' data sheets
DEVICES = [("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12),
           ("A100-SXM4-80GB", 312e12, 2.04e12), ("A100", 312e12, 1.56e12), ("L40S", 362e12, 0.864e12),
           ("B200", 2250e12, 8.0e12)]


def roofline(args):
    """On one GPU: an SFT step's tokens/s and MFU against the device's bf16 peak (packed rows, bf16 autocast,
    as train_sft.py runs), and generate()'s decode tokens/s against the HBM roofline (each step reads every
    weight and the KV cache once), with and without the CUDA graph."""
    import torch
    from engine import generate
    from model import SamplingParams
    from model import ModelConfig, Transformer
    from train_sft import masked_loss_sum, pack
    dev = torch.device(args.device)
    # elsewhere (a smoke test of this code): fp32, and give --peak-tflops / --hbm-tbs
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak, bw = next(((p / 1e12, b / 1e12) for key, p, b in DEVICES if key in name), (None, None))
    peak, bw = (args.peak_tflops or peak) * 1e12, (args.hbm_tbs or bw) * 1e12
    print(f"{name}: bf16 peak {peak / 1e12:.0f} TFLOP/s, HBM {bw / 1e12:.2f} TB/s; torch {torch.__version__}")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # --- SFT: packed rows of ~doc-len-token examples, loss on the assistant share, one optimizer step each
    cfg = ModelConfig(vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768, **SHAPES[args.shape])
    torch.manual_seed(0)
    m = Transformer(cfg).init_weights(0).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ex = []
    for _ in range(args.rows * args.seq // 200):
        n = int(torch.randint(args.doc_len // 2, args.doc_len * 3 // 2, (1,), generator=g))
        ex.append((torch.randint(0, 4096, (n,), generator=g).tolist(), [0] * (n // 3) + [1] * (n - n // 3)))
    rows = pack(ex, args.seq, 0)[0][:args.rows]
    ids, mask, docs = (torch.tensor([r[i] for r in rows], device=dev) for i in range(3))

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            s, n = masked_loss_sum(m, ids, mask, docs)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(2):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / args.steps
    P = sum(p.numel() for p in m.parameters())   # tied: the embedding is the lm_head's matmul
    tok = args.rows * args.seq
    # 6 FLOPs per parameter and token (forward 2, backward 4), and causal attention inside each example
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * args.doc_len
    flops = (6 * P + attn) * tok
    print(f"SFT {args.shape} ({P / 1e9:.2f}B), {args.rows} x {args.seq} packed tokens (~{args.doc_len}-token "
          f"examples): {tok / dt:,.0f} tokens/s, MFU {flops / dt / peak:.1%} of the bf16 peak")
    m = opt = None   # free the SFT model before the decode one
    # --- decode: 0.5B shape in bf16, batch of prompts, every row to the end
    cfg = ModelConfig(vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768,
                      **SHAPES["qwen2.5-0.5b"])
    m = Transformer(cfg).init_weights(0).to(dev, torch.bfloat16 if cuda else torch.float32).eval()
    prompts = [torch.randint(10, 4096, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    w_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    kv_tok = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * (2 if cuda else 4)
    ctx = args.prompt + args.new / 2   # mean keys read per step
    roof = args.batch / ((w_bytes + args.batch * ctx * kv_tok) / bw)
    for graph in (False, True):
        generate(m, prompts[:4], SamplingParams(8, 1.0), seed=0, cuda_graph=graph)
        sync()
        t = time.perf_counter()
        out, _ = generate(m, prompts, SamplingParams(args.new, 1.0), seed=0, cuda_graph=graph)
        sync()
        tps = sum(len(o) for o in out) / (time.perf_counter() - t)
        print(f"decode qwen2.5-0.5b bf16, batch {args.batch}, {args.prompt} + {args.new} tokens, "
              f"{'CUDA graph' if graph else 'eager'}: {tps:,.0f} tokens/s = {tps / roof:.1%} of the HBM "
              "roofline "
              f"({roof:,.0f} tokens/s: {w_bytes / 2**30:.2f} GiB of weights + the KV cache per step)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_checkpoint":
        make_checkpoint(*sys.argv[2:5])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_case":
        k, c, n, l, v = sys.argv[2:7]
        logits_case(k, int(c), int(n), int(l), int(v))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["logits", "rehearsal", "roofline"], help="which measurement")
    ap.add_argument("--vocab", type=int, default=151936, help="logits: vocabulary size")
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=list(SHAPES), help="rehearsal: model shape")
    ap.add_argument("--nproc", type=int, default=2, help="rehearsal: ranks")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cpu for "
                    "rehearsal, cuda for roofline)")
    ap.add_argument("--bf16", action="store_true", help="rehearsal: --bf16 (on a "
                    "CPU only where it is native)")
    ap.add_argument("--only", choices=["sft", "grpo"], default=None, help="rehearsal: one of the two runs")
    ap.add_argument("--rollout-tp", type=int, nargs="+", default=None, help="rehearsal: the GRPO step once per "
                    "tensor-parallel degree (e.g. 1 2), the rollout's memory side by side, then tp_check")
    ap.add_argument("--work", default=None, help="rehearsal: folder for the "
                    "checkpoint and runs (kept; reused)")
    ap.add_argument("--rows", type=int, default=4, help="roofline: SFT rows per step")
    ap.add_argument("--seq", type=int, default=4096, help="roofline: SFT tokens per row")
    ap.add_argument("--doc-len", type=int, default=1024, help="roofline: mean SFT example length")
    ap.add_argument("--steps", type=int, default=5, help="roofline: timed SFT steps")
    ap.add_argument("--batch", type=int, default=64, help="roofline: decode batch")
    ap.add_argument("--prompt", type=int, default=128, help="roofline: prompt tokens")
    ap.add_argument("--new", type=int, default=256, help="roofline: new tokens per row")
    ap.add_argument("--peak-tflops", type=float, default=None, help="roofline: bf16 peak, for a "
                    "GPU not in DEVICES")
    ap.add_argument("--hbm-tbs", type=float, default=None, help="roofline: HBM TB/s, for a "
                    "GPU not in DEVICES")
    args = ap.parse_args()
    args.device = args.device or ("cuda" if args.what == "roofline" else "cpu")
    if args.what == "logits":
        logits_bench(args)
    elif args.what == "rehearsal":
        rehearsal(args)
    else:
        roofline(args)
