"""model.py and hf_io.py against transformers: logits parity, checkpoint round trips, the plain generate."""
import json
import os

import pytest
import torch
import transformers

from hf_io import load_model, save_model
from model import ModelConfig, Transformer, generate, seed_of
from model import SamplingParams as SP


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


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_save_model_loads_in_transformers(kind, tmp_path):
    cfg = ModelConfig(model_type=kind, vocab_size=101, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2,
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
    outs, reasons = generate(ours, prompts, SP(new, temperature=0.0))
    for p, o, r in zip(prompts, outs, reasons):
        want = ref.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                            pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))[0,
                                                                                                    len(p):]
        assert o == want.tolist() and r == "length"


def test_stop_tokens_and_finish_reasons(tmp_path):
    ref, path = hf_model("qwen2", True, tmp_path, seed=9)
    ours = load_model(path)
    prompts = ragged_batch(97, [4, 8, 6, 5], seed=10)
    free, _ = generate(ours, prompts, SP(10, temperature=0.0))
    stop = free[1][3]   # a token row 1 emits at step 3: row 1 must stop there
    outs, reasons = generate(ours, prompts, SP(10, temperature=0.0, stop_ids=(stop,)))
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
    sp = SP(8, temperature=1.0, top_p=0.9, top_k=20, num_samples=4)
    a, b, c = generate(m, prompts, sp, 3), generate(m, prompts, sp, 3), generate(m, prompts, sp, 4)
    assert a == b and a != c and len(a[0]) == 8
    # a prompt's samples depend on its seed only, not on the rest of the batch or its position
    alone = generate(m, prompts[1:], sp, [seed_of(3, 1)])
    assert alone[0] == a[0][4:]
    assert len(set(map(tuple, a[0][:4]))) > 1   # the G samples of one prompt differ
    # greedy with G samples = the same greedy continuation G times, equal to the single-sample run
    g, _ = generate(m, prompts, SP(8, temperature=0.0, num_samples=3))
    s, _ = generate(m, prompts, SP(8, temperature=0.0))
    assert g[:3] == [s[0]] * 3 and g[3:] == [s[1]] * 3


def test_top_k_one_is_greedy(tmp_path):
    _, path = hf_model("qwen2", False, tmp_path, seed=13)
    m = load_model(path)
    prompts = ragged_batch(97, [6, 3], seed=14)
    assert generate(m, prompts, SP(6, temperature=0.7, top_k=1), 0)[0] == generate(m, prompts, SP(6, 0.0))[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_match_plain(dtype):
    """token_logprobs in chunks (each recomputed in backward) gives the plain full-logits log-softmax's
    values, entropies and gradients (hidden states and the tied lm_head/embedding weight); one chunk is
    the plain path."""
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
    # fp32: summation order only (1e-6, relative above 1); bf16: each chunk's weight gradient is rounded to
    # bf16 before the chunks are summed
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for lp, ent, gh, gw in res[1:]:
        for got, want in ((lp, res[0][0]), (ent, -(full.exp() * full).sum(-1)), (gh, res[0][2]), (gw,
                                                                                                  res[0][3])):
            assert (got - want).abs().max() <= tol * max(1.0, want.abs().max())
    assert res[0][3].abs().max() > 0


def test_config_defaults_follow_transformers(tmp_path):
    """config.json without tie_word_embeddings: untied, as transformers reads it for qwen2 / qwen3 / llama
    (the file's lm_head is used, not dropped). What is not implemented is refused by name."""
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
    (path / "config.json").write_text(json.dumps({**d, "use_sliding_window": True,
                                                  "sliding_window": 1 << 20}))
    load_model(str(path))   # a window longer than the context is plain attention


def test_generate_leaves_the_global_rng_alone(tmp_path):
    m = Transformer(ModelConfig.from_name("nano", vocab_size=97)).init_weights(0)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    for temperature in (0.0, 1.0):
        generate(m, [[1, 2, 3]], SP(4, temperature), seed=None)
        assert torch.equal(torch.get_rng_state(), state), temperature


@pytest.mark.parametrize("temperature,top_k,top_p,keep", [(1.0, 0, 1.0, 6), (0.7, 4, 1.0, 4), (1.0, 0, 0.8, 3)])
def test_sampler_draws_the_filtered_softmax(temperature, top_k, top_p, keep):
    """sample_next over 40,000 row seeds: each token's frequency within 5 standard errors of its probability
    under softmax(logits / T) renormalised over the tokens top-k / top-p keep (written out here), and the
    tokens they drop never drawn."""
    from model import sample_next
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    p = torch.softmax(logits.double() / temperature, -1)
    # top-p keeps the smallest prefix (largest first) whose mass reaches top_p: here 0.55 + 0.20 + 0.12
    p[keep:] = 0
    p /= p.sum()
    tok = sample_next(logits.expand(n, -1), temperature, top_k, top_p, torch.arange(n), step=3)
    freq = torch.bincount(tok, minlength=6).double() / n
    assert (freq[keep:] == 0).all()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)


def test_sampling_noise_is_the_hash_written_in_python():
    """row_keys and gumbel_noise against the same hashes in Python's unbounded integers (splitmix64 of (seed,
    step), murmur3's finaliser of (key xor token * golden ratio)): tensor arithmetic must wrap as the hash
    wants, on every platform, or the same seeds would sample other tokens elsewhere."""
    import math
    from model import gumbel_noise, row_keys
    M64, M32 = (1 << 64) - 1, (1 << 32) - 1

    def key(seed, step):
        x = (seed * 0x9E3779B97F4A7C15 + step * 0xD1B54A32D192ED03) & M64
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x = ((x ^ (x >> shift)) * mult) & M64
        return (x ^ (x >> 31)) >> 32

    def noise(k, i):
        x = k ^ ((i * 0x9E3779B9) & M32)
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & M32
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & M32
        x ^= x >> 16
        v = ((x >> 1) + 0.5) * 2.0 ** -31
        return -math.log(-math.log1p(-v))

    seeds, steps = torch.tensor([0, 1, 2 ** 40 + 5, -3]), torch.tensor([0, 7, 123, 5])
    keys = row_keys(seeds, steps)
    assert [k & M32 for k in keys.tolist()] == [key(s, t) for s, t in zip(seeds.tolist(), steps.tolist())]
    g = gumbel_noise(keys, 151_936)
    for b, k in enumerate(keys.tolist()):
        for i in (0, 1, 8191, 151_935):
            assert abs(g[b, i].item() - noise(k & M32, i)) < 1e-5 * (1 + abs(noise(k & M32, i)))
