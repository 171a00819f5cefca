"""
The rollout engine (engine.generate: continuous batching over S slots) against the static batches it replaced
(bench/static.py: eager, which drops finished rows, and fixed-shape, the CUDA-graph form), the textbook
model.generate and transformers' generate, on the same weights, requests and seeds, all in one run. Output
lengths come from a scripted stop schedule (a budget per request, no stop token; transformers gets an EOS
forced at the same length),
so every side does exactly the same work. At the same memory: the static sides get the engine's KV cache
(S rows x context), so they run S rows at a time; the all-rows-at-once static runs (S x more cache) are
printed below them for reference.

    python bench/rollout.py                     # CPU, 20m preset, fp32: both shapes, 3 rounds (~6 min)
    python bench/rollout.py --shape grpo --slots 64
    python bench/rollout.py --model models/SmolLM2-135M-Instruct --shape grpo --prompts 8 --group 8 \
        --max-new 192 --slots 64 --repeat 1        # a real checkpoint's weights (GRPO's default step)
    python bench/rollout.py --device cuda --dtype bfloat16 --preset qwen2.5-0.5b --shape nano \
        --requests 256 --min-len 100 --max-len 1024 --slots 256 --cuda-graph     # Nano-vLLM's shape

Shapes: nano (Nano-vLLM's benchmark scaled down: --requests prompts, prompt and output lengths uniform in
[--min-len, --max-len]); grpo (--prompts x --group samples, output lengths log-normal with median
--max-new / 4 and sigma --sigma, clipped at --max-new). Prints output tokens/s, decode forward passes and
slot use (decoded tokens / rows computed over all decode passes; each row's first token comes from the
prefill) for each side, and the engine's ratios; on CUDA also the engine's decode against the HBM
roofline (the weights read once per pass plus each token's KV context).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import static  # noqa: E402
from hf_io import load_model, read_config, save_model  # noqa: E402
from model import PRESETS, ModelConfig, SamplingParams, Transformer  # noqa: E402
from model import generate as model_generate  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--preset", default="20m", choices=list(PRESETS), help="model preset (random weights)")
ap.add_argument("--model", default=None, help="an HF-layout checkpoint folder instead of a preset (real "
                "weights)")
ap.add_argument("--device", default="cpu", help="cpu or cuda")
ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
ap.add_argument("--shape", default="both", choices=["nano", "grpo", "both"], help="request shape")
ap.add_argument("--slots", type=int, default=0, help="engine slots = the static sides' rows at a time "
                "(default: nano 16, grpo 32)")
ap.add_argument("--engine-slots", type=int, default=0, help="the engine's slots when they differ from the static "
                "sides' rows (more memory for the engine: what more rows a pass buy)")
ap.add_argument("--requests", type=int, default=64, help="nano: requests")
ap.add_argument("--min-len", type=int, default=16, help="nano: shortest prompt and output")
ap.add_argument("--max-len", type=int, default=256, help="nano: longest prompt and output")
ap.add_argument("--prompts", type=int, default=16, help="grpo: prompts")
ap.add_argument("--group", type=int, default=8, help="grpo: samples per prompt (G)")
ap.add_argument("--prompt-len", type=int, default=128, help="grpo: mean prompt length (uniform +-50 %%)")
ap.add_argument("--max-new", type=int, default=256, help="grpo: completion budget")
ap.add_argument("--sigma", type=float, default=0.7, help="grpo: log-normal sigma of the output lengths "
                "(0.7: the fixed-shape path then spends ~70 %% of its slot-steps on finished rows at 128 "
                "rows, the case of a 2,048-token budget with a 500-token median)")
ap.add_argument("--no-hf", action="store_true", help="leave transformers out")
ap.add_argument("--no-all-rows", action="store_true", help="leave out the all-rows-at-once static runs")
ap.add_argument("--cuda-graph", action="store_true", help="CUDA: the engine and the fixed-shape path as CUDA "
                "graph replays")
ap.add_argument("--hbm-tbs", type=float, default=None, help="HBM TB/s for the roofline (default: from the "
                "device name, bench/scale.py's table)")
ap.add_argument("--repeat", type=int, default=3, help="rounds: every side runs once a round, in alternating "
                "order, and its best round is reported (a shared or throttled machine's noise only adds time)")
ap.add_argument("--seed", type=int, default=0, help="seed for weights, lengths and sampling")
args = ap.parse_args()

dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
cuda = dev.type == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
if args.model:
    tmp, cfg = args.model, read_config(args.model)
else:
    cfg, tmp = ModelConfig.from_name(args.preset), tempfile.mkdtemp(prefix="bench_rollout_")
    save_model(Transformer(cfg).init_weights(args.seed), tmp)
ours = load_model(tmp, device=args.device, dtype=dtype).eval()
g = torch.Generator().manual_seed(args.seed)


def uniform(lo, hi, n):
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


def shapes():
    """(name, prompts, G, per-row budgets, slots)."""
    out = []
    if args.shape in ("nano", "both"):
        prompts = [torch.randint(10, cfg.vocab_size, (n,), generator=g).tolist()
                   for n in uniform(args.min_len, args.max_len, args.requests)]
        out.append((f"nano: {args.requests} requests, prompt and output uniform in "
                    f"{args.min_len}-{args.max_len}", prompts, 1,
                    uniform(args.min_len, args.max_len, args.requests), args.slots or 16))
    if args.shape in ("grpo", "both"):
        lo, hi = args.prompt_len // 2, args.prompt_len * 3 // 2
        prompts = [torch.randint(10, cfg.vocab_size, (n,), generator=g).tolist()
                   for n in uniform(lo, hi, args.prompts)]
        n = args.prompts * args.group
        z = torch.randn(n, generator=g, dtype=torch.float64)
        lens = (args.max_new / 4 * torch.exp(args.sigma * z)).round().clamp(1, args.max_new).long().tolist()
        out.append((f"grpo: {args.prompts} prompts x G={args.group}, output log-normal (median "
                    f"{args.max_new // 4}, sigma {args.sigma}) clipped at {args.max_new}", prompts,
                    args.group, lens, args.slots or 32))
    return out


def hf_generate(ref, prompts, G, budgets):
    """transformers' generate on one static batch, each row's EOS forced at its scripted length."""
    from transformers import LogitsProcessor, LogitsProcessorList
    rows = [p for p in prompts for _ in range(G)]
    P = max(map(len, rows))
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        ids[i, P - len(p):], am[i, P - len(p):] = torch.tensor(p), 1
    want = torch.tensor(budgets, device=dev)

    class Script(LogitsProcessor):
        def __call__(self, input_ids, scores):
            n = input_ids.shape[1] - P                    # tokens generated so far
            scores[:, 0] = float("-inf")                  # no EOS before the scripted length...
            end = want - 1 == n
            scores[end] = float("-inf")
            scores[end, 0] = 0.0                          # ...and EOS at it
            return scores
    with torch.no_grad():
        ref.generate(ids.to(dev), attention_mask=am.to(dev), max_new_tokens=max(budgets), do_sample=True,
                     temperature=1.0, top_k=0, top_p=1.0, eos_token_id=0, pad_token_id=0,
                     logits_processor=LogitsProcessorList([Script()]))
    steps = max(budgets) - 1
    return dict(passes=steps, row_steps=steps * len(rows))


def chunked(fn, prompts, G, budgets, per_call):
    """fn(prompts, budgets, seeds, stats) over the requests per_call rows at a time (whole prompts, each with
    its own seed, so a call's split changes no token); the counters added up."""
    k = max(1, per_call // G)
    total, outs = {}, []
    for i in range(0, len(prompts), k):
        st = {}
        seeds = [args.seed + j for j in range(i, min(i + k, len(prompts)))]
        outs += fn(prompts[i:i + k], budgets[i * G:(i + k) * G], seeds, st) or []
        for key, v in st.items():
            total[key] = total.get(key, 0) + v
    return total, outs


def timed(fn):
    sync()
    t = time.perf_counter()
    r = fn()
    sync()
    return time.perf_counter() - t, r


def run_shape(name, prompts, G, budgets, S, ref):
    tokens, N = sum(budgets), len(budgets)
    ctx = sum(len(prompts[r // G]) * b + b * (b - 1) / 2 for r, b in enumerate(budgets))   # KV tokens read
    E = args.engine_slots or S
    print(f"\n{name}; {N} rows, {tokens:,} output tokens; {E} engine slots, {S} static rows a call")

    def sp(bs):
        return SamplingParams(bs, 1.0, num_samples=G)

    def eng(ps, bs, seeds, st):
        return engine.generate(ours, ps, sp(bs), seeds, E, args.cuda_graph, stats=st)[0]

    def stat(graph):
        return lambda ps, bs, seeds, st: static.generate(ours, ps, sp(bs), seeds, graph, st)[0]

    def textbook(ps, bs, seeds, st):   # one static batch a call, nothing dropped: every row to the longest
        out = model_generate(ours, ps, sp(bs), seeds)[0]
        st.update(passes=max(bs) - 1, row_steps=(max(bs) - 1) * len(bs))
        return out
    sides = [("engine", lambda: chunked(eng, prompts, G, budgets, N)),
             (f"static eager, {S} rows a call", lambda: chunked(stat(False), prompts, G, budgets, S)),
             (f"static fixed-shape, {S} rows a call", lambda: chunked(stat(True), prompts, G, budgets, S)),
             (f"model.generate, {S} rows a call", lambda: chunked(textbook, prompts, G, budgets, S))]
    if ref is not None:
        sides.append((f"transformers, {S} rows a call", lambda: chunked(
            lambda ps, bs, _, st: st.update(hf_generate(ref, ps, G, bs)), prompts, G, budgets, S)))
    if not args.no_all_rows:
        sides += [(f"  static eager, all {N} rows at once",
                   lambda: chunked(stat(False), prompts, G, budgets, N)),
                  (f"  static fixed-shape, all {N} rows",
                   lambda: chunked(stat(True), prompts, G, budgets, N))]
    # warm-up (kernels, CUDA graph memory pools) on a few requests
    engine.generate(ours, prompts[:2], sp(8), 0, 2, args.cuda_graph)
    static.generate(ours, prompts[:2], sp(8), 0, True)
    best, spread, counts = {}, {}, {}
    for rnd in range(args.repeat):   # alternating order: a drift of the machine's speed hits every side
        for side, fn in (sides if rnd % 2 == 0 else sides[::-1]):
            dt, (st, outs) = timed(fn)
            best[side], counts[side] = min(best.get(side, dt), dt), st
            spread[side] = max(spread.get(side, dt), dt)
            if side == "engine":
                eng_outs = outs
            elif side.startswith("static eager, ") and rnd == 0:
                same = eng_outs == outs
    print(f"{'side':<40}{'tok/s':>10}{'seconds':>9}{'worst':>7}{'passes':>8}{'slot use':>10}   (best of "
          f"{args.repeat} rounds)")
    res = {}
    for side, _ in sides:
        dt, st = best[side], counts[side]
        res[side] = (tokens / dt, st["passes"])
        use = (tokens - N) / max(1, st["row_steps"])
        print(f"{side:<40}{tokens / dt:>10,.0f}{dt:>9.2f}{spread[side]:>7.2f}{st['passes']:>8}{use:>10.1%}")
    print(f"engine tokens == static eager tokens: {same}")
    e, p = res["engine"]
    for side, (tps, passes) in res.items():
        if side != "engine":
            print(f"engine vs {side.strip()}: {e / tps:.2f}x tokens/s, {p / passes:.2f}x decode passes")
    if cuda:
        from scale import DEVICES
        bw = args.hbm_tbs or next((b / 1e12 for key, _, b in DEVICES if key in torch.cuda.get_device_name()),
                                  None)
        if bw:
            w = sum(t.numel() * t.element_size() for t in ours.parameters())
            kv_tok = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
            roof = tokens / ((p * w + ctx * kv_tok) / (bw * 1e12))
            print(f"engine decode: {e:,.0f} tokens/s = {e / roof:.1%} of the HBM roofline ({roof:,.0f} "
                  f"tokens/s for its {p} passes at {bw:.2f} TB/s: the weights once a pass + each token's KV "
                  "context)")


ref = None
if not args.no_hf:
    import transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(dev).eval()
print(f"model {args.model or args.preset}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, "
      f"{args.device}, "
      f"{args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
      f"cuda graph {args.cuda_graph}")
for shape in shapes():
    run_shape(*shape, ref)
