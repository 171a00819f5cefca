"""
cli.py: what every script does with a bad input: one line naming the flag, file, line or field, a non-zero
exit, no traceback (NANOFLEMING_DEBUG=1 shows it), and under torchrun the line once, from rank 0.

    from cli import Parser, at_least, between, fraction, guard
    ap = Parser(description=__doc__)
    ap.add_argument("--steps", type=at_least(0), default=60, help="optimizer steps")
    if __name__ == "__main__":
        guard(main)
"""
import argparse
import json
import math
import os
import sys


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag answered in one line instead of the whole usage block."""

    def __init__(self, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _number(text, kind):
    """text as kind; a float must be finite: nan and inf pass every < and > test, and would train on."""
    v = kind(text)
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def at_least(lo, kind=int, hi=None):
    """A number >= lo (and <= hi): --steps -3 is refused by name, not run as a loop of no steps."""
    def check(text):
        v = _number(text, kind)
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be at least {lo}" + (f" and at most {hi}" if hi else "")
                                             + f", got {text}")
        return v
    check.__name__ = kind.__name__   # argparse's "invalid int value" for text that is no number
    return check


def between(lo, hi):
    """A float in [lo, hi]: --top-p 2 is refused."""
    def check(text):
        v = _number(text, float)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {text}")
        return v
    check.__name__ = "float"
    return check


def fraction(text):
    """A share in [0, 1): --test-frac 1.5 is refused."""
    v = _number(text, float)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text}")
    return v


def finite(text):
    """Any finite float (a reward weight may be negative)."""
    return _number(text, float)


fraction.__name__ = finite.__name__ = "float"

class Frozen(argparse.Namespace):
    """Parsed flags, read-only once parsed (parse_frozen): what a run decides at start-up from them is held
    apart (train_grpo.Setup), never written onto them."""

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"the flags are read-only once parsed (--{name.replace('_', '-')})")
        super().__setattr__(name, value)


def parse_frozen(ap, argv=None):
    args = ap.parse_args(argv, namespace=Frozen())
    args.__dict__["_frozen"] = True
    return args


EXPECTED = (ValueError, OSError, UnicodeError, json.JSONDecodeError)   # bad files, missing paths, a full disk


def guard(main):
    """Run main; an expected error (or SystemExit with a message) becomes one line on stderr and exit 1. Under
    torchrun a SystemExit (a flag or file every rank reads alike) is printed by rank 0; any other error by
    every rank that has it, its rank named: a rank's own failure never goes unseen. A rank whose peer
    died says so instead of its transport's traceback."""
    rank = int(os.environ.get("RANK", "0"))
    ranked = int(os.environ.get("WORLD_SIZE", "1")) > 1
    where = f"rank {rank}: " if ranked else ""
    leave = (lambda code: os._exit(code)) if "RANK" in os.environ else sys.exit
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str):
            if rank == 0:
                print(f"error: {e.code}", file=sys.stderr, flush=True)
            leave(1)
        raise
    except EXPECTED as e:
        if os.environ.get("NANOFLEMING_DEBUG"):
            raise
        named = isinstance(e, OSError) and e.filename and str(e.filename) not in str(e)
        print(f"{where}error: {e}{f' ({e.filename})' if named else ''}", file=sys.stderr, flush=True)
        leave(1)
    except RuntimeError as e:   # torch.distributed's DistBackendError / DistNetworkError: a peer is gone
        if not ranked or "Dist" not in type(e).__name__ or os.environ.get("NANOFLEMING_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"{where}error: another rank stopped (its own error line is above); here: {first}",
              file=sys.stderr, flush=True)
        leave(1)
