"""Shared fixtures: a tiny KG data set and a cold start trained on it, made once per pytest run."""
import pytest

import make_data
from helpers import run


@pytest.fixture(scope="package")   # the tests folder: once per worker process
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    make_data.main(["--out", str(d / "data"), "--kg-questions", "300", "--kg-max-diseases", "30", "--seed",
                    "3"])
    run(["train_sft.py", "--data", str(d / "data" / "sft.jsonl"), "--out", str(d / "sft"), "--preset", "nano",
         "--vocab-size", "600", "--seq-len", "384", "--steps", "15", "--rows-per-step", "4", "--eval-every",
         "15"])
    return d


