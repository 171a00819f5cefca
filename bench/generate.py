"""
Our KV-cached generate (engine.generate, every row in a slot) vs transformers generate() on the same weights,
prompts and lengths.

    python bench/generate.py                      # CPU defaults: ~20M params, batch 16, 64 new tokens
    python bench/generate.py --device cuda --dtype bfloat16 --batch 64 --new 256
    python bench/generate.py --dtype bfloat16 --profile 15     # and where ours spends its time

Prints tokens/s for both and the ratio (ours / transformers); the reference runs in the same process.
By default fp32, then bf16 where it is native (a CPU with AVX512-BF16/AMX, or CUDA): both models hold
their weights in that dtype.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cpu_has_native_bf16  # noqa: E402
from engine import generate  # noqa: E402
from hf_io import load_model, save_model  # noqa: E402
from model import PRESETS, ModelConfig, SamplingParams, Transformer  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--preset", default="20m", choices=list(PRESETS), help="model preset (20m ~ 20M "
                "parameters)")
ap.add_argument("--batch", type=int, default=16, help="distinct prompts in the batch")
ap.add_argument("--group", type=int, default=8, help="G for the one-prompt-G-samples case")
ap.add_argument("--new", type=int, default=64, help="new tokens per row (no stop token, "
                "so every row runs to the end)")
ap.add_argument("--device", default="cpu", help="cpu or cuda")
ap.add_argument("--dtype", default="auto", help="float32, bfloat16, or auto (float32, "
                "then bfloat16 where native)")
ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is kept")
ap.add_argument("--seed", type=int, default=0, help="seed for weights and prompts")
ap.add_argument("--cuda-graph", action="store_true", help="also time ours with generate(cuda_graph=True): "
                "fixed shapes, and on CUDA one graph replay per decode step")
ap.add_argument("--profile", type=int, default=0, metavar="N", help="also print the top N ops "
                "of one call of ours per case (torch.profiler; on CUDA by GPU time, then by CPU time, which "
                "shows a launch-bound loop)")
args = ap.parse_args()

import transformers  # noqa: E402

torch.manual_seed(args.seed)
cfg = ModelConfig.from_name(args.preset)
tmp = tempfile.mkdtemp()
save_model(Transformer(cfg).init_weights(args.seed), tmp)
g = torch.Generator().manual_seed(args.seed)
prompts = [torch.randint(10, cfg.vocab_size, (int(n),), generator=g).tolist()
           for n in torch.randint(16, 96, (args.batch,), generator=g)]


def sync():
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(fn):
    fn()  # warm-up
    times = []
    for _ in range(args.repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def hf_batch(ref, ps, **kw):
    P = max(map(len, ps))
    ids = torch.zeros(len(ps), P, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(ps):
        ids[i, P - len(p):] = torch.tensor(p)
        am[i, P - len(p):] = 1
    with torch.no_grad():
        return ref.generate(ids.to(args.device), attention_mask=am.to(args.device), max_new_tokens=args.new,
                            min_new_tokens=args.new, eos_token_id=None, pad_token_id=0, **kw)


def run(dtype):
    ours = load_model(tmp, device=args.device, dtype=dtype).eval()   # the very weights transformers loads
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"model {args.preset}: {n_params / 1e6:.1f}M params, device {args.device}, dtype {dtype}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, threads "
          f"{torch.get_num_threads()}")
    cases = [  # (name, tokens, ours (cuda_graph=False/True), transformers)
        # many prompts, as in evaluation
        (f"batch {args.batch} ragged prompts, greedy", args.batch * args.new,
         lambda graph=False: generate(ours, prompts, SamplingParams(args.new, 0.0), cuda_graph=graph),
         lambda: hf_batch(ref, prompts, do_sample=False)),
        (f"1 prompt x G={args.group} samples", args.group * args.new,            # GRPO rollouts
         lambda graph=False: generate(ours, prompts[:1], SamplingParams(args.new, 1.0, num_samples=args.group),
                                      seed=1, cuda_graph=graph),
         lambda: hf_batch(ref, prompts[:1], do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          num_return_sequences=args.group))]
    rows = [(name, ntok, best_of(ours_fn), best_of(ref_fn),
             best_of(lambda: ours_fn(True)) if args.cuda_graph else 0)
            for name, ntok, ours_fn, ref_fn in cases]
    print(f"{'case':<36}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>8}" +
          (f"{'ours+graph tok/s':>18}{'ratio':>8}" if args.cuda_graph else ""))
    for name, ntok, a, b, c in rows:
        print(f"{name:<36}{ntok / a:>12.0f}{ntok / b:>12.0f}{b / a:>7.2f}x"
              + (f"{ntok / c:>18.0f}{b / c:>7.2f}x" if c else ""))
    if args.cuda_graph:
        same = [ours_fn() == ours_fn(True) for _, _, ours_fn, _ in cases]
        print(f"cuda_graph=True gives the same tokens as the default path: {same}")
    if args.profile:
        profile_ours(cases, dtype)


def profile_ours(cases, dtype):
    from torch.profiler import ProfilerActivity, profile
    cuda = args.device.startswith("cuda")
    for name, _, ours_fn, _ in cases:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            ours_fn()
            sync()
        print(f"profile of ours, {name}, {dtype}:")
        for key in (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
            print(prof.key_averages().table(sort_by=key, row_limit=args.profile))


if args.dtype == "auto":
    native = args.device.startswith("cuda") or cpu_has_native_bf16()
    dtypes = [torch.float32] + ([torch.bfloat16] if native else [])
    if not native:
        print("bf16: skipped (this CPU has no native bf16)")
else:
    dtypes = [getattr(torch, args.dtype)]
for dt in dtypes:
    run(dt)
