"""
hf_io.py's GGUF converter on a real checkpoint: our load of the converted folder against transformers' own
GGUF load of the file (the function from_pretrained(gguf_file=...) calls), logits over a few prompts.

    python bench/gguf_parity.py FILE.gguf [FOLDER]     # FOLDER: an earlier `python hf_io.py from-gguf FILE FOLDER`

Prints the largest |logit difference| (the acceptance line: within 1e-4) and each side's load time.
"""
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_io import from_gguf, load_model, load_tokenizer  # noqa: E402

PROMPTS = ["A 45-year-old man presents with fever and a rash on his palms and soles. Which of the following "
           "is the most likely diagnosis?", "Autosomal dominant inheritance", "<|im_start|>user\nHi<|im_end|>\n"]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    t = time.time()
    folder = sys.argv[2] if len(sys.argv) > 2 else os.path.join(tempfile.mkdtemp(), "hf")
    if len(sys.argv) <= 2:
        from_gguf(path, folder)
    ours, tok = load_model(folder).eval(), load_tokenizer(folder)
    t_ours = time.time() - t
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    t = time.time()
    cfg = transformers.AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                  gguf_file=os.path.basename(path))
    ref = transformers.AutoModelForCausalLM.from_config(cfg)
    ref.load_state_dict(load_gguf_checkpoint(path, return_tensors=True, model_to_load=ref)["tensors"],
                        strict=False)
    ref.tie_weights()
    ref.eval()
    t_ref = time.time() - t
    worst = 0.0
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([tok.encode(p)])
            worst = max(worst, float((ours(ids) - ref(ids).logits).abs().max()))
    print(f"{os.path.basename(path)}: {sum(x.numel() for x in ours.parameters()) / 1e6:.1f}M parameters; "
          f"max |logits (ours, converted) - logits (transformers' GGUF load)| over {len(PROMPTS)} prompts = "
          f"{worst:.2e} ({'within' if worst <= 1e-4 else 'NOT within'} 1e-4); load: ours {t_ours:.1f} s "
          f"(conversion included: {len(sys.argv) <= 2}), transformers {t_ref:.1f} s")


if __name__ == "__main__":
    main()
