"""
stats.py: the intervals and paired tests behind every accuracy this project prints (evaluate.py's tables,
the stage table, report.py's curves). On Medbullets (308 items) a 95 % interval is about +-5.5 points, wider
than most steps in the paper's Table 4.

    from stats import wilson, macro_ci, paired_diff_ci, mcnemar
    wilson(150, 308)        # (43.2, 54.3): 95 % Wilson interval of 150 right out of 308, in percent
"""
import math

Z95 = 1.959963984540054


def wilson(k, n, z=Z95):
    """95 % Wilson score interval of k right out of n, in percent."""
    if n == 0:
        return float("nan"), float("nan")
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return 100 * (c - h), 100 * (c + h)


def bootstrap_means(values, reps=2000, seed=0):
    """Means of `reps` resamples (with replacement) of the items: values[i] is item i's score."""
    import numpy as np
    v = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(v), (reps, len(v)))
    return v[idx].mean(1)


def percentile_ci(samples):
    import numpy as np
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def macro_ci(correct_by_bench, reps=2000, seed=0):
    """95 % interval of the macro average (percent): each benchmark's items resampled on their own."""
    import numpy as np
    means = [bootstrap_means(c, reps, seed + i) for i, c in enumerate(correct_by_bench.values())]
    return percentile_ci(100 * np.mean(means, axis=0))


def paired_diff_ci(a, b, reps=2000, seed=0):
    """Model B minus model A on the same items (0/1 per item, aligned): the difference in points and its 95 %
    paired-bootstrap interval (items resampled, both models' answers kept together)."""
    d = [y - x for x, y in zip(a, b)]
    return 100 * sum(d) / len(d), tuple(100 * x for x in percentile_ci(bootstrap_means(d, reps, seed)))


def mcnemar(b, c):
    """Exact two-sided McNemar p-value from the discordant pairs: b items only A got right, c only B."""
    n = b + c
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)
