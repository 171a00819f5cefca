"""
hf_io.py: the Hugging Face layout on disk: config.json, safetensors (one file or shards + index),
tokenizers.

    from hf_io import load_model, save_model, load_tokenizer
    model = load_model("/models/Qwen2.5-7B-Instruct", dtype=torch.bfloat16)   # a Qwen2/Qwen3 folder
    save_model(model, "runs/export")                                        # loads in transformers and vLLM

Weights are read with plain file reads of their byte ranges (safetensors_index, read_rows), straight into
the model's own tensors: loading holds the model's bytes once, and fsdp.load_sharded reads only a rank's
rows.
"""
import json
import math
import os
import re

import torch

from model import ModelConfig, Transformer, fused_projections, hf_to_ours, ours_to_hf


def _atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


# config.json <-> ModelConfig


def config_from_hf(d, path="config.json"):
    """Build from a transformers config.json dict (transformers 4.x or 5.x)."""
    model_type = d.get("model_type", "qwen2")
    if model_type not in ("qwen2", "qwen3", "llama"):
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (qwen2, qwen3, llama)")
    # transformers 5 writes rope_parameters={rope_theta, rope_type}; 4.x wrote rope_theta (+ rope_scaling)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"{path}: rope_type {rope_type!r} is not implemented (only default RoPE)")
    rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {d['hidden_act']!r} is not implemented (only silu)")
    window, context = d.get("sliding_window"), d.get("max_position_embeddings", 2048)
    if (d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or [])) and window \
            and window < context:
        raise ValueError(f"{path}: sliding-window attention ({window} of {context} positions) is not "
                         f"implemented")
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    return ModelConfig(
        model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim") or 0, rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
        max_position_embeddings=context,
        tie_word_embeddings=d.get("tie_word_embeddings", False),   # transformers' default for all three
        attention_bias=d.get("attention_bias", model_type == "qwen2"),
        qk_norm=(model_type == "qwen3"), bos_token_id=d.get("bos_token_id"), eos_token_id=eos,
        pad_token_id=d.get("pad_token_id"))


def config_to_hf(cfg, dtype="float32"):
    """The config.json transformers (4.x and 5.x) and vLLM read for this config."""
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
    d = dict(architectures=[arch[cfg.model_type]], model_type=cfg.model_type, vocab_size=cfg.vocab_size,
             hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
             num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
             num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="silu",
             rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
             tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias,
             # both spellings, so transformers 4.x and 5.x (and vLLM) read the same theta
             rope_theta=cfg.rope_theta,
             rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
             bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
             pad_token_id=cfg.pad_token_id,
             use_cache=True, dtype=dtype, torch_dtype=dtype)
    if cfg.model_type == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None)
    return d


def read_config(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no config.json (expected a Hugging Face model directory)")
    with open(cfg_path, encoding="utf-8") as f:
        try:
            return config_from_hf(json.load(f), cfg_path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e.msg})") from None


def safetensors_index(path):
    """{Hugging Face tensor name: (file, dtype, shape, byte offset of its data)} over model.safetensors or the
    shards an index lists. Only the headers are read; every size is checked against the file's."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        with open(index_file, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    index = {}
    for name in files:
        fp = os.path.join(path, name)
        if not os.path.exists(fp):
            raise FileNotFoundError(f"{fp}: listed in {index_file} but missing")
        size = os.path.getsize(fp)
        with open(fp, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(n)) if 8 + n <= size else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
        if not isinstance(header, dict):
            raise ValueError(f"{fp}: not a safetensors file (its header does not parse)")
        for k, v in header.items():
            if k == "__metadata__" or "rotary_emb" in k:
                continue
            if v["dtype"] not in ST_DTYPES:
                raise ValueError(f"{fp}: tensor {k} has dtype {v['dtype']} (supported: "
                                 f"{', '.join(ST_DTYPES)})")
            start, end = v["data_offsets"]
            if 8 + n + end > size:
                raise ValueError(f"{fp}: truncated: tensor {k} ends at byte {8 + n + end:,}, the file has "
                                 f"{size:,}")
            index[k] = (fp, ST_DTYPES[v["dtype"]], v["shape"], 8 + n + start)
    return index


def read_rows(entry, lo, hi, out):
    """Rows lo..hi of one safetensors tensor (dim 0) into out, with plain file reads: straight into out's
    memory when dtype and device allow, else through 64 MB buffers. Nothing else of the file is read or
    mapped, so a rank that owns 1/world of a weight reads 1/world of it."""
    path, dtype, shape, offset = entry
    row = math.prod(shape[1:]) * dtype.itemsize
    step = max(1, (64 << 20) // max(row, 1))
    direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
    with open(path, "rb") as f:
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            buf = out[a - lo:b - lo] if direct else torch.empty((b - a, *shape[1:]), dtype=dtype)
            f.seek(offset + a * row)
            if f.readinto(buf.reshape(-1).view(torch.uint8).numpy()) != (b - a) * row:
                raise ValueError(f"{path}: truncated while reading a tensor")
            if not direct:
                out[a - lo:b - lo].copy_(buf)


def load_rows(index, cfg, name, lo, hi, out):
    """Rows lo..hi of our parameter `name` into out; a fused projection reads them from its Hugging Face
    parts."""
    fused = [(f, parts) for f, parts in fused_projections(cfg).items() if f".{f}." in name]
    if not fused:
        read_rows(index[name], lo, hi, out)
        return
    f, (parts, sizes) = fused[0]
    start = 0
    for part, n in zip(parts, sizes):   # this part holds rows start .. start + n of the fused weight
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            read_rows(index[name.replace(f, part)], a - start, b - start, out[a - lo:b - lo])
        start += n


def check_weights(index, model, path):
    """The file's tensors are exactly the model's (by Hugging Face name) and of the right shapes."""
    cfg = model.config
    expected = {k: list(v.shape) for k, v in ours_to_hf(model.state_dict(), cfg).items()}
    tied_head = cfg.tie_word_embeddings and "lm_head.weight"
    extra = [k for k in index if k not in expected and k != tied_head]
    missing = [k for k in expected if k not in index]
    if missing or extra:
        raise ValueError(f"{path}: weights do not match config.json (missing {missing[:5]}, unexpected "
                         f"{extra[:5]})")
    for k, shape in expected.items():
        if list(index[k][2]) != shape:
            raise ValueError(f"{path}: tensor {k} has shape {index[k][2]}, config.json says {shape}")


def load_model(path, device=None, dtype=None):
    """Load an HF-layout directory (config.json + model.safetensors, or shards + index) into our Transformer.
    dtype: the parameters' (default: the file's). The model is built on the meta device and each weight read
    once into its place, so loading holds the model's bytes once (fsdp.load_sharded: 1/world of them)."""
    cfg = read_config(path)
    index = safetensors_index(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    check_weights(index, model, path)
    model = model.to(dtype or index["model.embed_tokens.weight"][1]).to_empty(device=device or "cpu")
    if cfg.tie_word_embeddings:   # to_empty gives each module its own tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            load_rows(index, cfg, name, 0, p.shape[0], p)
    return model


def save_model(model, path, max_shard_bytes=5 * 2**30, generation_config=None, tensors=None):
    """Write config.json, generation_config.json and safetensors (sharded above max_shard_bytes).
    tensors: (our name, tensor) pairs to write instead of model.state_dict(), e.g. fsdp.full_tensors gathering
    one weight at a time: only one shard file's tensors are ever held. Each file goes through a temp name and
    a rename, and weight files of an earlier save that this one did not write are removed."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    parts, cur, size, total, dtype = [], {}, 0, 0, "float32"

    def flush():
        parts.append((os.path.join(path, f"part-{len(parts):05d}.safetensors.tmp"), list(cur)))
        save_file(cur, parts[-1][0], metadata={"format": "pt"})

    for k, v in (tensors if tensors is not None else model.state_dict().items()):
        # HF names (fused projections split); a tied lm_head is written once, as the embedding
        for hk, hv in ours_to_hf({k: v}, cfg).items():
            hv = hv.detach().contiguous().cpu()
            n = hv.numel() * hv.element_size()
            if cur and size + n > max_shard_bytes:
                flush()
                cur, size = {}, 0
            cur[hk], size, total, dtype = hv, size + n, total + n, str(hv.dtype).replace("torch.", "")
    flush()
    names = ["model.safetensors"] if len(parts) == 1 else \
        [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for (tmp, _), name in zip(parts, names):
        os.replace(tmp, os.path.join(path, name))
    if len(parts) > 1:
        wmap = {k: name for name, (_, keys) in zip(names, parts) for k in keys}
        _atomic_write_text(os.path.join(path, "model.safetensors.index.json"),
                           json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2))
    for f in os.listdir(path):   # an earlier, differently sharded save must not be read back
        stale = f.endswith(".safetensors") and f not in names
        if stale or (f == "model.safetensors.index.json" and len(parts) == 1):
            os.remove(os.path.join(path, f))
    _atomic_write_text(os.path.join(path, "config.json"), json.dumps(config_to_hf(cfg, dtype), indent=2))
    gen = generation_config or {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                                "pad_token_id": cfg.pad_token_id, "do_sample": False}
    _atomic_write_text(os.path.join(path, "generation_config.json"), json.dumps(gen, indent=2))


def has_tokenizer(path):
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(path):
    """The tokenizer exactly as its tokenizer.json specifies (never trust_remote_code). We avoid AutoTokenizer
    when tokenizer.json exists: with a qwen2 config.json beside it, transformers 5 picks Qwen2Tokenizer, which
    rebuilds the pre-tokenizer from vocab + merges and tokenises our trained BPE differently."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if not has_tokenizer(path):   # transformers would build a 3-token tokenizer that encodes every text to []
        raise ValueError(f"{path}: no tokenizer files (tokenizer.json or tokenizer_config.json); copy them "
                         "from the checkpoint these weights came from (the hub model's folder)")
    try:
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:   # transformers' several-line messages, shortened
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: its tokenizer files do not load ({first[:160]})") from None
    if len(tok) < 16 or not tok.encode("A patient presents with fever."):
        raise ValueError(f"{path}: its tokenizer is degenerate ({len(tok)} tokens, encodes text to nothing); "
                         "copy the tokenizer files of the checkpoint these weights came from")
    if not tok.chat_template:
        raise ValueError(f"{path}: its tokenizer has no chat template (chat_template.jinja, or chat_template "
                         "in tokenizer_config.json); prompts are chat conversations: add one")
    return tok


# ChatML, as Qwen uses; written into tokenizers we train so apply_chat_template works like on Qwen
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# Qwen2's pre-tokenizer split (the regex its tokenizer uses); ours is identical so that transformers'
# Qwen2Tokenizer, which AutoTokenizer picks for a qwen2 checkpoint, tokenises our BPE exactly as we do
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_tokenizer(texts, vocab_size, path):
    """Byte-level BPE trained on our own text, saved with the ChatML special tokens and template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast




# -----------------------------------------------------------------------------
# GGUF (llama.cpp's single-file format) -> this layout: python hf_io.py from-gguf FILE OUT

GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
              "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, path):
    """config.json's fields from a GGUF file's metadata (llama, qwen2, qwen3)."""
    arch = gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)")
    get = lambda k, default=None: gguf_field(reader, f"{arch}.{k}", default)   # noqa: E731
    if get("rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: rope scaling {get('rope.scaling.type')!r} is not implemented")
    names = {t.name for t in reader.tensors}
    heads = get("attention.head_count")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    return dict(model_type=arch, vocab_size=len(tokens) if tokens else get("vocab_size"),
                hidden_size=get("embedding_length"), intermediate_size=get("feed_forward_length"),
                num_hidden_layers=get("block_count"), num_attention_heads=heads,
                num_key_value_heads=get("attention.head_count_kv", heads),
                head_dim=get("attention.key_length") or 0,
                rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
                rope_theta=get("rope.freq_base", 10000.0), max_position_embeddings=get("context_length", 2048),
                tie_word_embeddings="output.weight" not in names,
                attention_bias="blk.0.attn_q.bias" in names,
                bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
                eos_token_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"),
                pad_token_id=gguf_field(reader, "tokenizer.ggml.padding_token_id"))


def gguf_tensors(reader, d, path):
    """{Hugging Face name: fp32 tensor}, every tensor dequantized. llama.cpp stores a llama model's q and k
    rows permuted for its interleaved RoPE (its converter's `permute`); that is undone here."""
    import gguf
    out = {}
    for t in reader.tensors:
        m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", t.name)
        if not m or m.group(2) not in GGUF_NAMES:
            raise ValueError(f"{path}: tensor {t.name} has no Hugging Face name here")
        layer, part, kind = m.groups()
        w = torch.tensor(gguf.dequantize(t.data, t.tensor_type)).reshape(list(reversed(t.shape.tolist())))
        if d["model_type"] == "llama" and part in ("attn_q", "attn_k"):
            n = d["num_attention_heads"] if part == "attn_q" else d["num_key_value_heads"]
            w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        name = f"{GGUF_NAMES[part]}.{kind}"
        out[f"model.layers.{layer}.{name}" if layer else name] = w.float().contiguous()
    return out


def from_gguf(path, out):
    """A GGUF file -> an HF-layout folder: fp32 safetensors (dequantized), config.json,
    generation_config.json, the tokenizer (converted by transformers from the file's metadata) with the
    chat template the file carries, and gguf_source.json (what the file was). Written beside `out` and
    renamed into place: a folder that exists is never written over."""
    import gguf
    from transformers import AutoTokenizer
    if os.path.exists(out):
        raise FileExistsError(f"{out}: exists; from-gguf writes a new folder (remove it first)")
    reader = gguf.GGUFReader(path)
    d = gguf_config(reader, path)
    cfg = ModelConfig(**d)
    ours = hf_to_ours(gguf_tensors(reader, d, path), cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    check_weights({k: (None, None, list(v.shape)) for k, v in ours_to_hf(ours, cfg).items()}, model, path)
    model.load_state_dict(ours, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    tmp = out.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        import shutil
        shutil.rmtree(tmp)
    save_model(model, tmp)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                        gguf_file=os.path.basename(path))
    if not tok.chat_template:
        print(f"warning: {path} carries no chat template (tokenizer.chat_template): {out} has none")
    tok.save_pretrained(tmp)
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    info = dict(file=os.path.basename(path), bytes=os.path.getsize(path), sha256=_sha256(path),
                name=gguf_field(reader, "general.name"), license=gguf_field(reader, "general.license"),
                tensor_types=kinds, converted_by="hf_io.py from-gguf (dequantized to fp32)")
    _atomic_write_text(os.path.join(tmp, "gguf_source.json"), json.dumps(info, indent=2))
    os.replace(tmp, out)
    return cfg, info


def _sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


if __name__ == "__main__":
    from cli import Parser, guard

    def main():
        ap = Parser(description="python hf_io.py from-gguf FILE OUT: a GGUF checkpoint (llama, qwen2, qwen3; "
                    "any quantization gguf reads) as an HF-layout folder with fp32 weights and its tokenizer")
        ap.add_argument("command", choices=["from-gguf"], help="what to do")
        ap.add_argument("file", help="the .gguf file")
        ap.add_argument("out", help="the folder to write (must not exist)")
        a = ap.parse_args()
        if not os.path.isfile(a.file):
            raise SystemExit(f"{a.file}: no such file")
        cfg, info = from_gguf(a.file, a.out)
        print(f"wrote {a.out}: {info['name'] or cfg.model_type}, {cfg.num_hidden_layers} layers, hidden "
              f"{cfg.hidden_size}, vocabulary {cfg.vocab_size} ({', '.join(info['tensor_types'])} -> fp32)")
    guard(main)
