"""The ``retrieval`` verb: build and search through ``python -m lmkit``, and its one-line errors."""
from __future__ import annotations

import pytest

from retrieval_helpers import CHUNK, STREAM_TOKENS, encoder, encoder_run, one_error_line, stream  # noqa: F401


@pytest.fixture(scope="module")
def cli_store(encoder_run, stream, tmp_path_factory):  # noqa: F811
    import lmkit.cli

    out = tmp_path_factory.mktemp("cli") / "store"
    argv = ["retrieval", "build", str(out), f"encoder={encoder_run}", *stream[1], f"max_tokens={STREAM_TOKENS}",
            f"chunk_len={CHUNK}", "index=hnsw", "M=8", "threads=1", "keys=whiten"]
    assert lmkit.cli.main(argv) == 0
    return out


def test_the_verb_is_registered():
    from lmkit.commands import all_verbs
    from lmkit.plugins import get_plugin_manager

    assert "retrieval" in all_verbs(get_plugin_manager())


def test_build_then_search_prints_the_stores_neighbours(cli_store, encoder, stream, capsys):  # noqa: F811
    import lmkit.cli
    from lmkit_retrieval import Datastore

    store = Datastore.open(cli_store)
    assert store.spec.kind == "hnsw" and store.spec.M == 8 and store.n_chunks == STREAM_TOKENS // CHUNK
    assert store.key_mode == "whiten"
    assert store.manifest["data"]["split"] == "train" and store.manifest["data"]["doc_separator"] == "\n\n"
    query = "What say you to the citizens?"
    capsys.readouterr()
    assert lmkit.cli.main(["retrieval", "search", str(cli_store), f"query={query}", "k=2", "exclude_doc=3"]) == 0
    out = capsys.readouterr().out
    ids, _ = store.search(encoder.embed_texts([query]), 2, exclude_docs=[3])
    values = store.neighbours(ids[0])
    for rank, (i, value) in enumerate(zip(ids[0], values), 1):
        assert f"#{rank}  chunk {i} " in out
        assert repr(encoder.tokenizer.decode(value[:CHUNK].tolist())) in out


def test_bad_arguments_are_one_line(cli_store, encoder_run, tmp_path, capsys):  # noqa: F811
    one_error_line(capsys, ["retrieval", "serach", str(cli_store)], "Did you mean 'search'")
    one_error_line(capsys, ["retrieval", "search", str(tmp_path / "none"), "query=x"], "does not exist")
    one_error_line(capsys, ["retrieval", "search", str(cli_store), "query=x", "k=100000"], "k=100000 is larger")
    one_error_line(capsys, ["retrieval", "search", str(cli_store), "qeury=x"], "Did you mean 'query'")
    one_error_line(capsys, ["retrieval", "build", str(tmp_path / "s")], "needs encoder=PATH")
    one_error_line(capsys, ["retrieval", "build", str(tmp_path / "s"), f"encoder={encoder_run}", "index=flta"],
                   "Did you mean 'flat'")
    one_error_line(capsys, ["retrieval", "build", str(tmp_path / "s"), f"encoder={encoder_run}", "keys=whitten"],
                   "Did you mean 'whiten'")
    one_error_line(capsys, ["retrieval", "build", str(cli_store), f"encoder={encoder_run}"], "already exists")
    one_error_line(capsys, ["retrieval", "build", str(tmp_path / "s"), f"encoder={encoder_run}", "chunk_len=4096"],
                   "max_seq_len")
    one_error_line(capsys, ["retrieval", "build", str(tmp_path / "s"), f"encoder={encoder_run}", "index=ivfpq",
                            "max_tokens=640", "chunk_len=16"], "training vectors")
    one_error_line(capsys, ["retrieval", "build", str(tmp_path / "s"), f"encoder={tmp_path / 'no_run'}"],
                   "does not exist")
