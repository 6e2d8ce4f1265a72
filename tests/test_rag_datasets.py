"""Dataset readers: HotpotQA json, LongBench jsonl, selection, the shipped file."""

import json

import pytest

from ucm.rag.datasets import (
    DatasetFormatError,
    RagSample,
    default_hotpotqa_path,
    detect_format,
    format_passage,
    iter_passages,
    load_samples,
    read_samples,
    select_samples,
    split_longbench_context,
)

HOTPOT_RECORDS = [
    {
        "_id": "q1",
        "question": "Were A and B of the same nationality?",
        "answer": "yes",
        "type": "comparison",
        "level": "hard",
        "supporting_facts": [["A", 0], ["B", 0]],
        "context": [
            ["A", ["A is an American director.", " He lives in LA."]],
            ["B", ["B was an American filmmaker."]],
            ["C", ["C is a town."]],
        ],
    },
    {
        "_id": "q2",
        "question": "Who wrote X?",
        "answer": "Y Z",
        "context": [["X", ["X is a novel by Y Z."]], ["W", ["W is a river."]]],
    },
]

LONGBENCH_LINES = [
    {
        "_id": "lb1",
        "input": "Who is the father of Waldrada?",
        "answers": ["Count Odacer", "Odacer"],
        "context": "Passage 1:\nWaldrada of Lotharingia\nWaldrada was the mistress of Lothair II.\n"
        "She was a daughter of Count Odacer.\nPassage 2:\nLothair II\nLothair II was a king.\n",
        "length": 30,
        "dataset": "2wikimqa",
    },
    {"_id": "lb2", "input": "Q2?", "answers": ["a2"], "context": "Passage 1:\nT1\nText one.\nPassage 10:\nOnly text"},
]


@pytest.fixture
def hotpot_file(tmp_path):
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(HOTPOT_RECORDS))
    return path


@pytest.fixture
def longbench_file(tmp_path):
    path = tmp_path / "2wikimqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in LONGBENCH_LINES) + "\n\n")
    return path


def test_read_hotpotqa_fixture(hotpot_file):
    samples = read_samples(hotpot_file)
    assert [s.id for s in samples] == ["q1", "q2"]
    first = samples[0]
    assert first.question == "Were A and B of the same nationality?"
    assert first.answers == ["yes"]
    # Sentences are joined as-is: the second carries its own leading space.
    assert first.passages[0] == ("A", "A is an American director. He lives in LA.")
    assert [t for t, _ in first.passages] == ["A", "B", "C"]
    assert first.passage_texts()[1] == "B\nB was an American filmmaker.\n"


def test_read_longbench_fixture(longbench_file):
    samples = read_samples(longbench_file)
    assert [s.id for s in samples] == ["lb1", "lb2"]
    first = samples[0]
    assert first.question == "Who is the father of Waldrada?"
    assert first.answers == ["Count Odacer", "Odacer"]
    assert first.passages == [
        ("Waldrada of Lotharingia", "Waldrada was the mistress of Lothair II.\nShe was a daughter of Count Odacer."),
        ("Lothair II", "Lothair II was a king."),
    ]
    # Multi-digit passage numbers; a one-line block has no title.
    assert samples[1].passages == [("T1", "Text one."), ("", "Only text")]


def test_split_longbench_context_edge_cases():
    assert split_longbench_context("just text, no markers") == [("", "just text, no markers")]
    assert split_longbench_context("") == []
    # Text before the first marker is kept, untitled; "Passage" mid-line is not a marker.
    got = split_longbench_context("Intro line\nPassage 1:\nT\nsee Passage 2: here\n")
    assert got == [("", "Intro line"), ("T", "see Passage 2: here")]


def test_detect_format_by_extension_and_content(tmp_path, hotpot_file, longbench_file):
    assert detect_format(hotpot_file) == "hotpotqa"
    assert detect_format(longbench_file) == "longbench"
    odd_list = tmp_path / "data.txt"
    odd_list.write_text(json.dumps(HOTPOT_RECORDS))
    odd_lines = tmp_path / "data.dat"
    odd_lines.write_text(json.dumps(LONGBENCH_LINES[0]) + "\n")
    assert detect_format(odd_list) == "hotpotqa"
    assert detect_format(odd_lines) == "longbench"
    bad = tmp_path / "bad.txt"
    bad.write_text("hello")
    with pytest.raises(DatasetFormatError):
        detect_format(bad)


def test_malformed_files_raise_format_errors(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DatasetFormatError):
        read_samples(bad_json)
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text('{"input": "q"}\n')
    with pytest.raises(DatasetFormatError, match="line 1"):
        read_samples(bad_lines)


def test_selection_is_deterministic_and_in_file_order():
    samples = [RagSample(id=str(i), question="q", passages=[("t", "x")], answers=["a"]) for i in range(50)]
    a = select_samples(samples, 10, seed=3)
    b = select_samples(samples, 10, seed=3)
    c = select_samples(samples, 10, seed=4)
    assert [s.id for s in a] == [s.id for s in b]
    assert [s.id for s in a] != [s.id for s in c]
    assert [int(s.id) for s in a] == sorted(int(s.id) for s in a)
    assert len(select_samples(samples, None, 0)) == 50
    assert len(select_samples(samples, 500, 0)) == 50
    with pytest.raises(ValueError):
        select_samples(samples, -1, 0)


def test_load_samples_with_paths_and_min_passages(hotpot_file, longbench_file):
    assert len(load_samples(hotpot_file, 5, 0)) == 2
    assert [s.id for s in load_samples(hotpot_file, None, 0, min_passages=3)] == ["q1"]
    assert [s.id for s in load_samples(str(longbench_file), 1, 0)] in (["lb1"], ["lb2"])


def test_format_passage_and_distinct_passages():
    assert format_passage(" T ", " body \n") == "T\nbody\n"
    assert format_passage("", "body") == "body\n"
    s1 = RagSample("1", "q", [("A", "x"), ("B", "y")], ["a"])
    s2 = RagSample("2", "q", [("B", "y"), ("C", "z")], ["a"])
    assert list(iter_passages([s1, s2])) == ["A\nx\n", "B\ny\n", "C\nz\n"]


def test_default_hotpotqa_file_is_the_distractor_dev_set():
    path = default_hotpotqa_path()
    assert path.name == "hotpotqa.json" and path.parent.name == "json"
    samples = read_samples(path)
    assert len(samples) == 7405
    for sample in samples[:5]:
        assert len(sample.passages) == 10
        assert all(title and text for title, text in sample.passages)
        assert sample.answers and sample.answers[0]
    assert samples[0].question == "Were Scott Derrickson and Ed Wood of the same nationality?"
    assert samples[0].answers == ["yes"]
    # Default path (None) and deterministic selection.
    picked = load_samples(None, 3, seed=0)
    assert [s.id for s in picked] == [s.id for s in load_samples(None, 3, seed=0)]
    assert all(s.id in {x.id for x in samples} for s in picked)
