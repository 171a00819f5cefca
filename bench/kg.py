"""
KG load time and sampler throughput: the embedded HPO graph, and a synthetic PrimeKG-format graph of
120k entities and 4M edges (written to a temp file, then loaded through load_primekg like a real kg.csv).

    python bench/kg.py                 # both
    python bench/kg.py --skip-synthetic
Targets: >= 2,000 questions/s; the 4M-edge kg.csv loads in < 60 s.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kg import PRIMEKG_COLUMNS, QuestionSampler, load_hpo, load_primekg  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--questions", type=int, default=4000, help="questions to sample per graph")
ap.add_argument("--entities", type=int, default=120_000, help="synthetic graph: entities")
ap.add_argument("--edges", type=int, default=4_000_000, help="synthetic graph: edges")
ap.add_argument("--skip-synthetic", action="store_true", help="only the embedded graph")
ap.add_argument("--seed", type=int, default=0, help="seed")
args = ap.parse_args()


def bench_sampler(kg, name):
    s = QuestionSampler(kg, seed=args.seed)
    t = time.perf_counter()
    qs = s.sample_many(args.questions)
    dt = time.perf_counter() - t
    print(f"{name}: {len(qs)} questions in {dt:.2f} s = {len(qs) / dt:,.0f} questions/s (target >= 2,000)")


t = time.perf_counter()
kg = load_hpo()
print(f"HPO (hpo3): {len(kg.names):,} entities, {kg.num_edges:,} edges, loaded in "
      f"{time.perf_counter() - t:.2f} s")
bench_sampler(kg, "HPO sampler")

if not args.skip_synthetic:
    rng = np.random.default_rng(args.seed)
    n = args.entities
    # PrimeKG-like mix: 17k diseases, 8k drugs, 15k phenotypes, the rest proteins; power-law-ish degrees
    kinds = [("disease", 17_000), ("drug", 8_000), ("effect/phenotype", 15_000), ("gene/protein", n - 40_000)]
    start, ranges = 0, {}
    for k, c in kinds:
        ranges[k] = (start, start + c)
        start += c
    rels = [("disease_phenotype_positive", "disease", "effect/phenotype", 0.15), ("indication", "drug",
                                                                                  "disease", 0.01),
            ("contraindication", "drug", "disease", 0.02), ("disease_protein", "disease", "gene/protein",
                                                            0.05),
            ("drug_protein", "drug", "gene/protein", 0.02), ("protein_protein", "gene/protein",
                                                             "gene/protein", 0.75)]
    path = os.path.join(tempfile.mkdtemp(), "kg.csv")
    t = time.perf_counter()
    with open(path, "w") as f:
        f.write(",".join(PRIMEKG_COLUMNS) + "\n")
        for rel, xt, yt, frac in rels:
            m = int(args.edges * frac)
            (x0, x1), (y0, y1) = ranges[xt], ranges[yt]
            xs = x0 + (rng.random(m) ** 3 * (x1 - x0)).astype(np.int64)   # skewed: a few hubs, a long tail
            ys = y0 + rng.integers(0, y1 - y0, m)
            if xt == yt:   # PrimeKG keeps one copy of a symmetric pair per direction; we write x < y
                xs, ys = np.minimum(xs, ys), np.maximum(xs, ys)
            f.writelines(f"{rel},{rel},{x},X{x},{xt},{xt} {x},SRC,{y},Y{y},{yt},{yt} {y},SRC\n" for x,
                         y in zip(xs.tolist(), ys.tolist()))
    size = os.path.getsize(path) / 1e6
    print(f"synthetic kg.csv: {size:.0f} MB written in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    big = load_primekg(path)
    dt = time.perf_counter() - t
    print(f"synthetic PrimeKG: {len(big.names):,} entities, {big.num_edges:,} edges (after de-duplication), "
          f"loaded in {dt:.1f} s (target < 60 s)")
    bench_sampler(big, "synthetic PrimeKG sampler")
    os.remove(path)
