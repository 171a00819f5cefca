"""
CUDA path checks (run on a GPU machine): logits parity with transformers in fp32 and bf16, greedy generation
equal to transformers' on the same GPU, engine.generate (and its CUDA graph) equal to model.generate, and
packed
(doc_ids) rows through flex_attention (fast.doc_attention) equal to each document alone.

    python bench/cuda_check.py
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import transformers  # noqa: E402

import engine  # noqa: E402
import fast  # noqa: E402
import model as M  # noqa: E402
from hf_io import load_model  # noqa: E402

assert torch.cuda.is_available(), "needs a CUDA device"
print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}")
torch.manual_seed(0)
for kind in ("qwen2", "qwen3"):
    Cfg = transformers.Qwen2Config if kind == "qwen2" else transformers.Qwen3Config
    hf_cfg = Cfg(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=8,
                 num_key_value_heads=2, tie_word_embeddings=kind == "qwen2", max_position_embeddings=1024)
    ref = (transformers.Qwen2ForCausalLM if kind == "qwen2" else transformers.Qwen3ForCausalLM)(hf_cfg).eval()
    path = tempfile.mkdtemp()
    ref.save_pretrained(path)
    ids = torch.randint(3, 1000, (4, 96), device="cuda")
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.15)):
        r = ref.to("cuda", dtype)
        ours = load_model(path, device="cuda", dtype=dtype)
        with torch.no_grad():
            d = (r(ids).logits.float() - ours(ids).float()).abs().max().item()
        print(f"{kind} {str(dtype):>15}: max |logit diff| vs transformers {d:.2e} "
              f"({'ok' if d <= tol else 'FAIL'} <= {tol})")
    # a fresh copy: the loop above moved ref to bf16 in place (Module.to), and back to fp32 keeps the rounding
    r = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    ours = load_model(path, device="cuda", dtype=torch.float32)
    prompts = [torch.randint(3, 1000, (n,)).tolist() for n in (5, 40, 17)]
    outs, _ = M.generate(ours, prompts, M.SamplingParams(24, 0.0))
    theirs = [r.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False,
                         eos_token_id=None,
                         pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    # where they differ: is each of our tokens an argmax of transformers' own logits on our sequence, up to
    # float noise? (random weights give near-flat logits, so a 1e-6 difference can flip a near-tie)
    gaps = []
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            lg = r(torch.tensor([p + o], device="cuda")).logits[0, len(p) - 1:-1].float()
            chosen = lg.gather(-1, torch.tensor(o, device="cuda")[:, None])[:, 0]
            gaps.append((lg.max(-1).values - chosen).max().item())
    first = [next((i for i, (a, b) in enumerate(zip(o, t)) if a != b), None) for o, t in zip(outs, theirs)]
    print(f"{kind} greedy generation (ragged batch) == transformers per prompt: {outs == theirs} (first "
          "difference at "
          f"step {first}); worst gap of our token below transformers' max logit {max(gaps):.1e} "
          f"({'ok' if max(gaps) <= 1e-4 else 'FAIL'} <= 1e-4)")
    # the rollout engine, eager and with each decode step a CUDA graph (engine.fixed_shape_step), against
    # model.generate
    sps = ((M.SamplingParams(24, 0.0), None),
           (M.SamplingParams(24, 1.0, num_samples=4, stop_ids=tuple(range(3, 60))), 3))
    same = [[engine.generate(ours, prompts, sp, seed, 4, g) == M.generate(ours, prompts, sp, seed)
             for sp, seed in sps] for g in (False, True)]
    print(f"{kind} engine.generate == model.generate, greedy / sampled with early stops: eager {same[0]}, "
          f"CUDA graph {same[1]}")
    docs = [torch.randint(3, 1000, (n,)).tolist() for n in (30, 50, 20)]
    packed = torch.tensor([sum(docs, [])], device="cuda")
    doc_ids = torch.tensor([[i for i, d in enumerate(docs) for _ in d]], device="cuda")
    ob = load_model(path, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lp = ob(packed, doc_ids=doc_ids, attention_mask=fast.doc_attention(doc_ids))[0].float()
        alone = torch.cat([ob(torch.tensor([d], device="cuda"))[0].float() for d in docs])
    print(f"{kind} packed bf16 (flex_attention) vs separate: max diff {(lp - alone).abs().max().item():.2e}")
