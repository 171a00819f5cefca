"""
train_sft.py: CoT cold-start SFT (paper 3.2) on make_data.py's chat-format traces. Loss on assistant
tokens only, packed sequences, FSDP2 under torchrun, exact resume.

    python train_sft.py                                            # embedded default: tiny model from scratch
    torchrun --nproc_per_node=2 train_sft.py --out runs/sft2       # 2 CPU ranks (gloo), same results
    torchrun --nproc_per_node=8 train_sft.py --init /models/Qwen2.5-7B-Instruct --data data/full/sft.jsonl \
        --bf16 --seq-len 8192 --rows-per-step 64 --lr 1e-5 --steps 2000 --act-ckpt     # one GPU node
    python train_sft.py --resume --out runs/demo/sft               # continue exactly where it stopped

From scratch (no --init), a byte-level BPE tokenizer is trained on the training text and a --preset model
is initialised. Writes {out}/ (HF layout: loads in load_model and transformers), {out}/metrics.jsonl and
{out}/loss.png; {out}/ckpt/ holds the latest resumable state.
"""
import os
import random
import time

import torch

from cli import Parser, at_least, fraction, guard
from common import (MetricsLog, add_run_flags, all_reduce_sum, autocast, check_bf16, clip_and_check,
                    init_distributed, lr_at, need, prepare_out, print0, run_done, set_seed, trim_heap,
                    wants_autocast)
from mcq import chat_ids, jsonl_rows
from fsdp import (checkpoint_blocks, empty_model, export_hf, load_checkpoint, load_sharded, resume_checkpoint,
                  save_checkpoint, shard_model)
from memplan import Job, Meter, announce, plan, size
import fast
from hf_io import has_tokenizer, load_tokenizer, read_config, train_tokenizer
from model import PRESETS, ModelConfig, Transformer
from report import finish_run


# -----------------------------------------------------------------------------
# data: chat examples -> token ids + assistant mask -> packed rows


def read_chat_jsonl(path):
    rows = []
    for line, r in jsonl_rows(path):
        msgs = r.get("messages") if isinstance(r, dict) else None
        if not (isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict)
                and msgs[-1].get("role") == "assistant"):
            raise ValueError(f"{path}:{line}: field 'messages' must be a list ending with an assistant "
                             f"message")
        rows.append(msgs)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def tokenize_example(tok, messages):
    """ids of the whole conversation and a 0/1 mask of the tokens the loss sees (the assistant reply,
    including its closing <|im_end|>, so the model learns to stop)."""
    prompt, full = chat_ids(tok, messages[:-1]), chat_ids(tok, messages, generation_prompt=False)
    assert full[:len(prompt)] == prompt, "chat template is not prefix-stable"
    end = tok.convert_tokens_to_ids("<|im_end|>")
    n_reply = len(full) - len(prompt)
    if end in full[len(prompt):]:   # drop the template's trailing newline after <|im_end|>
        n_reply = full[len(prompt):].index(end) + 1
        full = full[:len(prompt) + n_reply]
    return full, [0] * len(prompt) + [1] * n_reply


def pack(examples, seq_len, pad_id):
    """Greedy first-fit packing into rows of seq_len: (ids, mask, doc_ids) per row. Examples longer than
    seq_len are cut (counted)."""
    rows, cur, cut = [], None, 0
    for doc, (ids, mask) in enumerate(examples):
        if len(ids) > seq_len:
            ids, mask, cut = ids[:seq_len], mask[:seq_len], cut + 1
        if cur is None or len(cur[0]) + len(ids) > seq_len:
            if cur is not None:
                rows.append(cur)
            cur = ([], [], [])
        cur[0].extend(ids)
        cur[1].extend(mask)
        cur[2].extend([doc] * len(ids))
    rows.append(cur)
    out = []
    for ids, mask, docs in rows:
        n = seq_len - len(ids)   # pad as its own document, never attended by real tokens, never in the loss
        out.append((ids + [pad_id] * n, mask + [0] * n, docs + [-1] * n))
    return out, cut


def epoch_rows(examples, seq_len, pad_id, seed, epoch):
    order = list(range(len(examples)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    rows, _ = pack([examples[i] for i in order], seq_len, pad_id)
    return rows


def batch_tensors(rows, device):
    ids = torch.tensor([r[0] for r in rows], device=device)
    mask = torch.tensor([r[1] for r in rows], device=device)
    docs = torch.tensor([r[2] for r in rows], device=device)
    return ids, mask, docs


def masked_loss_sum(model, ids, mask, docs, chunk=0):
    """Sum of next-token cross-entropy over the masked (assistant) targets, and their count. Log-probs are
    made for those positions only (prompt tokens carry no loss), chunk tokens at a time
    (model.token_logprobs). Each packed document attends only to itself: fast.doc_attention does that with
    less work than the dense mask."""
    m = mask[:, 1:].bool() & (docs[:, 1:] == docs[:, :-1])   # never predict across a document boundary
    logp, _ = model(ids[:, :-1], doc_ids=docs[:, :-1], attention_mask=fast.doc_attention(docs[:, :-1]),
                    logits_at=m, targets=ids[:, 1:][m], chunk=chunk)
    return -logp.sum(), int(m.sum())


# -----------------------------------------------------------------------------


def parser():
    ap = Parser(description=__doc__)
    # --- data
    ap.add_argument("--data", default="data/kg/sft.jsonl", help="chat-format SFT JSONL from make_data.py")
    ap.add_argument("--val-frac", type=fraction, default=0.05, help="fraction held out for the "
                    "validation loss")
    ap.add_argument("--seq-len", type=at_least(2), default=512, help="tokens per packed row")
    ap.add_argument("--rows-per-step", type=at_least(1), default=8, help="packed rows per optimizer "
                    "step (global batch)")
    ap.add_argument("--micro-rows", type=at_least(1), default=4, help="rows per forward/backward on "
                    "one rank (grad accumulation)")
    # --- model
    ap.add_argument("--init", default=None, help="HF checkpoint directory to "
                    "fine-tune; default: from scratch")
    ap.add_argument("--save-init", default=None, help="also write the model as initialised (before any "
                    "step) to this directory, HF layout: the untrained baseline, without a second run")
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS), help="from scratch: model "
                    "preset (model.PRESETS)")
    ap.add_argument("--vocab-size", type=at_least(260), default=4096, help="from scratch: BPE "
                    "vocabulary to train")
    ap.add_argument("--act-ckpt", action="store_true", help="activation checkpointing "
                    "per block (saves memory)")
    ap.add_argument("--logits-chunk", type=at_least(0), default=0, help="tokens whose vocabulary logits "
                    "exist at once in the loss (0: 2**26 / vocab, i.e. 256 MB of fp32 logits; smaller saves "
                    "memory at a real vocabulary)")
    ap.add_argument("--bf16", action="store_true", help="bf16 compute (autocast on CPU and on one GPU; FSDP "
                    "mixed precision on several GPUs)")
    # --- optimisation
    ap.add_argument("--steps", type=at_least(0), default=250, help="optimizer steps")
    ap.add_argument("--lr", type=at_least(0, float), default=3e-3, help="peak learning rate")
    ap.add_argument("--min-lr", type=at_least(0, float), default=3e-4, help="final learning rate of the "
                    "cosine")
    ap.add_argument("--warmup", type=at_least(0), default=20, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=at_least(0, float), default=0.1, help="AdamW weight decay "
                    "(matrices only)")
    ap.add_argument("--clip", type=at_least(0, float), default=1.0, help="gradient norm clip (0: none)")
    # --- run
    add_run_flags(ap, "runs/sft", 50, 100, "validation loss every N steps")
    ap.add_argument("--seed", type=int, default=0, help="seed for init, data order")
    return ap


def get_args(argv=None):
    return parser().parse_args(argv)


def memory_plan(args, cfg, world, device, longest):
    """memplan.py's budget for these flags; --dry-run stops here."""
    world = args.plan_world or world
    cuda = device.type == "cuda" or args.gpu_mem is not None
    # on a CPU, documents up to fast.DocBuckets.MAX_LEN attend alone; a longer one makes its row attend as one
    sdpa = 0 if cuda else (longest if longest <= 1024 else args.seq_len)
    rows = plan(cfg, Job("sft", world, cuda, args.bf16, args.micro_rows * args.seq_len, args.act_ckpt,
                         args.logits_chunk, sdpa_len=min(sdpa, args.seq_len)))
    return announce(rows, f"SFT, {cfg.model_type} {size(cfg)} parameters, {world} rank(s), "
             f"{'cuda' if cuda else 'cpu'}{', bf16' if args.bf16 else ''}", args, cuda)


def load_data(args, rank, world, src):
    """The chat examples, the tokenizer (from scratch: a byte-level BPE trained on them, by rank 0) and the
    model config. Returns (tok, cfg, examples); a dry run without tokenizer files has tok None."""
    convs = read_chat_jsonl(args.data)
    tok_dir = src or os.path.join(args.out, "tokenizer")
    if not src and not args.dry_run and not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        if rank == 0:
            train_tokenizer([m["content"] for c in convs for m in c], args.vocab_size, tok_dir)
        if world > 1:
            torch.distributed.barrier()
    tok = load_tokenizer(tok_dir) if has_tokenizer(tok_dir) or not args.dry_run else None
    if src:
        cfg = read_config(src)
    else:
        vocab, end = (len(tok), tok.convert_tokens_to_ids("<|im_end|>")) if tok else (args.vocab_size, None)
        cfg = ModelConfig.from_name(args.preset, vocab_size=vocab, bos_token_id=None, eos_token_id=end,
                                    pad_token_id=tok.pad_token_id if tok else None)
    return tok, cfg, [tokenize_example(tok, c) for c in convs] if tok else []


def split_rows(args, examples, pad):
    """Held-out examples packed once (validation rows), the training examples, and their rows an epoch."""
    idx = list(range(len(examples)))
    random.Random(args.seed).shuffle(idx)
    n_val = max(1, int(len(idx) * args.val_frac))
    val, train = [examples[i] for i in idx[:n_val]], [examples[i] for i in idx[n_val:]]
    return pack(val, args.seq_len, pad)[0], train


def build_model(args, cfg, ckpt, device, world, meter):
    """The model, sharded over the ranks as it is built (from a checkpoint's shape, --init, or a preset from
    scratch), and AdamW (weight decay on matrices only)."""
    with meter.phase("load"):
        if ckpt:   # the weights come from the checkpoint (load_checkpoint)
            model = empty_model(cfg, device, world, bf16=args.bf16)
        elif args.init:
            model = load_sharded(args.init, device, world, bf16=args.bf16)
        else:
            model = Transformer(cfg).init_weights(args.seed).to(device)
            model = shard_model(model, device, world, bf16=args.bf16)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            eps=1e-8)
    return model, opt


class Rows:
    """Global packed row k of training: each epoch shuffled then packed (epochs can differ by a row or two),
    only the current epoch's rows kept; so a step's rows are a pure function of (seed, step) whatever the
    resume or the world size."""

    def __init__(self, train, args, pad):
        self.train, self.args, self.pad = train, args, pad
        self.epoch_len, self.cache = {}, {}

    def __getitem__(self, k):
        ep = 0
        while True:
            if ep not in self.epoch_len or (k < self.epoch_len[ep] and ep not in self.cache):
                self.cache.clear()
                self.cache[ep] = epoch_rows(self.train, self.args.seq_len, self.pad, self.args.seed, ep)
                self.epoch_len[ep] = len(self.cache[ep])
            if k < self.epoch_len[ep]:
                return self.cache[ep][k]
            k -= self.epoch_len[ep]
            ep += 1


def val_loss(model, val_rows, args, ranks, device):
    """Mean loss of the held-out rows. Every rank runs the same number of forwards (FSDP's all-gathers are
    collective): the last round may give a rank an empty (all-masked) row."""
    rank, world, use_autocast = ranks
    model.eval()
    tot, cnt = 0.0, 0
    blank = ([0] * args.seq_len, [0] * args.seq_len, [0] * args.seq_len)
    with torch.no_grad():
        for i in range(0, len(val_rows), world):
            row = val_rows[i + rank] if i + rank < len(val_rows) else blank
            ids, mask, docs = batch_tensors([row], device)
            with autocast(device, use_autocast):
                s, c = masked_loss_sum(model, ids, mask, docs, args.logits_chunk)
            tot, cnt = tot + s.item(), cnt + c
    model.train()
    return all_reduce_sum(tot) / max(1, all_reduce_sum(cnt))


def train_step(model, opt, rows, args, ranks, device, step):
    """One optimizer step on the step's global rows (this rank's share): each micro-batch's loss scaled so
    that FSDP's gradient average is (global token sum) / (global count). Returns (loss, gradient norm)."""
    rank, world, use_autocast = ranks
    mine = rows[rank::world]
    n_tok = all_reduce_sum(sum(sum(r[1][1:]) for r in mine))
    loss_sum = 0.0
    for m0 in range(0, len(mine), args.micro_rows):
        trim_heap(device)
        ids, mask, docs = batch_tensors(mine[m0:m0 + args.micro_rows], device)
        with autocast(device, use_autocast):
            s, _ = masked_loss_sum(model, ids, mask, docs, args.logits_chunk)
        (s * world / max(n_tok, 1)).backward()
        loss_sum += s.item()
    loss = all_reduce_sum(loss_sum) / max(n_tok, 1)
    gnorm = clip_and_check(model, args.clip, step, loss)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, gnorm


def main(argv=None):
    args = get_args(argv)
    fast.ON = not args.plain
    rank, world, device = init_distributed(args.device)
    if not args.dry_run:
        check_bf16(args.bf16, device)
    if args.rows_per_step % world:
        raise SystemExit(f"--rows-per-step {args.rows_per_step} must be a multiple of the world size {world}")
    need(args.data, "no SFT data", "make it with `python make_data.py --out data/kg`, or pass --data")
    if args.init:
        need(os.path.join(args.init, "config.json"), "no model", "--init takes a Hugging Face model folder")
    set_seed(args.seed)
    if not args.dry_run:
        prepare_out(args.out, args.resume, args.overwrite, rank)
    ckpt = resume_checkpoint(args)
    tok, cfg, examples = load_data(args, rank, world, ckpt or args.init)
    planned = memory_plan(args, cfg, world, device, max((len(e[0]) for e in examples), default=args.seq_len))
    pad = tok.pad_token_id or 0
    val_rows, train = split_rows(args, examples, pad)
    rows, meter = Rows(train, args, pad), Meter(device)
    model, opt = build_model(args, cfg, ckpt, device, world, meter)
    if args.save_init and not ckpt:   # the untrained model (the stage table's "Base" row)
        export_hf(model, tok, args.save_init, rank)
    per_epoch, cut = len(epoch_rows(train, args.seq_len, pad, args.seed, 0)), pack(train, args.seq_len, pad)[1]
    print0(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {len(train)} train / "
           f"{len(examples) - len(train)} val examples | {per_epoch} packed rows of {args.seq_len} per epoch "
           f"({cut} cut) | world {world} on {device}")
    if args.act_ckpt:
        checkpoint_blocks(model)
    start = load_checkpoint(ckpt, model, opt)[0] if ckpt else 0
    if ckpt:
        print0(f"resumed from {ckpt} at step {start}")
    log = MetricsLog(os.path.join(args.out, "metrics.jsonl"), rank, resume_step=start if ckpt else None)
    ranks = (rank, world, wants_autocast(args.bf16, device, world))
    from tqdm import tqdm
    bar = tqdm(range(start, args.steps), desc="sft", disable=rank != 0, initial=start, total=args.steps)
    if start == 0:
        v0 = val_loss(model, val_rows, args, ranks, device)
        log.log(step=0, val_loss=v0)
        print0(f"step 0: val loss {v0:.4f}")
    model.train()
    for step in bar:
        t0, lr = time.time(), lr_at(step, args.steps, args.lr, args.min_lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        step_rows = [rows[k] for k in range(step * args.rows_per_step, (step + 1) * args.rows_per_step)]
        with meter.phase("step"):
            loss, gnorm = train_step(model, opt, step_rows, args, ranks, device, step + 1)
        row = dict(step=step + 1, loss=loss, lr=lr, grad_norm=gnorm,
                   tokens_per_s=args.rows_per_step * args.seq_len / (time.time() - t0),
                   mem_mb=meter.overall() / 2**20)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row["val_loss"] = val_loss(model, val_rows, args, ranks, device)
        log.log(**row)
        bar.set_postfix(loss=f"{loss:.3f}", **({"val": f"{row['val_loss']:.3f}"} if "val_loss" in row else {}))
        done = run_done(step + 1, args)
        if (step + 1) % args.save_every == 0 or done:
            with meter.phase("save"):
                save_checkpoint(args.out, model, opt, tok, step + 1, {}, rank)
        if done:
            break
    bar.close()
    finish_run(model, tok, args, (rank, world), (meter, planned), "SFT",
               ["loss", "val_loss", "lr", "grad_norm"], "loss.png")


if __name__ == "__main__":
    guard(main)
