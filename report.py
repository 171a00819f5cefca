"""
report.py: curves one can read, and a static report of a run.

    python report.py runs/demo                 # a run.sh folder: stage table, curves, seed0's rollout groups
    python report.py runs/demo/seed0/grpo --steps 1,20,80      # one GRPO run, groups at these steps

Curves: raw values faint with a moving average on top, held-out accuracy with its 95 % interval, the stage
switch (dashed) and each re-mining (dotted) marked. report.html: one self-contained file (images embedded,
no script): the stage table, the curves, and the G answers of a few rollout groups side by side, coloured
by reward (green right, amber format only, red neither), each with its advantage.
"""
import base64
import glob
import html
import math
import os
import sys

from common import close_distributed, print0, read_metrics


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:   # matplotlib is optional at import
        return None


def moving_average(ys, w):
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - w] if i >= w else 0)
        out.append(acc / min(i + 1, w))
    return out


def draw(ax, rows, key, label=None, color=None):
    """One metric against step: raw faint + a moving average; val_accuracy with its Wilson 95 % band."""
    pts = [(r["step"], r[key], r.get("val_n")) for r in rows if isinstance(r.get(key), (int, float))]
    if not pts:
        return
    x, y = [p[0] for p in pts], [p[1] for p in pts]
    if key == "val_accuracy":
        from stats import wilson
        band = [wilson(round(a * n / 100), n) if n else (a, a) for _, a, n in pts]
        ax.fill_between(x, [b[0] for b in band], [b[1] for b in band], color=color, alpha=0.15)
        ax.plot(x, y, marker="o", ms=3, color=color, label=label)
        return
    w = max(3, len(pts) // 12)
    if len(pts) > 2 * w:
        ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
        ax.plot(x, moving_average(y, w), color=color, lw=1.8, label=label)
    else:
        ax.plot(x, y, marker=".", color=color, label=label)


def mark_curriculum(ax, rows):
    """Dashed: the step stage 2 began; dotted: each re-mining."""
    switch = next((r["step"] for r in rows if r.get("stage") == 2), None)
    if switch:
        ax.axvline(switch, color="k", ls="--", lw=0.8, alpha=0.6)
    for r in rows:
        if "mined_pool" in r and r["step"] != switch:
            ax.axvline(r["step"], color="k", ls=":", lw=0.6, alpha=0.4)


def plot_metrics(jsonl, png, keys, title=""):
    """PNG of the given keys against step (skipped quietly without matplotlib)."""
    plt = _plt()
    rows = read_metrics(jsonl)
    keys = [k for k in keys if any(k in r for r in rows)]
    if plt is None or not keys:
        return None
    cols = min(4, len(keys))
    n_rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3.2 * n_rows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        draw(ax, rows, k, color="C0")
        mark_curriculum(ax, rows)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def plot_runs(run_dir):
    """One PNG for a run.sh folder: SFT loss, GRPO reward, rollout accuracy, zero-variance groups, entropy and
    held-out accuracy by step, one colour per seed."""
    plt = _plt()
    if plt is None:
        return "matplotlib not installed: no plot"
    panels = [("sft", "loss", "SFT loss"), ("sft", "val_loss", "SFT held-out loss"),
              ("grpo", "reward", "GRPO reward"), ("grpo", "accuracy", "GRPO rollout accuracy"),
              ("grpo", "zero_var_frac", "zero-variance groups"),
              ("grpo", "val_accuracy", "GRPO held-out accuracy (%), 95 % interval")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (stage, key, title) in zip(axes.flat, panels):
        for i, sd in enumerate(sorted(glob.glob(os.path.join(run_dir, "seed*")))):
            p = os.path.join(sd, stage, "metrics.jsonl")
            if os.path.exists(p):
                rows = read_metrics(p)
                draw(ax, rows, key, label=os.path.basename(sd), color=f"C{i}")
                if stage == "grpo" and i == 0:
                    mark_curriculum(ax, rows)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# -----------------------------------------------------------------------------
# report.html

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
.group{margin:18px 0;padding:10px;border:1px solid #ddd;border-radius:6px}
.q{font-size:13px;white-space:pre-wrap}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:8px;margin-top:8px}
.card{border-radius:5px;padding:6px;font-size:12px}
.card pre{white-space:pre-wrap;margin:4px 0 0;font-size:11px}
.right{background:#dff3e0;border:1px solid #7cbf84}.fmt{background:#fff4d6;border:1px solid #d8b75b}
.none{background:#fbe3e1;border:1px solid #d48a83}
.pos{color:#17702a;font-weight:bold}.neg{color:#a3261b;font-weight:bold}"""


# -----------------------------------------------------------------------------
# the end of a training run (train_sft.py, train_grpo.py)


def finish_run(model, tok, args, ranks, memory, title, keys, png="curves.png"):
    """The end of a training run: the model in the HF layout at --out (not after --stop-after), its curves and
    report.html, each rank's peak memory beside the plan (memory: (meter, planned bytes)), and the process
    group torn down. ranks: (rank, world)."""
    from fsdp import export_hf
    from memplan import report_peaks
    (rank, world), (meter, planned) = ranks, memory
    if args.stop_after is None or args.stop_after >= args.steps:
        with meter.phase("export"):
            export_hf(model, tok, args.out, rank)
        if rank == 0:
            plot_metrics(os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, png), keys, title)
            write_report(args.out)
        print0(f"saved {args.out} (HF layout), {args.out}/{png} and {args.out}/report.html")
    report_peaks(meter, planned, rank, world)
    close_distributed()


def md_table(md):
    """A Markdown table (lines of |...|) as HTML."""
    rows = [[html.escape(c.strip()) for c in line.strip().strip("|").split("|")]
            for line in md.splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
    if not rows:
        return ""
    head = "".join(f"<th>{c}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def group_html(g):
    cards = []
    for c in g["completions"]:
        kind = "right" if c["correct"] else "fmt" if c["format"] else "none"
        adv = round(c["advantage"], 2) + 0.0   # + 0.0: a float-rounding -1e-9 shows as +0.00, not -0.00
        sign = "pos" if adv > 0 else "neg" if adv < 0 else ""
        cards.append(f'<div class="card {kind}">reward {c["reward"]:.2f} &middot; advantage '
                     f'<span class="{sign}">{adv:+.2f}</span> &middot; '
                     f'{html.escape(c["finish"])}, {c["length"]} tokens'
                     f'<pre>{html.escape(c["text"])}</pre></div>')
    question = "\n\n".join(g["prompt"].split("\n\n")[:-1]) or g["prompt"]
    return (f'<div class="group"><b>step {g["step"]}</b> (stage {g["stage"]}), question '
            f'{html.escape(g["id"])} ({html.escape(str(g["tier"]))}), gold <b>{html.escape(g["answer"])}</b>'
            f'<div class="q">{html.escape(question)}</div><div class="cards">{"".join(cards)}</div></div>')


def write_report(run_dir, steps=None, groups_per_step=2):
    """run_dir/report.html: the stage table (a run.sh folder), the curves, and rollout groups at a few steps
    (default: the first, the stage switch, the middle and the last)."""
    parts = [f"<h1>{html.escape(os.path.abspath(run_dir))}</h1>"]
    table = os.path.join(run_dir, "stage_table.md")
    if os.path.exists(table):
        parts += ["<h2>Stage table</h2>", md_table(open(table).read())]
    for png in ("curves.png", "loss.png"):
        p = os.path.join(run_dir, png)
        if os.path.exists(p):
            data = base64.b64encode(open(p, "rb").read()).decode()
            img = f'<img src="data:image/png;base64,{data}" style="max-width:100%">'
            parts += [f"<h2>{png[:-4]}</h2>", img]
    logs = [os.path.join(run_dir, "rollouts.jsonl")] + sorted(glob.glob(os.path.join(run_dir, "seed*", "grpo",
                                                                                      "rollouts.jsonl")))
    log = next((p for p in logs if os.path.exists(p)), None)
    groups = []
    if log:
        from watch import read_rollouts
        groups = read_rollouts(log)
    if groups:
        have = sorted({g["step"] for g in groups})
        if steps is None:
            switch = next((g["step"] for g in groups if g["stage"] == 2), have[-1])
            steps = sorted({have[0], switch, have[len(have) // 2], have[-1]})
        parts.append(f"<h2>Rollout groups ({html.escape(os.path.relpath(log, run_dir))})</h2>")
        for s in steps:
            parts += [group_html(g) for g in [g for g in groups if g["step"] == s][:groups_per_step]]
    out = os.path.join(run_dir, "report.html")
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>nanofleming report</title>"
                f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    os.replace(out + ".tmp", out)
    return out


if __name__ == "__main__":
    from cli import Parser
    ap = Parser(description=__doc__)
    ap.add_argument("run_dir", help="a run.sh folder (seed*/) or a train_grpo.py --out folder")
    ap.add_argument("--steps", default=None, help="comma list of steps whose rollout groups to show")
    args = ap.parse_args()
    if not os.path.isdir(args.run_dir):
        sys.exit(f"{args.run_dir}: no such folder")
    if glob.glob(os.path.join(args.run_dir, "seed*")):
        plot_runs(args.run_dir)
    print(write_report(args.run_dir, [int(s) for s in args.steps.split(",")] if args.steps else None))
