"""train_sft.py: masked loss, FSDP2 2-rank equivalence, exact resume, transformers-loadable output."""
import os

import pytest
import torch
import torch.nn.functional as F
import transformers

from helpers import metrics, run, write_toy_sft
from hf_io import load_model
from model import ModelConfig, Transformer
from train_sft import masked_loss_sum, pack

COMMON = ["train_sft.py", "--preset", "nano", "--vocab-size", "300", "--seq-len", "128", "--steps", "8",
          "--rows-per-step", "4", "--micro-rows", "2", "--eval-every", "4", "--warmup", "2"]


def test_masked_loss_equals_naive():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_name("nano", vocab_size=50)).init_weights(1)
    exs = []
    for n_prompt, n_reply in [(5, 3), (4, 6), (7, 2)]:
        ids = torch.randint(1, 50, (n_prompt + n_reply,)).tolist()
        exs.append((ids, [0] * n_prompt + [1] * n_reply))
    rows, _ = pack(exs, 32, 0)
    ids = torch.tensor([r[0] for r in rows])
    mask = torch.tensor([r[1] for r in rows])
    docs = torch.tensor([r[2] for r in rows])
    with torch.no_grad():
        s, c = masked_loss_sum(m, ids, mask, docs)
        naive, cnt = 0.0, 0
        for toks, msk in exs:   # each example alone, predicting only its reply tokens
            logits = m(torch.tensor([toks]))[0]
            for t in range(1, len(toks)):
                if msk[t]:
                    naive += F.cross_entropy(logits[t - 1], torch.tensor(toks[t])).item()
                    cnt += 1
    assert c == cnt == 11
    assert abs(s.item() - naive) < 1e-4


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    write_toy_sft(str(d / "sft.jsonl"))
    return d


def test_two_ranks_match_one_and_checkpoint_loads(toy):
    run(COMMON + ["--data", str(toy / "sft.jsonl"), "--out", str(toy / "one")])
    run(COMMON + ["--data", str(toy / "sft.jsonl"), "--out", str(toy / "two")], nproc=2)
    a, b = metrics(toy / "one" / "metrics.jsonl"), metrics(toy / "two" / "metrics.jsonl")
    assert len(a) == len(b) == 9
    for x, y in zip(a, b):
        for k in ("loss", "val_loss"):
            if k in x:
                assert abs(x[k] - y[k]) <= 1e-4 * abs(x[k]), (k, x, y)
    assert a[-1]["val_loss"] < a[0]["val_loss"]
    # the final model loads in transformers with identical logits, and its tokenizer matches ours
    path = str(toy / "one")
    ours = load_model(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 17, 33, 2, 9, 44]])
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() <= 1e-5
    assert os.path.exists(os.path.join(path, "loss.png"))


def test_resume_is_exact(toy):
    data = ["--data", str(toy / "sft.jsonl")]
    run(COMMON + data + ["--out", str(toy / "full"), "--save-init", str(toy / "init")])
    run(COMMON + data + ["--out", str(toy / "cut"), "--stop-after", "3", "--save-every", "100"])
    run(COMMON + data + ["--out", str(toy / "cut"), "--resume", "--save-init", str(toy / "not_init")])
    a, b = metrics(toy / "full" / "metrics.jsonl"), metrics(toy / "cut" / "metrics.jsonl")
    assert [r["step"] for r in b] == [r["step"] for r in a]
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    # --save-init wrote the untrained model, as a run of 0 steps does (run.sh's "Base" row); a resumed run
    # does not
    run(COMMON + data + ["--out", str(toy / "zero"), "--steps", "0"])
    x, y = load_model(str(toy / "init")).state_dict(), load_model(str(toy / "zero")).state_dict()
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not os.path.exists(toy / "not_init")


def test_bad_data_names_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": '
                 '"y"}]}\n{"messages": 3}\n')
    from train_sft import read_chat_jsonl
    with pytest.raises(ValueError, match="bad.jsonl:2: field 'messages'"):
        read_chat_jsonl(str(p))


def test_bf16_autocast_rule():
    """--bf16 means autocast wherever FSDP mixed precision does not apply: CPU (any ranks) and one GPU (one
    process is not sharded). train_grpo once ran a single GPU in fp32 by tying autocast to the CPU."""
    from common import wants_autocast
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert wants_autocast(True, cpu, 1) and wants_autocast(True, cpu, 2)
    assert wants_autocast(True, gpu, 1) and not wants_autocast(True, gpu, 8)
    assert not any(wants_autocast(False, d, w) for d in (cpu, gpu) for w in (1, 2))
