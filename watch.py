"""
watch.py: what the policy writes during GRPO, and warnings when a run goes wrong. train_grpo.py calls it;
the algorithm does not depend on it.

    RolloutLog   {out}/rollouts.jsonl: per step, up to --log-groups groups (question, the prompt once, each
                 completion with its reward parts, advantage, finish reason and length); every --print-every
                 steps one group on the console
    canaries     warnings, printed and logged: answers collapsing onto one option letter, empty or
                 repeated answer tags, the format reward outweighing correctness, truncation, entropy
                 collapse or blow-up
    Wandb        --wandb PROJECT: the same metrics and a completions table (WANDB_MODE=offline works)
"""
import json
import os
from collections import Counter

from common import MetricsLog, print0


class RolloutLog:
    """rollouts.jsonl, one line per group kept; a resumed run keeps the lines up to its checkpoint's step."""

    def __init__(self, out, rank, keep, print_every, resume_step=None):
        self.log = MetricsLog(os.path.join(out, "rollouts.jsonl"), rank, resume_step)
        self.rank, self.keep, self.print_every = rank, keep, print_every

    def groups(self, step, stage, items, questions, ro, sc, index):
        """This rank's groups whose index in the step's batch is below `keep` (index: global position of each
        of this rank's groups), as dicts. ro, sc: the step's train_grpo.Rollouts and Scores."""
        out = []
        for j, gi in enumerate(index):
            if gi >= self.keep:
                continue
            it = items[j]
            rows = range(j * ro.G, (j + 1) * ro.G)
            out.append(dict(step=step, stage=stage, index=gi, id=str(it.get("id")), tier=it.get("difficulty"),
                            answer=it["answer"], prompt=questions[j],
                            completions=[dict(text=ro.texts[r], correct=sc.parts[r][0], format=sc.parts[r][1],
                                              reward=round(sc.parts[r][2], 4),
                                              advantage=round(float(sc.adv[r]), 4), finish=ro.reasons[r],
                                              length=len(ro.outs[r])) for r in rows]))
        return out

    def write(self, step, groups):
        """groups: every rank's kept groups (gathered); rank 0 writes them in batch order and, every
        print_every steps, prints the first."""
        if self.rank != 0:
            return
        groups = sorted(groups, key=lambda g: g["index"])
        for g in groups:
            self.log.log(**g)
        if groups and self.print_every and step % self.print_every == 0:
            print0("\n" + show_group(groups[0]))


def show_group(g, width=110):
    """One group as text: the question, then each answer with its reward and advantage."""
    q = g["prompt"].split("\n\n")   # question, options, instruction
    lines = [f"--- step {g['step']} (stage {g['stage']}), question {g['id']} ({g['tier']}), "
             f"gold {g['answer']}",
             "  " + " ".join(" ".join(q[:-1]).split())[:2 * width]]
    for c in g["completions"]:
        text = " ".join(c["text"].split())
        text = text if len(text) <= width else text[:width // 2 - 3] + " ... " + text[-(width // 2 - 3):]
        adv = round(c["advantage"], 2) + 0.0   # never "-0.00"
        lines.append(f"  r={c['reward']:+.2f} A={adv:+.2f} {c['finish'][:4]:4s} {text}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# signals and canaries


def answer_signals(texts, picked, golds, parts, w_format):
    """A step's counts behind the canaries (add them up over ranks with merge_signals): the letters the
    answers name and the gold letters, bad answer tags, the format reward and all reward."""
    def bad(t):   # no tag, several, or an empty one
        return t.lower().count("<answer>") != 1 or not t.split("<answer>")[-1].split("</answer>")[0].strip()
    bad_tags = sum(bad(t) for t in texts)
    return dict(named=Counter(p for p in picked if p), gold=Counter(golds), bad_tags=bad_tags, n=len(texts),
                format_reward=w_format * sum(p[1] for p in parts), reward=sum(p[2] for p in parts))


def merge_signals(parts):
    out = dict(parts[0])
    for p in parts[1:]:
        out = {k: out[k] + p[k] for k in out}
    return out


class Canaries:
    """Warnings from a step's signals; each kind is printed when it first fires and then every `every` steps
    while it lasts. Thresholds are flags of train_grpo.py (--warn-*)."""

    def __init__(self, truncation=0.2, tags=0.2, letter=0.25, format_share=0.5, every=10):
        self.truncation, self.tags, self.letter, self.format_share = truncation, tags, letter, format_share
        self.every = every
        self.entropy0, self.last = None, {}

    def check(self, step, row, s):
        """Warnings (strings) for this step. row: the step's metrics; s: answer_signals summed over ranks."""
        out = {}
        n_named = sum(s["named"].values())
        letter, count = (s["named"].most_common(1) or [("-", 0)])[0]
        share = count / max(1, n_named)
        gold_top = max(s["gold"].values(), default=0) / max(1, sum(s["gold"].values()))
        if n_named >= 8 and share >= 0.6 and share >= gold_top + self.letter:
            out["letter"] = (f"answers collapse onto one letter: {share:.0%} of the answers name {letter} "
                             f"(the gold answers: at most {gold_top:.0%} on one letter)")
        if s["bad_tags"] / max(1, s["n"]) >= self.tags:
            out["tags"] = (f"{s['bad_tags'] / s['n']:.0%} of completions have an empty, missing or repeated "
                           f"<answer> tag")
        if s["reward"] > 0 and s["format_reward"] / s["reward"] >= self.format_share:
            share = s["format_reward"] / s["reward"]
            out["format"] = (f"the format reward is {share:.0%} of all reward: the policy earns its reward "
                             f"from the tags more than from right answers")
        if row["truncated_frac"] >= self.truncation:
            cut = row["truncated_frac"]
            out["truncation"] = (f"{cut:.0%} of completions hit --max-new-tokens and earn no reward: raise "
                                 f"it, or ask for shorter answers")
        ent = row.get("entropy")
        if ent:
            self.entropy0 = self.entropy0 or ent
            if ent < 0.05:
                out["entropy"] = f"entropy {ent:.3f}: the policy is collapsing onto single answers"
            elif ent > 2 and ent > 3 * self.entropy0:
                out["entropy"] = (f"entropy {ent:.2f}, {ent / self.entropy0:.1f}x its start: the policy is "
                                  f"blowing up")
        for kind, text in out.items():
            if kind not in self.last or step - self.last[kind] >= self.every:
                print0(f"\nwarning (step {step}): {text}")
                self.last[kind] = step
        for kind in list(self.last):
            if kind not in out:
                del self.last[kind]
        return list(out.values())


# -----------------------------------------------------------------------------
# Weights & Biases, optional


class Wandb:
    """The metrics and, every print_every steps, a completions table. A no-op without --wandb."""

    def __init__(self, project, args, rank):
        self.run = None
        if project and rank == 0:
            import wandb   # only when asked for: not a requirement
            self.wandb = wandb
            simple = (int, float, str, bool, type(None))
            config = {k: v for k, v in vars(args).items() if isinstance(v, simple)}
            self.run = wandb.init(project=project, config=config, dir=args.out)

    def log(self, row, groups=()):
        if self.run is None:
            return
        data = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if groups:
            columns = ["step", "question", "completion", "reward", "advantage", "finish"]
            table = self.wandb.Table(columns=columns)
            for g in groups:
                for c in g["completions"]:
                    table.add_data(g["step"], g["prompt"][-300:], c["text"], c["reward"], c["advantage"],
                                   c["finish"])
            data["completions"] = table
        self.run.log(data, step=row["step"])

    def finish(self):
        if self.run is not None:
            self.run.finish()


def read_rollouts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
