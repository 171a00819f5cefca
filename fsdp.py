"""
fsdp.py: FSDP2 under torchrun at the size of real checkpoints. Each rank holds 1/world of every weight, of
its gradient and of its optimizer state, and never the whole model: not when loading, not when
checkpointing.

    shard_model(model, device, world)        fully_shard each decoder block, then the root
    checkpoint_blocks(model)                 activation checkpointing, block by block
    load_sharded(path, device, world)        built on the meta device, sharded, then each rank reads only its
                                             rows of each weight from the safetensors files
    save_checkpoint / load_checkpoint        model + optimizer + RNG, torch.distributed.checkpoint: each rank
                                             writes its own shards; resumes on any world size; crash-safe
    export_hf(model, tok, path, rank)        the Hugging Face layout, gathered to rank 0 one weight at a time
    with unsharded(model): ...               every weight gathered once, for a whole rollout

One process (world 1): the same calls, with nothing sharded.
"""
import errno
import json
import math
import os
import random
import shutil
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist

from common import print0
from hf_io import (check_weights, config_to_hf, load_model, load_rows, read_config, safetensors_index,
                   save_model)
from model import Transformer


def shard_model(model, device, world, bf16=False, reshard_after_forward=True):
    """FSDP2: fully_shard each decoder block, then the root (embeddings, norm, head). One process: no-op.
    On GPU with bf16, parameters are gathered in bf16 and gradients reduced in fp32."""
    if world <= 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 and device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def empty_model(cfg, device, world, dtype=torch.float32, bf16=False):
    """The model with uninitialised weights, already sharded: no rank ever allocates the whole of it."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model = shard_model(model, device, world, bf16).to_empty(device=device)
    # to_empty gives each module its own tensor (FSDP keeps the tie)
    if cfg.tie_word_embeddings and world <= 1:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def checkpoint_blocks(model):
    """Activation checkpointing: each block keeps only its input for backward and runs again there (a third
    more compute, a fraction of the memory; memplan.py counts both). FSDP2's hooks stay around the block."""
    from torch.utils.checkpoint import checkpoint
    for blk in model.model.layers:
        blk._fwd = blk.forward
        blk.forward = (lambda b: lambda *a: checkpoint(b._fwd, *a, use_reentrant=False))(blk)
    return model


def owned_rows(n, rank, world):
    """Rows of a dim-0 size n that FSDP2's Shard(0) gives this rank (torch.chunk: ceil(n / world) each)."""
    c = math.ceil(n / world)
    lo = min(rank * c, n)
    return lo, min(lo + c, n)


def load_sharded(path, device, world, dtype=torch.float32, bf16=False, frozen=False):
    """Load an HF-layout checkpoint straight into FSDP2 shards: each rank reads only the rows it owns (plain
    file reads of those byte ranges), so its memory holds 1/world of the model. frozen: no gradients (a
    reference). One process: model.load_model."""
    if world <= 1:
        model = load_model(path, device, dtype)
    else:
        cfg, index = read_config(path), safetensors_index(path)
        with torch.device("meta"):
            check_weights(index, Transformer(cfg), path)
        model = empty_model(cfg, device, world, dtype, bf16)
        rank = dist.get_rank()
        with torch.no_grad():
            for name, p in model.named_parameters():
                local = p.to_local()
                lo, hi = owned_rows(p.shape[0], rank, world)
                assert local.shape[0] == hi - lo, (name, local.shape, lo, hi)
                load_rows(index, cfg, name, lo, hi, local)
    if frozen:
        model.eval().requires_grad_(False)
    return model


def full_tensors(model, rank=0):
    """(name, full tensor on CPU) one at a time, for save_model: under FSDP each weight is all-gathered, so
    every rank iterates; only rank 0 gets the tensors. A tied lm_head is the embedding: not gathered
    twice."""
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        if rank == 0:
            yield name, t.detach().cpu()


def require_finite(model, what):
    """Stop (one line, every rank) before `what` is written if any weight on any rank is nan or inf: a run
    never leaves non-finite weights behind. Every rank must call."""
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
              for p in model.parameters())
    if dist.is_initialized():
        t = torch.tensor(bad, dtype=torch.float64)
        dist.all_reduce(t)
        bad = int(t.item())
    if bad:
        raise SystemExit(f"{bad} weight tensor(s) hold nan or inf: {what} not written (lower --lr, or keep "
                         f"--clip on)")


def export_hf(model, tok, path, rank):
    """The model in the Hugging Face layout at path (rank 0 writes; every rank must call)."""
    require_finite(model, f"the model at {path}")
    tensors = full_tensors(model, rank)
    if rank == 0:
        save_model(model, path, tensors=tensors)
        if tok is not None:
            tok.save_pretrained(path)
    else:
        for _ in tensors:
            pass
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# trainer checkpoints: {out}/ckpt/step-NNNNNN/, complete once the COMPLETE marker is written (last)


def resume_checkpoint(args):
    """--resume: the run folder's newest complete checkpoint (None, said, when it has none); else None."""
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None:
        print0(f"--resume: no complete checkpoint in {args.out}/ckpt, starting at step 0")
    return ckpt


def latest_checkpoint(run_dir):
    """The newest complete checkpoint folder of a run, or None."""
    root = os.path.join(run_dir, "ckpt")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-")) if os.path.isdir(root) else []
    done = [d for d in steps if os.path.exists(os.path.join(root, d, "COMPLETE"))]
    return os.path.join(root, done[-1]) if done else None


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


@contextmanager
def one_process_quiet():
    """torch.distributed.checkpoint warns at every save and load in a single process (train_sft.py on a CPU)
    that it assumes one process, which is what we mean: that warning only, silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


def save_checkpoint(run_dir, model, optimizer, tok, step, extra, rank):
    """Model and optimizer state, sharded as they are (each rank writes its own shards with
    torch.distributed.checkpoint, so no rank gathers either), the RNG, `extra` (JSON), config.json and the
    tokenizer. Crash-safe at every point: the folder counts only once COMPLETE is written, after
    everything else is on disk, and older checkpoints are removed only after that (marker first). Every
    rank must call."""
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    root = os.path.join(run_dir, "ckpt")
    path = os.path.join(root, f"step-{step:06d}")
    require_finite(model, f"the checkpoint {path}")
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)   # an unfinished try at this very step
        os.makedirs(path)
    if dist.is_initialized():
        dist.barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    try:
        with one_process_quiet():
            save(state, storage_writer=FileSystemWriter(path, sync_files=True))
    except (Exception, CheckpointException) as e:   # which wraps each rank's error with its traceback
        causes = [e] + [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
        if not any(getattr(c, "errno", None) == errno.ENOSPC for c in causes):
            raise
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        raise OSError(f"{path}: the disk is full (no space left on device) while writing the checkpoint; it "
                      f"was removed, the one before it is kept") from None
    if rank == 0:
        _write_synced(os.path.join(path, "trainer_state.json"), json.dumps(dict(
            step=step, extra=extra, rng_torch=torch.get_rng_state().tolist(), rng_python=random.getstate())))
        _write_synced(os.path.join(path, "config.json"), json.dumps(config_to_hf(model.config), indent=2))
        if tok is not None:
            tok.save_pretrained(path)
    if dist.is_initialized():
        dist.barrier()   # every rank's shards are on disk
    if rank == 0:
        _fsync_dir(path)
        _write_synced(os.path.join(path, "COMPLETE"), f"{step}\n")
        _fsync_dir(path)
        for d in os.listdir(root):
            old = os.path.join(root, d)
            if old != path and os.path.isdir(old):
                if os.path.exists(os.path.join(old, "COMPLETE")):
                    os.remove(os.path.join(old, "COMPLETE"))   # first: a half-deleted folder must not count
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path, model, optimizer):
    """Restore model, optimizer and RNG from a save_checkpoint folder, whatever the world size it was written
    with (torch.distributed.checkpoint reshards). Returns (step, extra)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with one_process_quiet():
        load(state, storage_reader=FileSystemReader(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        st = json.load(f)
    torch.set_rng_state(torch.tensor(st["rng_torch"], dtype=torch.uint8))
    random.setstate(_tuplify(st["rng_python"]))
    return st["step"], st["extra"]


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


class unsharded:
    """with unsharded(model): FSDP2 gathers every weight once for a whole rollout (not once per layer per
    generated token) and keeps them until generation ends, so ranks may run different numbers of decode steps.
    No-op without FSDP."""

    def __init__(self, model):
        from torch.distributed.fsdp import FSDPModule
        self.model, self.mods = model, [m for m in model.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        self.model.eval()
        for m in self.mods:
            m.set_reshard_after_forward(False, recurse=False)
        for m in self.mods:
            m.unshard()
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
        self.model.train()
