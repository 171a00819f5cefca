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
import os
import sys


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag answered in one line instead of the whole usage block."""

    def __init__(self, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def at_least(lo, kind=int):
    """A number >= lo: --steps -3 is refused by name, not run as a loop of no steps."""
    def check(text):
        v = kind(text)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {text}")
        return v
    check.__name__ = kind.__name__   # argparse's "invalid int value" for text that is no number
    return check


def between(lo, hi):
    """A float in [lo, hi]: --top-p 2 is refused."""
    def check(text):
        v = float(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {text}")
        return v
    check.__name__ = "float"
    return check


def fraction(text):
    """A share in [0, 1): --test-frac 1.5 is refused."""
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text}")
    return v


fraction.__name__ = "float"

EXPECTED = (ValueError, OSError, UnicodeError, json.JSONDecodeError)   # bad files, missing paths, a full disk


def guard(main):
    """Run main; an expected error (or SystemExit with a message) becomes one line on stderr and exit 1."""
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str):
            if rank0:
                print(f"error: {e.code}", file=sys.stderr, flush=True)
            os._exit(1) if "RANK" in os.environ else sys.exit(1)
        raise
    except EXPECTED as e:
        if os.environ.get("NANOFLEMING_DEBUG"):
            raise
        if rank0:
            named = isinstance(e, OSError) and e.filename and str(e.filename) not in str(e)
            where = f" ({e.filename})" if named else ""
            print(f"error: {e}{where}", file=sys.stderr, flush=True)
        os._exit(1) if "RANK" in os.environ else sys.exit(1)
