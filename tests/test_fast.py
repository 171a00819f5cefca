"""fast.py against the textbook paths it replaces: each speed path gives their numbers (tokens, logits,
log-probs, gradients) up to float rounding."""
import gc
import weakref

import pytest
import torch

import fast
from common import cpu_has_native_bf16
from model import ModelConfig, Transformer
from train_grpo import completion_logprobs


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packing needs oneDNN")
def test_packed_fp32_linears():
    """fp32 weights packed for oneDNN: another summation order (close outputs), and nn.Linear's own forward
    back afterwards (the same tokens: tests/test_engine.py)."""
    lin = torch.nn.Linear(24, 40, bias=True)
    x = torch.randn(5, 1, 24)
    with fast.packed_linears(lin, 5, torch.float32):
        assert "forward" in vars(lin)
        packed = lin(x)
    assert "forward" not in vars(lin) and torch.allclose(packed, lin(x), atol=1e-5, rtol=1e-5)


def test_a_packed_linear_is_freed_with_its_last_reference():
    """No reference cycle through the packed forward: a tensor-parallel shard (tp.build packs its linears
    and keeps them) goes with its last reference, not at some later garbage collection."""
    lin = torch.nn.Linear(24, 40)
    fast.pack_linear(lin, 5, torch.float32)
    x = torch.randn(5, 24)
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5)
    ref = weakref.ref(lin)
    gc.disable()
    try:
        del lin
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 is packed only on CPUs with native bf16")
def test_packed_bf16_linears():
    """bf16: the packed matmul equals F.linear bit for bit."""
    lin = torch.nn.Linear(24, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(5, 1, 24, dtype=torch.bfloat16)
    with fast.packed_linears(lin, 5, torch.bfloat16):
        packed = lin(x)
    assert torch.equal(packed, lin(x))


@pytest.mark.parametrize("bucketed", [True, False])
def test_doc_attention_gradients_match_separate(bucketed, monkeypatch):
    """Packed rows (several documents each, as train_sft.py makes them): fast.doc_attention (per-document
    matmuls on a CPU) and the dense mask it falls back to for long documents give the gradients of each
    document run alone. Row 1 is one document with the same id (0) as the one that starts row 2: a row
    boundary must end a document."""
    attends = []
    real = fast.DocBuckets.attend
    monkeypatch.setattr(fast.DocBuckets, "attend", lambda self, *a: attends.append(1) or real(self, *a))
    if not bucketed:
        monkeypatch.setattr(fast.DocBuckets, "MAX_LEN", 0)
    lens = [[5, 7, 4], [16], [9, 7], [3, 3, 3, 3, 4]]
    cfg = ModelConfig.from_name("nano", vocab_size=61, model_type="qwen3", qk_norm=True, attention_bias=False)
    m = Transformer(cfg).init_weights(2)
    g = torch.Generator().manual_seed(0)
    docs = [[torch.randint(1, 61, (n,), generator=g).tolist() for n in row] for row in lens]
    ids = torch.tensor([sum(row, []) for row in docs])
    doc_ids = torch.tensor([[d for d, toks in enumerate(row) for _ in toks] for row in docs])
    w = torch.randn(ids.shape + (61,), generator=g)
    (m(ids, doc_ids=doc_ids, attention_mask=fast.doc_attention(doc_ids)) * w).sum().backward()
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


def score_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_of = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (11, 8, 7)]
    which, clens = [0, 0, 0, 0, 1, 1, 1, 1, 2], [3, 7, 1, 5, 6, 2, 4, 4, 9]
    prompts = [prompt_of[w] for w in which]
    outs = [torch.randint(3, 97, (c,), generator=g).tolist() for c in clens]
    return prompts, outs, torch.randn(len(outs), generator=g)


@pytest.mark.parametrize("bucketed", [True, False])
def test_fast_completion_logprobs_match_plain(bucketed, monkeypatch):
    """completion_logprobs with its speed paths (a group's completions behind one copy of their prompt; on a
    CPU one unpadded row with per-sequence attention, or padded rows under a dense mask for long sequences)
    against its textbook layout (--plain: one padded row per completion): the same log-probs, entropies and
    GRPO gradient, for share = 1, 2, 4 (full, partial and single-completion rows)."""
    if not bucketed:
        monkeypatch.setattr(fast.DocBuckets, "MAX_LEN", 0)
    prompts, outs, adv = score_case()
    grads = []
    for share in (None, 1, 2, 4):
        m = Transformer(ModelConfig.from_name("nano", vocab_size=97)).init_weights(0)
        if share is None:
            monkeypatch.setattr(fast, "ON", False)
            lp, mask, ent = completion_logprobs(m, prompts, outs, 4, want_entropy=True)
            monkeypatch.setattr(fast, "ON", True)
            want = (lp.detach(), mask, ent)
        else:
            lp, mask, ent = completion_logprobs(m, prompts, outs, share, want_entropy=True)
            assert torch.equal(mask, want[1])
            assert torch.allclose(lp.detach(), want[0], atol=1e-5) and torch.allclose(ent, want[2], atol=1e-4)
        (-(adv[:, None] * lp * mask).sum() / mask.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-6, rtol=1e-4)


def test_plain_completion_logprobs_by_hand(monkeypatch):
    """The textbook scoring: each completion's log-probs are those of a full forward of prompt + completion."""
    m = Transformer(ModelConfig.from_name("nano", vocab_size=97)).init_weights(0).eval()
    prompts, outs, _ = score_case(1)
    monkeypatch.setattr(fast, "ON", False)
    with torch.no_grad():
        lp, mask, _ = completion_logprobs(m, prompts, outs)
        for i, (p, o) in enumerate(zip(prompts, outs)):
            full = torch.log_softmax(m(torch.tensor([p + o]))[0].float(), -1)
            want = full[len(p) - 1:len(p) - 1 + len(o)].gather(-1, torch.tensor(o)[:, None])[:, 0]
            assert mask[i].sum() == len(o) and torch.allclose(lp[i, :len(o)], want, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_masks_match_dense_masks():
    """The attention packed rows get on CUDA (flex_attention; here on a CPU, forward only) gives the logits of
    the dense masks: packed SFT documents, and GRPO completions behind a shared prompt."""
    from model import doc_attention_mask
    m = Transformer(ModelConfig.from_name("nano", vocab_size=97,
                                          num_key_value_heads=2)).init_weights(0).eval()
    g = torch.Generator().manual_seed(0)
    T = 150
    docs = torch.tensor([[0] * 40 + [1] * 70 + [-1] * 40, [0] * 90 + [1] * 60])
    ids = torch.randint(0, 97, (2, T), generator=g)
    with torch.no_grad():
        pos = torch.arange(T).expand(2, T)
        eye = torch.eye(T, dtype=torch.bool)
        dense = m(ids, position_ids=pos, attention_mask=doc_attention_mask(docs) | eye)
        flex = m(ids, position_ids=pos, attention_mask=fast.FlexMask(docs))
        assert (flex - dense).abs().max() < 1e-4
        # a prompt, two completions, padding
        seg = torch.tensor([[0] * 50 + [1] * 30 + [2] * 45 + [-1] * 25])
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
        dense = m(ids[:1], position_ids=pos[:1], attention_mask=((same & causal) | eye)[:, None])
        flex = m(ids[:1], position_ids=pos[:1], attention_mask=fast.FlexMask(seg, shared_prefix=True))
        assert (flex - dense)[:, seg[0] >= 0].abs().max() < 1e-4


def test_plain_switch():
    """--plain: packed SFT rows take the dense mask."""
    try:
        fast.ON = False
        assert fast.doc_attention(torch.zeros(1, 8, dtype=torch.long)) is None
    finally:
        fast.ON = True
    assert fast.doc_attention(torch.zeros(1, 8, dtype=torch.long)) is not None
