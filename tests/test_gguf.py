"""hf_io.from_gguf: a GGUF file written here with gguf's own writer (as llama.cpp lays it out: q/k rows
permuted for llama, 2-D weights quantized or not) -> our HF-layout folder, against transformers' GGUF
loader."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")
from helpers import ROOT   # noqa: E402
from hf_io import CHAT_TEMPLATE, from_gguf, load_model, load_tokenizer, train_tokenizer   # noqa: E402

TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
           "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def hf_reference(kind, tied):
    torch.manual_seed(0)
    common = dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                  max_position_embeddings=256, rope_theta=5000.0, rms_norm_eps=1e-5)
    return common, (transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config)


def llama_cpp_permute(w, n_head):
    """What llama.cpp's converter does to a llama q/k weight (its interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, kind, tok_dir, qtype):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), kind)
    w.add_name("tiny test model")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") and
                         cfg.rope_parameters else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tj = json.load(open(tok_dir / "tokenizer.json"))
    vocab = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        base, _, kind_ = name.rpartition(".")
        layer = None
        if base.startswith("model.layers."):
            _, _, layer, base = base.split(".", 3)
        g = f"blk.{layer}.{TO_GGUF[base]}.{kind_}" if layer is not None else f"{TO_GGUF[base]}.{kind_}"
        a = t.detach().float().numpy()
        if kind == "llama" and base in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = cfg.num_attention_heads if "q_proj" in base else cfg.num_key_value_heads
            a = llama_cpp_permute(a, heads)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(g, gguf.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def transformers_gguf_logits(path, ids):
    """transformers' own GGUF load (the function from_pretrained(gguf_file=) calls), run in transformers."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    cfg = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    sd = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=m)["tensors"]
    m.load_state_dict(sd, strict=False)
    m.tie_weights()
    with torch.no_grad():
        return m.eval()(ids).logits


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_1"])
def test_from_gguf_matches_transformers(kind, tied, qtype, tmp_path):
    tok_dir = tmp_path / "tok"
    tok = train_tokenizer(["A patient presents with fever and a rash on the palms."] * 20 +
                          ["Which of the following is the most likely diagnosis?"] * 20, 300, str(tok_dir))
    common, cls = hf_reference(kind, tied)
    cfg = cls(**{**common, "vocab_size": len(tok)})
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():   # norms and biases away from their init, so a missed one would show
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    f = tmp_path / "tiny.gguf"
    write_gguf(f, ref.eval(), kind, tok_dir, q)
    out = tmp_path / "hf"
    from_gguf(str(f), str(out))
    ours, ours_tok = load_model(str(out)).eval(), load_tokenizer(str(out))
    text = "A patient presents with fever. Which is the most likely diagnosis?"
    assert ours_tok.encode(text) == tok.encode(text)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert ours_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        got = ours(ids)
    want = transformers_gguf_logits(f, ids)
    assert (got - want).abs().max() < 1e-4
    if qtype == "F32":   # nothing rounded: the model the file was written from, permutation undone
        with torch.no_grad():
            assert (got - ref(ids).logits).abs().max() < 1e-4
    info = json.load(open(out / "gguf_source.json"))
    assert info["name"] == "tiny test model" and qtype in info["tensor_types"]


def test_from_gguf_command_refuses_what_it_would_overwrite(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    for args, want in ((["nope.gguf", str(tmp_path / "new")], "nope.gguf: no such file"),
                       ([str(tmp_path / "x.gguf"), str(out)], "exists")):
        p = subprocess.run([sys.executable, "hf_io.py", "from-gguf", *args], cwd=ROOT, capture_output=True,
                           text=True)
        assert p.returncode == 1 and want in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
