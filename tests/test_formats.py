"""PubTator and BioC in, TSV / JSON Lines / BioC out (drugprot.formats): round trips through the ``bioc`` package,
the same relations as the official TSV path, skipped mention types, and errors that name the file and the line
or the document."""

from __future__ import annotations

import json
import pytest
from fixtures_bulk import dev_sample, relation_model_dir  # noqa: F401  (fixtures)

from drugprot.cli import main
from drugprot.config import SAMPLE_DIR
from drugprot.corpus import CorpusError
from drugprot.formats import ReadStats, input_files, read_documents, render, write_bioc, write_pubtator
from drugprot.inference import PredictedRelation


def _spans(document):
    return sorted((e.start, e.end, e.type, e.text) for e in document.entities.values())


@pytest.mark.parametrize(("name", "fmt"), [("dev.pubtator", "pubtator"), ("dev.xml", "bioc"), ("dev.json", "bioc")])
def test_sample_round_trips_through_each_format(dev_sample, tmp_path, name, fmt):
    path = tmp_path / name
    (write_pubtator if fmt == "pubtator" else write_bioc)(path, dev_sample)
    stats = ReadStats()
    back = list(read_documents(path, fmt, stats))
    assert [d.pmid for d in back] == [d.pmid for d in dev_sample]
    assert [d.text for d in back] == [d.text for d in dev_sample]
    assert [_spans(d) for d in back] == [_spans(d) for d in dev_sample]
    assert stats.documents == 10 and stats.entities == sum(len(d.entities) for d in dev_sample) and not stats.skipped_types


def _relations_by_span(rows, documents):
    """(pmid, type, chemical span, gene span) for official TSV rows, resolving entity ids in ``documents``."""
    by_pmid = {d.pmid: d for d in documents}
    out = set()
    for pmid, rtype, arg1, arg2 in rows:
        entities = by_pmid[pmid].entities
        chem, gene = entities[arg1.removeprefix("Arg1:")], entities[arg2.removeprefix("Arg2:")]
        out.add((pmid, rtype, (chem.start, chem.end), (gene.start, gene.end)))
    return out


def test_pubtator_and_bioc_give_the_relations_of_the_tsv_path(relation_model_dir, dev_sample, tmp_path):
    tsv = tmp_path / "official.tsv"
    assert main(["predict", "--model", str(relation_model_dir), "--data", str(SAMPLE_DIR), "--out", str(tsv),
                 "--device", "cpu", "--quiet"]) == 0
    expected = _relations_by_span([line.split("\t") for line in tsv.read_text().splitlines()], dev_sample)
    assert len(expected) >= 20  # the model predicts relations, so the comparison means something
    (tmp_path / "in").mkdir()
    write_pubtator(tmp_path / "in" / "dev.pubtator", dev_sample)  # a folder input
    write_bioc(tmp_path / "in-xml.xml", dev_sample)
    write_bioc(tmp_path / "in-json.json", dev_sample)
    for source, fmt in ((tmp_path / "in", "pubtator"), (tmp_path / "in-xml.xml", "bioc"), (tmp_path / "in-json.json", "bioc")):
        out = tmp_path / f"out-{source.name}"
        assert main(["predict", "--model", str(relation_model_dir), "--input", str(source), "--format", fmt,
                     "--output-format", "jsonl", "--out", str(out), "--device", "cpu", "--shard-size", "4", "--quiet"]) == 0
        got = set()
        for shard in sorted(out.glob("part-*.jsonl")):
            for line in shard.read_text().splitlines():
                record = json.loads(line)
                for r in record["relations"]:
                    got.add((record["pmid"], r["type"], (r["chemical"]["start"], r["chemical"]["end"]),
                             (r["gene"]["start"], r["gene"]["end"])))
        assert got == expected, source


def test_unknown_mention_types_are_counted_and_skipped(tmp_path):
    text = "Aspirin inhibits COX-1 in mice with arthritis."
    path = tmp_path / "x.pubtator"
    path.write_text(f"1|t|{text}\n1|a|More.\n1\t0\t7\tAspirin\tChemical\tD001241\n1\t17\t22\tCOX-1\tGene\t5742\n"
                    f"1\t26\t30\tmice\tSpecies\t10090\n1\t36\t45\tarthritis\tDisease\tD001168\n"
                    f"1\t36\t45\tarthritis\tDisease\tD001168\n")
    stats = ReadStats()
    [document] = read_documents(path, "pubtator", stats)
    assert {e.id: (e.type, e.text) for e in document.entities.values()} == {"T1": ("CHEMICAL", "Aspirin"),
                                                                            "T2": ("GENE", "COX-1")}
    assert stats.skipped_types == {"Species": 1, "Disease": 2}


PUBTATOR_ERRORS = [
    ("1|t|Aspirin and COX-1.\n1|a|x\n1\t0\t9\tAspirin\tChemical\tD1\n", r"x\.pubtator:3: mention T1: text 'Aspirin' does not match"),
    ("1|t|Aspirin and COX-1.\n1|a|x\n1\t0\t99\tAspirin\tChemical\tD1\n", r"x\.pubtator:3: mention T1: offsets 0-99 out of range"),
    ("1|t|Aspirin and COX-1.\n1|a|x\n1\t0\t7\tAspirin\tChemical\tD1\n1\t14\tCOX-1\n", r"x\.pubtator:4: expected .* found 3 column"),
    ("1|t|Aspirin and COX-1.\n1|a|x\n1\tzero\t7\tAspirin\tChemical\tD1\n", r"x\.pubtator:3: cannot parse the annotation"),
    ("1|t|A.\n1|a|x\n\n1|t|B.\n1|a|y\n", r"x\.pubtator:4: duplicate PMID 1 \(first at line 1\)"),
    ("1|t|A.\n1|a|x\n2|t|B.\n", r"x\.pubtator:3: a second title line in PMID"),
    ("1|t|Aspirin.\n2\t0\t7\tAspirin\tChemical\tD1\n", r"x\.pubtator:2: mention of PMID 2 inside the document of PMID 1"),
]


@pytest.mark.parametrize(("content", "message"), PUBTATOR_ERRORS)
def test_bad_pubtator_names_the_line(tmp_path, content, message):
    path = tmp_path / "x.pubtator"
    path.write_text(content)
    with pytest.raises(CorpusError, match=message):
        list(read_documents(path, "pubtator"))


BIOC_DOCUMENT = ('<document><id>{pmid}</id><passage><offset>0</offset><text>Aspirin and COX-1.</text>'
                 '<annotation id="A1"><infon key="type">Chemical</infon><location offset="{start}" length="7"/>'
                 '<text>Aspirin</text></annotation></passage></document>')


@pytest.mark.parametrize(("documents", "message"), [
    (BIOC_DOCUMENT.format(pmid="7", start=1), r"x\.xml: document 7: mention A1: text 'Aspirin' does not match"),
    (BIOC_DOCUMENT.format(pmid="7", start=0) * 2, r"x\.xml: document 7: duplicate document id"),
    (BIOC_DOCUMENT.format(pmid="", start=0), r"x\.xml: document #1: has no id"),
    ('<document><id>3</id><passage><offset>5</offset><text>late</text></passage></document>',
     r"document 3: the first passage starts at offset 5"),
    ('<document><id>3</id><passage><offset>0</offset><text>ab</text></passage>'
     '<passage><offset>2</offset><text>cd</text></passage></document>', r"document 3: passage at offset 2 overlaps"),
    ('<document><id>3</id><passage><offset>0</offset><text>ab</text></document>', r"x\.xml:1: not valid XML"),
])
def test_bad_bioc_names_the_document(tmp_path, documents, message):
    path = tmp_path / "x.xml"
    path.write_text(f'<?xml version="1.0" encoding="utf-8"?><collection><source/><date/><key/>{documents}</collection>')
    with pytest.raises(CorpusError, match=message):
        list(read_documents(path, "bioc"))


def test_bad_bioc_json_names_the_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"documents": [\n{"id": 1,}\n]}')
    with pytest.raises(CorpusError, match=r"x\.json:2: not valid JSON"):
        list(read_documents(path, "bioc"))


def test_outputs_carry_relations_scores_and_votes(dev_sample):
    document = dev_sample[0]
    chem = next(e for e in document.entities.values() if e.type == "CHEMICAL")
    gene = next(e for e in document.entities.values() if e.is_gene)
    predictions = [[PredictedRelation(document.pmid, chem.id, gene.id, "INHIBITOR", 0.75, ("INHIBITOR", "NONE"))]]
    assert render([document], predictions, "tsv").decode() == f"{document.pmid}\tINHIBITOR\tArg1:{chem.id}\tArg2:{gene.id}\n"
    [relation] = json.loads(render([document], predictions, "jsonl"))["relations"]
    assert relation == {"type": "INHIBITOR", "score": 0.75, "votes": ["INHIBITOR", "NONE"],
                        "chemical": {"id": chem.id, "type": "CHEMICAL", "start": chem.start, "end": chem.end, "text": chem.text},
                        "gene": {"id": gene.id, "type": gene.type, "start": gene.start, "end": gene.end, "text": gene.text}}
    from bioc import biocxml

    [out] = biocxml.loads(render([document], predictions, "bioc").decode()).documents
    [bioc_relation] = out.relations
    assert bioc_relation.infons == {"type": "INHIBITOR", "score": "0.75", "votes": "INHIBITOR,NONE"}
    assert [(n.refid, n.role) for n in bioc_relation.nodes] == [(chem.id, "Arg1"), (gene.id, "Arg2")]
    assert {a.id for p in out.passages for a in p.annotations} == set(document.entities)


def test_input_folder_without_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no pubtator files"):
        input_files([tmp_path / "empty"], "pubtator")
