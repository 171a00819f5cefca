"""
Training-step throughput and memory: our Transformer vs transformers' Qwen2ForCausalLM on the same config,
weights and batch (forward + backward + AdamW step), in the same process; MFU against a matmul rate
measured in the same run; and parameter + gradient + optimizer-state bytes per rank, 1 process vs 2 FSDP2
ranks.

    python bench/train.py       # CPU: fp32 (+ bf16 where native), then the 2-rank FSDP memory part
    python bench/train.py --device cuda --batch 16 --seq 2048 --preset small

Three cases: "full" (every position, a pretraining step: both sides do the same work); "sft" (one example
per row, loss on its last --loss-frac, as SFT masks the prompt: ours computes logits for those positions
only, which is what train_sft.py does; transformers gets labels=-100 on the rest, its standard SFT usage);
"packed" (train_sft.py's real rows: several examples of --doc-len tokens on average packed into each row,
a pad tail, loss on the last --loss-frac of each; ours gets doc_ids, transformers the block-diagonal
causal mask as a 4D boolean attention_mask with positions restarting per example, which gives the same
logits). bf16 autocast runs only where the CPU has bf16 in hardware (or on CUDA): elsewhere it is emulated
and slow.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import cpu_has_native_bf16  # noqa: E402
from hf_io import save_model  # noqa: E402
from model import PRESETS, ModelConfig, Transformer, doc_attention_mask, doc_positions  # noqa: E402
from train_sft import masked_loss_sum, pack  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--preset", default="20m", choices=list(PRESETS), help="model preset")
ap.add_argument("--batch", type=int, default=4, help="sequences per step")
ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
ap.add_argument("--loss-frac", type=float, default=0.35, help="sft case: share of positions with loss (the "
                "embedded default's assistant share is about 0.35)")
ap.add_argument("--doc-len", type=int, default=170, help="packed case: mean example length (the embedded "
                "default's prompt + trace is about 170 tokens)")
ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up)")
ap.add_argument("--device", default="cpu", help="cpu or cuda")
ap.add_argument("--fsdp-part", action="store_true", help="(internal) the torchrun memory measurement")
ap.add_argument("--skip-fsdp", action="store_true", help="skip the 2-rank memory part")
ap.add_argument("--seed", type=int, default=0, help="seed")
args = ap.parse_args()
dev = torch.device(args.device)
cfg = ModelConfig.from_name(args.preset)


def state_bytes(model, opt):
    """Bytes of parameters, gradients and optimizer state held by this process (local shards under FSDP)."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    n = sum(local(p) for p in model.parameters())
    n += sum(local(p.grad) for p in model.parameters() if p.grad is not None)
    n += sum(local(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return n


def step_fn(model, opt, ids, bf16, hf, loss_mask=None, docs=None):
    """One training step. loss_mask None: loss on every position. Else (B, T) 0/1: loss on those targets only.
    docs (B, T): the example each token belongs to (packed rows); None: one per row."""
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
        if loss_mask is None:
            logits = model(input_ids=ids).logits if hf else model(ids)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:,
                                                                                             1:].reshape(-1))
        elif hf:   # the usual transformers SFT step: labels -100 where there is no loss
            kw = {}
            if docs is not None:   # packed: block-diagonal causal mask, positions restart per example
                kw = dict(attention_mask=doc_attention_mask(docs), position_ids=doc_positions(docs))
            loss = model(input_ids=ids, labels=ids.masked_fill(loss_mask == 0, -100), **kw).loss
        else:      # train_sft.py's step
            s, n = masked_loss_sum(model, ids, loss_mask, torch.zeros_like(ids) if docs is None else docs)
            loss = s / n
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


if args.fsdp_part:   # under torchrun: memory per rank with FSDP2
    import torch.distributed as dist
    sys.path.insert(0, ROOT)
    from common import init_distributed
    from fsdp import shard_model
    rank, world, device = init_distributed("cpu")
    m = Transformer(cfg).init_weights(args.seed)
    m = shard_model(m, device, world)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (args.batch // world, args.seq))
    step_fn(m, opt, ids, False, False)
    b = state_bytes(m, opt)
    t = torch.tensor(float(b))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"FSDP2 x{world}: params+optimizer state per rank {t.item() / 2**20:.1f} MiB (largest rank)")
    dist.destroy_process_group()
    sys.exit(0)

import transformers  # noqa: E402

torch.manual_seed(args.seed)
ours = Transformer(cfg).init_weights(args.seed)
tmp = tempfile.mkdtemp()
save_model(ours, tmp)
ours = ours.to(dev)
ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(dev)
ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
n_params = sum(p.numel() for p in ours.parameters())
n_emb = cfg.vocab_size * cfg.hidden_size
# FLOPs per token of a training step: 6 x (non-embedding params + lm_head) + attention scores (12 L d T)
flops_tok = 6 * (n_params - n_emb + n_emb) + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq


def packed_rows():
    """train_sft.pack's rows (next-fit, a pad tail as document -1) of examples of random length around
    args.doc_len, loss on the last loss_frac of each -> (loss mask, doc ids), args.batch rows."""
    g = torch.Generator().manual_seed(args.seed)
    examples = []
    for _ in range(args.batch * args.seq // (args.doc_len // 2)):   # more than enough for args.batch rows
        n = int(torch.randint(args.doc_len // 2, args.doc_len * 3 // 2 + 1, (1,), generator=g))
        k = int(n * (1 - args.loss_frac))
        examples.append(([0] * n, [0] * k + [1] * (n - k)))
    rows = pack(examples, args.seq, 0)[0][:args.batch]
    return (torch.tensor([r[1] for r in rows], device=dev), torch.tensor([r[2] for r in rows], device=dev))


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(dtype):
    n = 2048 if dev.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    sync()
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    sync()
    return 3 * 2 * n ** 3 / (time.perf_counter() - t)


def bench(model, hf, bf16, loss_mask, docs=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_fn(model, opt, ids, bf16, hf, loss_mask, docs)   # warm-up (also allocates optimizer state)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        step_fn(model, opt, ids, bf16, hf, loss_mask, docs)
    sync()
    dt = (time.perf_counter() - t) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    return args.batch * args.seq / dt, peak, state_bytes(model, opt)


print(f"model {args.preset}: {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq} tokens, device "
      f"{args.device}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"threads {torch.get_num_threads()}")
sft_mask = torch.zeros_like(ids)
sft_mask[:, int(args.seq * (1 - args.loss_frac)):] = 1
pack_mask, pack_docs = packed_rows()
with torch.no_grad():   # the packed case is only a fair race if both sides compute the same thing
    diff = (ours(ids, doc_ids=pack_docs) - ref(input_ids=ids, attention_mask=doc_attention_mask(pack_docs),
                                              position_ids=doc_positions(pack_docs)).logits).abs().max()
print(f"packed rows: {int(pack_docs.max()) + 1} examples in {args.batch} rows; max |logit diff| ours vs "
      f"transformers {diff:.1e} (fp32)")
precisions = [False] + ([True] if dev.type == "cuda" or cpu_has_native_bf16() else [])
if len(precisions) == 1:
    print("bf16: skipped (this CPU has no native bf16; autocast would be emulated)")
for bf16 in precisions:
    name = "bf16 autocast" if bf16 else "fp32"
    rate = matmul_rate(torch.bfloat16 if bf16 else torch.float32)
    for case, mask, docs in (("full loss", None, None), (f"sft loss on {args.loss_frac:.0%}", sft_mask, None),
                             (f"packed sft rows, ~{args.doc_len}-token examples", pack_mask, pack_docs)):
        a_tps, a_peak, a_state = bench(ours, False, bf16, mask, docs)
        b_tps, b_peak, _ = bench(ref, True, bf16, mask, docs)
        mem = f", peak GPU memory ours {a_peak:.0f} MiB vs HF {b_peak:.0f} MiB" if a_peak else ""
        print(f"[{name}, {case}] ours {a_tps:,.0f} tok/s vs transformers {b_tps:,.0f} tok/s: ratio "
              f"{a_tps / b_tps:.2f}x{mem}")
        if mask is None:
            print(f"[{name}] matmul rate {rate / 1e9:,.0f} GFLOP/s; MFU ours {a_tps * flops_tok / rate:.1%}, "
                  f"transformers {b_tps * flops_tok / rate:.1%}")
print(f"1 process: params+grads+optimizer state {a_state / 2**20:.1f} MiB")
if not args.skip_fsdp and dev.type == "cpu":
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.abspath(__file__), "--fsdp-part", "--preset", args.preset, "--batch",
                          str(args.batch),
                          "--seq", str(args.seq)], env=env, capture_output=True, text=True)
    print(out.stdout.strip() or out.stderr[-2000:])
