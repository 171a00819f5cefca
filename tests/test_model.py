"""model.py against transformers: logits parity, checkpoint round trips, generation."""
import contextlib
import json
import os

import pytest
import torch
import transformers

import model as model_mod
from model import ModelConfig, Transformer, generate, load_model, prefill_buckets, save_model


def hf_model(kind, tied, tmp_path, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=88, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tied,
                  max_position_embeddings=256, rope_theta=5000.0)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        m = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(head_dim=12, **common)   # head_dim != hidden/heads on purpose
        m = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():   # random biases and norms too, so a missed one would show
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    m.eval()
    path = str(tmp_path / f"{kind}_{tied}")
    m.save_pretrained(path)
    return m, path


def ragged_batch(vocab, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [True, False])
def test_logits_parity_ragged(kind, tied, tmp_path):
    ref, path = hf_model(kind, tied, tmp_path)
    ours = load_model(path)
    assert ours.config.model_type == kind and ours.config.tie_word_embeddings == tied
    prompts = ragged_batch(97, [5, 17, 11, 1])
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):          # right padding: every row starts at position 0
        ids[i, :len(p)] = torch.tensor(p)
        am[i, :len(p)] = 1
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=am).logits
        b = ours(ids)
    for i, p in enumerate(prompts):
        assert (a[i, :len(p)] - b[i, :len(p)]).abs().max() <= 1e-4
    # left padding with an attention mask gives the same per-row logits
    ids_l = torch.zeros_like(ids)
    am_l = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids_l[i, T - len(p):] = torch.tensor(p)
        am_l[i, T - len(p):] = 1
    with torch.no_grad():
        c = ours(ids_l, attention_mask=am_l)
    for i, p in enumerate(prompts):
        assert (a[i, :len(p)] - c[i, T - len(p):]).abs().max() <= 1e-4


def test_packed_documents_match_separate(tmp_path):
    _, path = hf_model("qwen3", False, tmp_path)
    m = load_model(path)
    docs = ragged_batch(97, [7, 4, 9], seed=3)
    packed = torch.tensor([sum(docs, [])])
    doc_ids = torch.tensor([[i for i, d in enumerate(docs) for _ in d]])
    with torch.no_grad():
        lp = m(packed, doc_ids=doc_ids)[0]
        off = 0
        for d in docs:
            alone = m(torch.tensor([d]))[0]
            assert (lp[off:off + len(d)] - alone).abs().max() <= 1e-5
            off += len(d)


@pytest.mark.parametrize("bucketed", [True, False])
def test_packed_attention_gradients_match_separate(bucketed, monkeypatch):
    """Packed rows (several documents each, as train_sft.py makes them): the gradients must be those of each
    document run alone, through the CPU's per-document attention (model_mod.DocBuckets) and through the masked SDPA
    it falls back to for long documents. Row 1 is one document with the same id (0) as the document that starts
    row 2: a row boundary must end a document."""
    attends = []   # calls of the per-document path
    real = model_mod.DocBuckets.attend
    monkeypatch.setattr(model_mod.DocBuckets, "attend", lambda self, *a: attends.append(1) or real(self, *a))
    if not bucketed:
        monkeypatch.setattr(model_mod.DocBuckets, "MAX_LEN", 0)
    lens = [[5, 7, 4], [16], [9, 7], [3, 3, 3, 3, 4]]
    cfg = ModelConfig.from_name("nano", vocab_size=61, model_type="qwen3", qk_norm=True, attention_bias=False)
    m = Transformer(cfg).init_weights(2)
    g = torch.Generator().manual_seed(0)
    docs = [[torch.randint(1, 61, (n,), generator=g).tolist() for n in row] for row in lens]
    ids = torch.tensor([sum(row, []) for row in docs])
    doc_ids = torch.tensor([[d for d, toks in enumerate(row) for _ in toks] for row in docs])
    w = torch.randn(ids.shape + (61,), generator=g)
    (m(ids, doc_ids=doc_ids) * w).sum().backward()
    packed = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    total = 0
    for r, row in enumerate(docs):
        off = 0
        for toks in row:
            total = total + (m(torch.tensor([toks]))[0] * w[r, off:off + len(toks)]).sum()
            off += len(toks)
    total.backward()
    for n, p in m.named_parameters():
        assert (packed[n] - p.grad).abs().max() <= 1e-5 * (1 + p.grad.abs().max()), n
    assert len(attends) == (cfg.num_hidden_layers if bucketed else 0)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_save_model_loads_in_transformers(kind, tmp_path):
    cfg = ModelConfig(model_type=kind, vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=kind == "qwen2",
                      qk_norm=kind == "qwen3", tie_word_embeddings=(kind == "qwen2"), eos_token_id=2)
    ours = Transformer(cfg).init_weights(seed=4)
    path = str(tmp_path / "ours")
    save_model(ours, path)
    files = os.listdir(path)
    assert "model.safetensors" in files and "config.json" in files and "generation_config.json" in files
    assert not any(f.endswith(".tmp") for f in files)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor(ragged_batch(101, [13, 13], seed=5))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() <= 1e-5


def test_sharded_round_trip(tmp_path):
    cfg = ModelConfig.from_name("nano", vocab_size=300, tie_word_embeddings=False)
    m = Transformer(cfg).init_weights(seed=1)
    path = str(tmp_path / "sharded")
    save_model(m, path, max_shard_bytes=200_000)
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    m2 = load_model(path)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)   # transformers reads our shards too
    with torch.no_grad():
        assert (ref(ids).logits - m(ids)).abs().max() <= 1e-5


def test_bad_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_greedy_batch_matches_transformers_alone(kind, tmp_path):
    ref, path = hf_model(kind, kind == "qwen2", tmp_path, seed=7)
    ours = load_model(path)
    prompts = ragged_batch(97, [3, 12, 7, 1, 9], seed=8)
    new = 12
    outs, reasons = generate(ours, prompts, max_new_tokens=new, temperature=0.0)
    for p, o, r in zip(prompts, outs, reasons):
        want = ref.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                            pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):]
        assert o == want.tolist() and r == "length"


def test_bucketed_prefill(tmp_path):
    """Prefill in length buckets gives the same tokens as one left-padded (B, P) prefill; buckets cover every
    row once and keep their padding within the allowed share (or hold a single row)."""
    _, path = hf_model("qwen3", True, tmp_path, seed=21)
    m = load_model(path)
    lens = [3, 20, 4, 18, 9, 19, 1]
    prompts = ragged_batch(97, lens, seed=22)
    buckets = prefill_buckets(lens, waste=0.15)
    assert sorted(i for rows, _ in buckets for i in rows) == list(range(len(lens))) and len(buckets) > 1
    for rows, longest in buckets:
        assert longest == max(lens[i] for i in rows)
        assert len(rows) == 1 or len(rows) * longest <= 1.15 * sum(lens[i] for i in rows)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, num_samples=3, seed=5)):
        one = generate(m, prompts, max_new_tokens=10, waste=1e9, **kw)   # a single bucket: the plain padded prefill
        assert generate(m, prompts, max_new_tokens=10, **kw) == one


def test_stop_tokens_and_finish_reasons(tmp_path):
    ref, path = hf_model("qwen2", True, tmp_path, seed=9)
    ours = load_model(path)
    prompts = ragged_batch(97, [4, 8, 6, 5], seed=10)
    free, _ = generate(ours, prompts, max_new_tokens=10, temperature=0.0)
    stop = free[1][3]   # a token row 1 emits at step 3: row 1 must stop there
    outs, reasons = generate(ours, prompts, max_new_tokens=10, temperature=0.0, stop_ids=[stop])
    for f, o, r in zip(free, outs, reasons):
        if stop in f:
            k = f.index(stop)
            assert o == f[:k + 1] and r == "stop"
        else:
            assert o == f and r == "length"


def test_sampling_reproducible_and_group_case(tmp_path):
    _, path = hf_model("qwen3", False, tmp_path, seed=11)
    m = load_model(path)
    prompts = ragged_batch(97, [5, 9], seed=12)
    a = generate(m, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=20, num_samples=4, seed=3)
    b = generate(m, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=20, num_samples=4, seed=3)
    c = generate(m, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=20, num_samples=4, seed=4)
    assert a == b and a != c and len(a[0]) == 8
    # a prompt's samples depend on its seed only, not on the rest of the batch or its position
    alone = generate(m, prompts[1:], max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=20, num_samples=4, seed=[4])
    assert alone[0] == a[0][4:]
    assert len(set(map(tuple, a[0][:4]))) > 1   # the G samples of one prompt differ
    # greedy with G samples = the same greedy continuation G times, equal to the single-sample run
    g, _ = generate(m, prompts, max_new_tokens=8, temperature=0.0, num_samples=3)
    s, _ = generate(m, prompts, max_new_tokens=8, temperature=0.0)
    assert g[:3] == [s[0]] * 3 and g[3:] == [s[1]] * 3


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_fixed_shape_decoding_matches(kind, tmp_path):
    """generate(cuda_graph=True) decodes with fixed shapes (attention over the whole cache, a device-side slot,
    no row dropping), the form a CUDA graph captures; on CPU the same step runs eagerly and must give the same
    tokens and finish reasons as the default path, greedy and sampled, with rows stopping early."""
    _, path = hf_model(kind, False, tmp_path, seed=15)
    m = load_model(path)
    prompts = ragged_batch(97, [3, 14, 7, 9], seed=16)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, num_samples=3, seed=5, stop_ids=range(3, 20))):
        ref = generate(m, prompts, max_new_tokens=12, **kw)
        assert generate(m, prompts, max_new_tokens=12, cuda_graph=True, **kw) == ref
    assert "stop" in ref[1] and "length" in ref[1]   # the sampled case had rows finish early, and rows run out


def test_top_k_one_is_greedy(tmp_path):
    _, path = hf_model("qwen2", False, tmp_path, seed=13)
    m = load_model(path)
    prompts = ragged_batch(97, [6, 3], seed=14)
    assert generate(m, prompts, 6, temperature=0.7, top_k=1, seed=0)[0] == generate(m, prompts, 6, temperature=0.0)[0]


@pytest.mark.skipif(not model_mod.cpu_has_native_bf16(), reason="packing is used only on CPUs with native bf16")
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_packed_bf16_decoding_matches(kind, tmp_path, monkeypatch):
    """In bf16 on CPU, generate() decodes through weights pre-packed for oneDNN (model.packed_linears). The packed
    matmul must equal F.linear bit for bit, and generation must give the tokens it gives without packing, with bf16
    weights and with fp32 weights under bf16 autocast (the GRPO rollout case, whose KV cache is then bf16)."""
    _, path = hf_model(kind, False, tmp_path, seed=17)
    prompts = ragged_batch(97, [3, 14, 7, 9], seed=18)
    lin = model_mod.Linear(24, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(5, 1, 24, dtype=torch.bfloat16)
    with model_mod.packed_linears(lin, 5, torch.bfloat16):
        assert lin.packed is not None
        packed = lin(x)
    assert lin.packed is None and torch.equal(packed, lin(x))
    runs = []
    for dtype, amp in ((torch.bfloat16, False), (torch.float32, True)):
        m = load_model(path, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            runs.append(same_tokens_without_packing(m, prompts, monkeypatch))
    assert "stop" in runs[0][1][1] and "length" in runs[0][1][1]


def same_tokens_without_packing(m, prompts, monkeypatch):
    """Greedy and sampled generate() through the packed weights, then again with packing off: the same
    completions and finish reasons. Returns the runs."""
    kws = (dict(temperature=0.0), dict(temperature=1.0, num_samples=3, seed=5, stop_ids=range(3, 20)))
    runs = [generate(m, prompts, max_new_tokens=12, **kw) for kw in kws]
    with monkeypatch.context() as mp:
        mp.setattr(model_mod, "packed_linears", lambda *args: contextlib.nullcontext())
        assert [generate(m, prompts, max_new_tokens=12, **kw) for kw in kws] == runs
    return runs


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packing needs oneDNN")
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_packed_fp32_decoding_matches(kind, tmp_path, monkeypatch):
    """In fp32 on CPU, generate() also decodes through oneDNN-packed weights (MKL's fp32 matmul is 2-4x slower
    on some CPUs). Another summation order, so not bit-equal: close outputs, and the same tokens as without."""
    _, path = hf_model(kind, False, tmp_path, seed=19)
    prompts = ragged_batch(97, [3, 14, 7, 9], seed=20)
    lin = model_mod.Linear(24, 40, bias=True)
    x = torch.randn(5, 1, 24)
    with model_mod.packed_linears(lin, 5, torch.float32):
        assert lin.packed is not None and lin.packed[0].dtype == torch.float32
        packed = lin(x)
    assert lin.packed is None and torch.allclose(packed, lin(x), atol=1e-5, rtol=1e-5)
    same_tokens_without_packing(load_model(path), prompts, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_match_plain(dtype):
    """token_logprobs in chunks (each recomputed in backward) gives the plain full-logits log-softmax's values,
    entropies and gradients (hidden states and the tied lm_head/embedding weight); one chunk is the plain path."""
    from model import token_logprobs
    g = torch.Generator().manual_seed(0)
    m = Transformer(ModelConfig.from_name("nano", vocab_size=301)).init_weights(0)
    h0 = torch.randn(37, m.config.hidden_size, generator=g)
    t = torch.randint(0, 301, (37,), generator=g)
    w = torch.randn(37, generator=g)
    res = []
    for chunk in (0, 1, 8, 37, 100):
        m.zero_grad()
        h = h0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            lp, ent = token_logprobs(m.lm_head, h, t, chunk, want_entropy=True)
        (lp * w).sum().backward()
        res.append((lp.detach(), ent, h.grad, m.lm_head.weight.grad.clone()))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = m.lm_head(h0).float()
    full = torch.log_softmax(logits, -1)
    assert torch.equal(res[0][0], full.gather(-1, t[:, None])[:, 0])          # one chunk: the plain bits
    # fp32: summation order only (1e-6, relative above 1); bf16: each chunk's weight gradient is rounded to bf16
    # before the chunks are summed
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for lp, ent, gh, gw in res[1:]:
        for got, want in ((lp, res[0][0]), (ent, -(full.exp() * full).sum(-1)), (gh, res[0][2]), (gw, res[0][3])):
            assert (got - want).abs().max() <= tol * max(1.0, want.abs().max())
    assert res[0][3].abs().max() > 0


def test_flex_block_masks_match_dense_masks():
    """The block masks CUDA uses for packed rows (flex_attention; run here on CPU, forward only) give the logits
    of the dense masks: packed SFT documents, and GRPO completions behind a shared prompt."""
    from model import doc_attention_mask, flex_block_mask
    m = Transformer(ModelConfig.from_name("nano", vocab_size=97, num_key_value_heads=2)).init_weights(0).eval()
    g = torch.Generator().manual_seed(0)
    T = 150
    docs = torch.tensor([[0] * 40 + [1] * 70 + [-1] * 40, [0] * 90 + [1] * 60])
    ids = torch.randint(0, 97, (2, T), generator=g)
    with torch.no_grad():
        pos = torch.arange(T).expand(2, T)
        dense = m(ids, position_ids=pos, attention_mask=doc_attention_mask(docs) | torch.eye(T, dtype=torch.bool))
        flex = m(ids, position_ids=pos, attention_mask=flex_block_mask(docs))
        assert (flex - dense).abs().max() < 1e-4
        seg = torch.tensor([[0] * 50 + [1] * 30 + [2] * 45 + [-1] * 25])   # a prompt, two completions, padding
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
        dense = m(ids[:1], position_ids=pos[:1], attention_mask=((same & causal) | torch.eye(T, dtype=torch.bool))[:, None])
        flex = m(ids[:1], position_ids=pos[:1], attention_mask=flex_block_mask(seg, shared_prefix=True))
        real = seg[0] >= 0
        assert (flex - dense)[:, real].abs().max() < 1e-4


def test_config_defaults_follow_transformers(tmp_path):
    """config.json without tie_word_embeddings: untied, as transformers reads it for qwen2 / qwen3 / llama (the
    file's lm_head is used, not dropped). What is not implemented is refused by name."""
    cfg = ModelConfig.from_name("nano", vocab_size=97, tie_word_embeddings=False)
    path = tmp_path / "untied"
    save_model(Transformer(cfg).init_weights(0), str(path))
    d = json.load(open(path / "config.json"))
    del d["tie_word_embeddings"]
    (path / "config.json").write_text(json.dumps(d))
    ours = load_model(str(path))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert not ours.config.tie_word_embeddings and (ref(ids).logits - ours(ids)).abs().max() < 1e-5
    for change, message in ((dict(hidden_act="gelu"), "hidden_act 'gelu' is not implemented"),
                            (dict(use_sliding_window=True, sliding_window=64), "sliding-window attention")):
        (path / "config.json").write_text(json.dumps({**d, **change}))
        with pytest.raises(ValueError, match=message):
            load_model(str(path))
    (path / "config.json").write_text(json.dumps({**d, "use_sliding_window": True, "sliding_window": 1 << 20}))
    load_model(str(path))   # a window longer than the context is plain attention


def test_generate_leaves_the_global_rng_alone(tmp_path):
    m = Transformer(ModelConfig.from_name("nano", vocab_size=97)).init_weights(0)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    for temperature in (0.0, 1.0):
        generate(m, [[1, 2, 3]], max_new_tokens=4, temperature=temperature, seed=None)
        assert torch.equal(torch.get_rng_state(), state), temperature
