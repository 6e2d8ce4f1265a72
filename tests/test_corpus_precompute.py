"""``ucm precompute``'s pure parts, no engine: corpus parsing, shards, chunking, skip logic,
write accounting, settings refusals, signals and the ``python -m ucm`` dispatcher.

The end-to-end run (a real engine, an interrupt, a resume, two shards) is in
tests/vllm/test_corpus_precompute_e2e.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest

from tests.tiny_tokenizer import build_tokenizer, passages
from ucm.hashing import block_keys, rank_key
from ucm.integration.vllm import corpus_precompute as cp
from ucm.integration.vllm import precompute_cli as cli
from ucm.integration.vllm.text_prompts import tokenize_segments
from ucm.sparse.blend.chunking import Delimiter, split_prompt

SEP = " # # "
BLOCK = 16


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---- corpus ---------------------------------------------------------------------


def test_corpus_reads_documents_in_order_with_optional_ids(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "a", "text": "first"}), "",
                                              json.dumps({"text": "second", "extra": 1}),
                                              json.dumps({"id": 7, "text": "   "})])
    docs = list(cp.read_corpus(str(path)))
    assert [(d.line, d.doc_id, d.text) for d in docs] == [(1, "a", "first"), (3, None, "second"), (4, "7", "   ")]
    assert [d.empty for d in docs] == [False, False, True]
    assert cp.count_documents(str(path)) == 3


def test_corpus_text_field_is_configurable(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"passage": "body", "text": 3})])
    assert [d.text for d in cp.read_corpus(str(path), "passage")] == ["body"]


@pytest.mark.parametrize("bad, reason", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"body": "x"}', "no 'text' field (keys: body)"),
    ('{"text": null}', "field 'text' must be a string, got NoneType"),
    ('{"text": ["a"]}', "field 'text' must be a string, got list"),
    ('{"text": "x", "id": 1.5}', "field 'id' must be a string or an integer, got float"),
    ('{"text": "x", "id": true}', "field 'id' must be a string or an integer, got bool"),
])
def test_a_malformed_line_is_an_error_naming_its_line(tmp_path, bad, reason):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"text": "ok"}), "", bad, json.dumps({"text": "after"})])
    with pytest.raises(cp.CorpusError) as err:
        cp.count_documents(str(path))
    assert err.value.line == 3
    assert str(err.value).startswith(f"{path}:3: ") and reason in str(err.value)


def test_undecodable_bytes_are_an_error_naming_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(cp.CorpusError, match=r":2: not UTF-8"):
        cp.count_documents(str(path))


def test_main_exits_2_on_a_malformed_line_before_any_engine(tmp_path, capsys):
    corpus = write_lines(tmp_path / "c.jsonl", [json.dumps({"text": "ok"}), "{oops"])
    code = cli.main(["--model", "unused", "--corpus", str(corpus), "--store", str(tmp_path / "store")])
    assert code == cli.EXIT_USAGE
    assert f"{corpus}:2: not valid JSON" in capsys.readouterr().err


# ---- shards ---------------------------------------------------------------------


def test_shard_arg_parses_and_validates():
    assert cp.Shard.parse("0/1") == cp.Shard(0, 1)
    assert cp.Shard.parse(" 3/4 ") == cp.Shard(3, 4)
    for bad, words in [("1", "expected i/n"), ("a/b", "expected i/n"), ("1/2/3", "expected i/n"), ("", "expected"),
                       ("2/2", "0..1"), ("-1/2", "0..1"), ("0/0", "must be >= 1"), ("5/3", "0..2")]:
        with pytest.raises(cp.UsageError, match="--shard") as err:
            cp.Shard.parse(bad)
        assert words in str(err.value), (bad, str(err.value))


def test_main_exits_2_on_a_bad_shard(tmp_path, capsys):
    corpus = write_lines(tmp_path / "c.jsonl", [json.dumps({"text": "ok"})])
    code = cli.main(["--model", "m", "--corpus", str(corpus), "--store", str(tmp_path / "s"), "--shard", "2/2"])
    assert code == cli.EXIT_USAGE and "--shard: the index must be in 0..1" in capsys.readouterr().err


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover_every_chunk(count):
    rng = random.Random(count)
    chunks = [[rng.randrange(512) for _ in range(rng.randrange(1, 80))] for _ in range(600)]
    owners = []
    for ids in chunks:
        digest = cp.chunk_digest(ids)
        owning = [i for i in range(count) if cp.Shard(i, count).owns(digest)]
        assert len(owning) == 1  # disjoint, and covered
        owners.append(owning[0])
    assert sorted(set(owners)) == list(range(count))  # every shard gets work
    assert min(owners.count(i) for i in range(count)) > 600 / count / 2  # and roughly its share


def test_shard_assignment_is_stable_across_processes_and_versions():
    """Hosts must agree without talking: the digest is BLAKE2b of little-endian int64 tokens."""
    assert cp.chunk_digest([1, 2, 3]).hex() == "abccad42d03c940bc2b249bf5a4e1e3d"
    assert cp.Shard(0, 5).owner(cp.chunk_digest([1, 2, 3])) == int.from_bytes(cp.chunk_digest([1, 2, 3])[:8],
                                                                               "little") % 5


# ---- documents to chunks ----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("tok")))


def sep_chunker(tokenizer) -> cp.DocumentChunker:
    sep_ids = tuple(tokenizer.encode(SEP, add_special_tokens=False))
    return cp.DocumentChunker(tokenizer, Delimiter(separator_token_ids=sep_ids), SEP)


def test_a_document_chunk_is_what_the_connector_finds_in_a_served_text_prompt(tokenizer):
    docs = passages(3, 40, seed=4)
    served = tokenize_segments(tokenizer, "Answer from the passages." + SEP + SEP.join(docs) + SEP + "Question: why?",
                               SEP, add_special_tokens=True)
    chunker = sep_chunker(tokenizer)
    split = split_prompt(served, chunker.delimiter)
    assert [served[c.start:c.end] for c in split.chunks] == [chunker.chunks(d)[0] for d in docs]
    assert all(len(chunker.chunks(d)) == 1 for d in docs)
    assert tokenizer.bos_token_id not in chunker.chunks(docs[0])[0]  # chunks never carry BOS


def test_a_document_holding_the_separator_is_the_chunks_a_prompt_would_cut(tokenizer):
    a, b = passages(2, 30, seed=6)
    chunker = sep_chunker(tokenizer)
    assert chunker.chunks(a + SEP + b) == [chunker.chunks(a)[0], chunker.chunks(b)[0]]
    assert chunker.chunks(SEP + a + SEP) == chunker.chunks(a)  # empty parts are no chunks


def test_end_token_mode_chunks_end_with_the_end_token(tokenizer):
    end = 2
    chunker = cp.DocumentChunker(tokenizer, Delimiter(chunk_end_token_id=end))
    text = passages(1, 30, seed=8)[0]
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert chunker.chunks(text) == [ids + [end]]


# ---- planning: which chunks to compute ------------------------------------------------


class FakeStore:
    """A key set standing in for the file store's lookup."""

    def __init__(self, keys=()) -> None:
        self.keys = set(keys)
        self.lookups = 0

    def exists(self, keys):
        self.lookups += 1
        return [k in self.keys for k in keys]


class ListChunker:
    """Documents whose text is a space-separated list of token ids ("|" between chunks)."""

    def chunks(self, text):
        return [[int(t) for t in part.split()] for part in text.split("|") if part.strip()]


SEED = b"s" * 32


def doc(line: int, text: str) -> cp.Document:
    return cp.Document(line, None, text)


def ids_text(ids) -> str:
    return " ".join(str(i) for i in ids)


def planner(store: FakeStore, shard=cp.Shard(), max_tokens=None, tp=1) -> cp.ChunkPlanner:
    return cp.ChunkPlanner(shard, BLOCK, cp.store_keys_fn(SEED, BLOCK, tp), store.exists, max_tokens,
                           cp.PrecomputeStats(shard=shard))


def test_store_keys_are_the_chunk_chain_per_tp_rank():
    ids = list(range(40))  # two full blocks and a tail
    chain = block_keys(SEED, ids, BLOCK)
    assert len(chain) == 2
    assert cp.store_keys_fn(SEED, BLOCK, 1)(ids) == [rank_key(k, 0) for k in chain]
    assert cp.store_keys_fn(SEED, BLOCK, 2)(ids) == [rank_key(chain[0], 0), rank_key(chain[0], 1),
                                                     rank_key(chain[1], 0), rank_key(chain[1], 1)]


def test_skip_logic_counts_each_reason_and_yields_only_missing_chunks():
    keys = cp.store_keys_fn(SEED, BLOCK, 1)
    stored = list(range(100, 140))
    partial = list(range(200, 248))  # three blocks, the middle one missing
    fresh = list(range(300, 332))
    store = FakeStore(keys(stored) + [keys(partial)[0], keys(partial)[2]])
    p = planner(store, max_tokens=60)
    docs = [doc(1, ids_text(stored)), doc(2, ""), doc(3, ids_text(fresh)), doc(4, "  \n"),
            doc(5, ids_text(range(5))),  # shorter than a block
            doc(6, ids_text(range(400, 470))),  # 70 tokens > max 60
            doc(7, ids_text(fresh)),  # duplicate
            doc(8, ids_text(partial) + "|" + ids_text(range(500, 520)))]
    pending = list(p.pending(docs, ListChunker()))
    assert [(c.doc_number, c.token_ids[0]) for c in pending] == [(3, 300), (8, 200), (8, 500)]
    assert pending[0].missing == keys(fresh)
    assert pending[1].missing == [keys(partial)[1]]  # only what the store lacks is to be written
    st = p.stats
    assert (st.documents, st.empty, st.chunks, st.duplicates, st.too_short, st.too_long, st.already_stored) == \
        (8, 2, 7, 1, 1, 1, 1)
    assert "line 6 (70 tokens)" in p.too_long_examples[0]


def test_a_complete_store_yields_nothing():
    chunks = [list(range(i * 100, i * 100 + 33)) for i in range(5)]
    keys = cp.store_keys_fn(SEED, BLOCK, 2)
    store = FakeStore(k for c in chunks for k in keys(c))
    p = planner(store, tp=2)
    assert list(p.pending([doc(i + 1, ids_text(c)) for i, c in enumerate(chunks)], ListChunker())) == []
    assert p.stats.already_stored == 5 and p.stats.chunks == 5


def test_a_shard_plans_only_its_own_chunks_and_shards_add_up():
    rng = random.Random(1)
    docs = [doc(i + 1, ids_text(rng.randrange(512) for _ in range(40))) for i in range(50)]
    docs.append(doc(51, docs[3].text))  # a duplicate lands on its original's shard
    planned = []
    for i in range(3):
        p = planner(FakeStore(), shard=cp.Shard(i, 3))
        planned.append({tuple(c.token_ids) for c in p.pending(docs, ListChunker())})
        assert p.stats.chunks + p.stats.other_shards == 51
    assert sum(len(s) for s in planned) == 50
    assert set().union(*planned) == {tuple(ListChunker().chunks(d.text)[0]) for d in docs}


def test_planning_stops_between_documents_when_asked():
    docs = [doc(i + 1, ids_text(range(i * 50, i * 50 + 20))) for i in range(10)]
    seen = []
    p = planner(FakeStore())
    for chunk in p.pending(docs, ListChunker(), stop=lambda: len(seen) >= 3):
        seen.append(chunk)
    assert len(seen) == 3 and p.stats.documents == 3


def test_batched_keeps_order_and_the_tail():
    items = [cp.PendingChunk(i, [i], []) for i in range(7)]
    assert [[c.doc_number for c in b] for b in cp.batched(items, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


# ---- write accounting -------------------------------------------------------------------


def test_a_submitted_chunk_counts_as_stored_once_all_its_missing_blocks_are_files():
    store = FakeStore()
    stats = cp.PrecomputeStats()
    submitted = cp.SubmittedChunks(store.exists, lambda key: 1000, stats)
    a, b = cp.PendingChunk(1, [1], [b"a1", b"a2"]), cp.PendingChunk(2, [2], [b"b1"])
    submitted.add([a, b])
    store.keys |= {b"a1"}
    submitted.confirm()
    assert (stats.stored, stats.bytes_written, len(submitted.unconfirmed)) == (0, 0, 2)
    store.keys |= {b"a2"}
    submitted.confirm()  # a later batch: the late writes are found
    assert (stats.stored, stats.bytes_written, len(submitted.unconfirmed)) == (1, 2000, 1)
    submitted.confirm(final=True)  # after the engine shut down: what is missing now failed
    assert (stats.stored, stats.failed, submitted.unconfirmed) == (1, 1, [])


def test_summary_line_round_trips():
    stats = cp.PrecomputeStats(documents=12, chunks=11, stored=4, already_stored=6, duplicates=1, empty=1,
                               submitted=4, compute_seconds=2.0, bytes_written=1_500_000, shard=cp.Shard(1, 2),
                               interrupted="SIGTERM")
    fields = cp.parse_summary(stats.summary())
    assert fields["documents"] == "12" and fields["stored"] == "4" and fields["skipped_stored"] == "6"
    assert fields["chunks_per_s"] == "2.00" and fields["gb_written"] == "0.001500"
    assert fields["shard"] == "1/2" and fields["interrupted"] == "SIGTERM" and fields["engine_started"] == "no"


# ---- settings refused at start -------------------------------------------------------------


def settings(tmp_path: Path, **kw) -> cp.Settings:
    corpus = tmp_path / "c.jsonl"
    if not corpus.exists():
        write_lines(corpus, [json.dumps({"text": "x"})])
    base = dict(model="m", corpus=str(corpus), store=str(tmp_path / "store"))
    base.update(kw)
    return cp.Settings(**base)


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(cache_salt=""), "--cache-salt must not be empty"),
    (dict(blend_special_str="##", blend_chunk_end_token_id=5), "give one chunk delimiter"),
    (dict(block_tokens=0), "block_tokens"),
    (dict(block_tokens=5000), "block_tokens"),
    (dict(tensor_parallel_size=0), "--tensor-parallel-size"),
])
def test_bad_settings_are_refused(tmp_path, change, message):
    with pytest.raises(cp.UsageError, match=message):
        cp.check_settings(settings(tmp_path, **change), env={})


def test_missing_or_odd_corpus_is_refused(tmp_path):
    with pytest.raises(cp.UsageError, match="--corpus: .* does not exist"):
        cp.check_settings(settings(tmp_path, corpus=str(tmp_path / "none.jsonl")), env={})
    with pytest.raises(cp.UsageError, match="--corpus: .* is not a file"):
        cp.check_settings(settings(tmp_path, corpus=str(tmp_path)), env={})


def test_store_must_be_a_writable_directory(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(cp.UsageError, match="--store: .* is not a directory"):
        cp.check_settings(settings(tmp_path, store=str(afile)), env={})
    with pytest.raises(cp.UsageError, match="--store: .*cannot create storage root"):
        cp.check_settings(settings(tmp_path, store=str(afile / "sub")), env={})
    from ucm.store import block_files

    monkeypatch.setattr(block_files, "root_is_writable", lambda root: False)  # a read-only mount
    with pytest.raises(cp.UsageError, match="--store: .* is not writable"):
        cp.check_settings(settings(tmp_path), env={})


def test_a_missing_store_dir_is_created(tmp_path):
    s = settings(tmp_path, store=str(tmp_path / "a" / "b"))
    cp.check_settings(s, env={})
    assert os.path.isdir(s.store)


def test_ucm_config_file_in_the_environment_is_refused(tmp_path):
    with pytest.raises(cp.UsageError, match="UCM_CONFIG_FILE is set"):
        cp.check_settings(settings(tmp_path), env={"UCM_CONFIG_FILE": "/etc/ucm.yaml"})


def test_the_connector_config_is_blend_on_the_file_store(tmp_path):
    s = settings(tmp_path, block_tokens=32, blend_chunk_end_token_id=5)
    extra = s.kv_transfer_config()["kv_connector_extra_config"]
    assert extra["ucm_connectors"] == [{"ucm_connector_name": "UcmNfsStore",
                                        "ucm_connector_config": {"storage_backends": s.store}}]
    assert extra["block_tokens"] == 32 and extra["log_stats"] is False
    assert extra["ucm_sparse_config"]["Blend"]["chunk_end_token_id"] == 5
    default = settings(tmp_path).kv_transfer_config()["kv_connector_extra_config"]
    assert "block_tokens" not in default  # the config's own default applies
    assert default["ucm_sparse_config"]["Blend"]["blend_special_str"] == SEP


def test_command_line_parses_into_settings(tmp_path):
    s = cli.parse_settings(["--model", "m", "--corpus", "c.jsonl", "--store", "rel", "--shard", "1/3",
                           "--cache-salt", "t1", "--batch-size", "4", "--block-tokens", "32", "--enforce-eager",
                           "--dtype", "float32", "--max-model-len", "512", "--text-field", "body", "--no-progress"])
    assert s.shard == cp.Shard(1, 3) and s.cache_salt == "t1" and s.batch_size == 4 and s.block_tokens == 32
    assert os.path.isabs(s.store) and s.text_field == "body" and not s.progress
    assert s.engine_kwargs() == dict(model="m", dtype="float32", enforce_eager=True, tensor_parallel_size=1,
                                     max_model_len=512)


# ---- signals ---------------------------------------------------------------------------------


def test_first_signal_asks_to_stop_second_stops_now_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with cp.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


# ---- python -m ucm ------------------------------------------------------------------------------


def test_dispatcher_usage_and_exit_codes(capsys):
    from ucm.__main__ import main

    assert main([]) == 2 and "usage: python -m ucm" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "precompute" in capsys.readouterr().out


def test_dispatcher_runs_precompute(tmp_path, capsys):
    from ucm.__main__ import main

    assert main(["precompute", "--model", "m", "--corpus", str(tmp_path / "no.jsonl"), "--store",
                 str(tmp_path / "s")]) == 2
    assert "python -m ucm precompute: error: --corpus:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: a missing required flag
        main(["precompute", "--model", "m"])
    assert exc.value.code == 2
