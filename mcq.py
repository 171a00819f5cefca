"""
mcq.py: the multiple-choice contract that data preparation, training and evaluation share: the prompt, the
strict answer parser (the GRPO reward reads answers with it), the format check, and the readers and
converters that bring each benchmark's upstream rows to one schema: {id, question, options {letter: text},
answer (a letter), context?}.

    from mcq import build_messages, extract_answer
    extract_answer("<think>...</think><answer>C</answer>", {"A": "x", "B": "y", "C": "z"})   # -> "C"
"""
import json
import re
import unicodedata

LETTERS = "ABCDEFGHIJKLMNOPQRSTU"

# -----------------------------------------------------------------------------
# one prompt format, shared with training

SYSTEM_PROMPT = "You are a medical expert. Reason step by step, then give the final answer."
INSTRUCTION = "Think it through, then put the letter of the correct option in <answer></answer>."


def build_messages(item):
    """item: {question, options {letter: text}, optional context} -> chat messages (system + user)."""
    parts = []
    if item.get("context"):
        parts.append(f"Context: {item['context']}")
    parts.append(item["question"].strip())
    parts.append("\n".join(f"{L}. {t}" for L, t in item["options"].items()))
    parts.append(INSTRUCTION)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]


def prompt_ids(tok, item):
    ids = tok.apply_chat_template(build_messages(item), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# -----------------------------------------------------------------------------
# strict answer extraction (also the GRPO reward's parser)

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_PREFIX = re.compile(r"^(the\s+)?(final\s+)?(answer|option|choice|答案|选项)\s*(is)?\s*[:：是为]?\s*",
                     re.IGNORECASE)


_EDGES = "*_`'\" \t\r\n.。!,;，；:："


def canon(text):
    """The form option texts and answers are compared in, the same on both sides: NFKC (full-width letters and
    punctuation to ASCII), case and runs of spaces folded, quotes, markup and end punctuation trimmed from the
    ends (public options can end in a stray quote or newline: 'A. "Tell me more."')."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).lower().split()).strip(_EDGES)


def parse_answer_content(content, options):
    """The inside of one <answer> tag -> a letter, or None (empty, several letters, ambiguous text)."""
    valid = list(options)
    texts = {L: canon(t) for L, t in options.items()}

    def by_text(text):   # the letter whose option text this is, if exactly one
        hits = [L for L in valid if texts[L] == canon(text)]
        return hits[0] if len(hits) == 1 else None

    s = unicodedata.normalize("NFKC", content).strip()
    if by_text(s):   # the whole content is one option's text (checked before prefixes are stripped)
        return by_text(s)
    s = _PREFIX.sub("", s).strip().strip(_EDGES)
    if not s:
        return None
    # a bare letter, maybe bracketed: C, (C), [C], C), c
    m = re.fullmatch(r"[\(\[]?([A-Za-z])[\)\]]?", s)
    if m:
        L = m.group(1).upper()
        return L if L in valid else None
    # "C. text" / "(C) text" / "C: text": the letter counts if the text is that option's
    m = re.fullmatch(r"[\(\[]?([A-Za-z])[\)\]\.:：]\s*(.+)", s, re.DOTALL)
    if m:
        L = m.group(1).upper()
        return L if L in valid and canon(m.group(2)) == texts[L] else None
    return by_text(s)   # the text of exactly one option


def extract_answer(response, options, lenient=False):
    """Strict: the last well-formed <answer> tag holding one option letter or one exact option text.
    lenient: if that fails, phrases like 'the answer is C' (reported separately, never mixed in)."""
    tags = ANSWER_TAG.findall(response)
    if tags:
        return parse_answer_content(tags[-1], options)
    if lenient:
        text = unicodedata.normalize("NFKC", response)
        m = re.findall(r"answer\s+is\s*:?\s*\(?([A-Za-z])\)?(?![A-Za-z])", text, re.I)
        if m and m[-1].upper() in options:
            return m[-1].upper()
    return None


def format_ok(response, require_think=False):
    """Exactly one <answer>...</answer>, nothing after it but whitespace / end token; optional <think> block
    first."""
    if len(ANSWER_TAG.findall(response)) != 1 or response.lower().count("<answer>") != 1:
        return False
    tail = response[ANSWER_TAG.search(response).end():].replace("<|im_end|>", "").replace("<|endoftext|>", "")
    if tail.strip():
        return False
    if require_think:
        return re.match(r"\s*<think>.+?</think>", response, re.DOTALL) is not None
    return True


# -----------------------------------------------------------------------------
# benchmarks: upstream schema -> {id, question, options, answer, context?}

def _letters(opts):
    return {LETTERS[i]: str(t) for i, t in enumerate(opts)}


def _strip_listed_options(q):
    # MedXpertQA's question text can end with "Answer Choices: (A) ... (B) ...": printed once, by us
    return re.split(r"\n?\s*Answer Choices:\s*\(A\)", q, maxsplit=1)[0].rstrip()


def conv_medqa(r, i):
    return dict(id=r.get("id", i), question=r["question"], options=dict(r["options"]), answer=r["answer_idx"])


def conv_medxpertqa(r, i):
    return dict(id=r.get("id", i), question=_strip_listed_options(r["question"]), options=dict(r["options"]),
                answer=r["label"])


def conv_medmcqa(r, i):
    return dict(id=r.get("id", i), question=r["question"],
                options=_letters([r["opa"], r["opb"], r["opc"], r["opd"]]),
                answer=LETTERS[int(r["cop"])])


def conv_careqa(r, i):   # cop is 1-based
    return dict(id=r.get("unique_id", r.get("id", i)), question=r["question"],
                options=_letters([r["op1"], r["op2"], r["op3"], r["op4"]]), answer=LETTERS[int(r["cop"]) - 1])


def conv_mmlu_pro(r, i):
    return dict(id=r.get("question_id", i), question=r["question"],
                options=_letters([o for o in r["options"] if o not in ("N/A", "")]), answer=r["answer"])


def conv_jmed(r, i):
    ans = r["answer"]
    if isinstance(ans, list):
        if len(ans) != 1:
            return None   # multi-answer items are not single-choice
        ans = ans[0]
    return dict(id=r.get("id", i), question=r["question"], options=dict(r["options"]),
                answer=str(ans).strip())


def conv_pubmedqa(r, i):
    ctx = r["context"]["contexts"] if isinstance(r["context"], dict) else r["context"]
    return dict(id=r.get("pubid", i), question=r["question"], context=" ".join(ctx),
                options={"A": "yes", "B": "no", "C": "maybe"},
                answer="ABC"[["yes", "no", "maybe"].index(r["final_decision"])])


def conv_medbullets(r, i):
    if "options" in r:
        opts = dict(r["options"])
    else:
        opts = _letters([r[k] for k in ("opa", "opb", "opc", "opd", "ope") if r.get(k)])
    return dict(id=r.get("id", i), question=r["question"], options=opts, answer=r["answer_idx"])


def conv_ours(r, i):   # make_data.py's schema
    return dict(id=r["id"], question=r["question"], options=dict(r["options"]), answer=r["answer"],
                context=r.get("context"))


# -----------------------------------------------------------------------------
# reading files


def read_records(path):
    """JSONL / JSON list / Parquet / CSV rows as dicts; errors name the file and line."""
    if path.endswith(".parquet") or path.endswith(".csv"):
        import datasets
        kind = "parquet" if path.endswith(".parquet") else "csv"
        return list(datasets.load_dataset(kind, data_files=path, split="train"))
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a UTF-8 JSON file ({type(e).__name__})") from None
        return data if isinstance(data, list) else list(data.values())
    return [r for _, r in jsonl_rows(path)]


def jsonl_rows(path):
    """(line number, object) for each non-blank line; errors name the file and line."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{line}: not UTF-8 text") from None
            if text.strip():
                try:
                    yield line, json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line}: not valid JSON ({e.msg})") from None


def convert(rows, conv, path, row_filter=None):
    items = []
    for i, r in enumerate(rows):
        if row_filter and r.get(row_filter[0]) != row_filter[1]:
            continue
        try:
            it = conv(r, i)
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise ValueError(f"{path}:{i + 1}: bad record, field {e}") from None
        if it is None:
            continue
        if it["answer"] not in it["options"]:
            raise ValueError(f"{path}:{i + 1}: field 'answer': {it['answer']!r} is not one of the options "
                             f"{list(it['options'])}")
        it["id"] = str(it["id"])
        items.append(it)
    return items
