"""The retrieval datastore against references: the stream tiled by hand, mean-pooled states computed by hand,
brute-force cosine top-k, and an uninterrupted build for resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmkit.errors import ConfigError, DataError
from lmkit_retrieval import Datastore, IndexSpec, build_store
from retrieval_helpers import CHUNK, encoder, encoder_run, reference_doc_ids, stream  # noqa: F401


@pytest.fixture(scope="module")
def store(encoder, stream, tmp_path_factory):  # noqa: F811
    tokens, _ = stream
    return build_store(tmp_path_factory.mktemp("store") / "s", tokens, encoder, chunk_len=CHUNK, shard_size=48,
                       batch_size=16)


def reference_keys(store, x):
    """Unnormalised keys of ``x`` [n, d] computed in float64 from the store's embeddings alone, for its key mode:
    raw; centered on their mean; or whitened through the SVD of the centered embeddings (x − μ) V S⁻¹ (another
    whitening than the store's eigendecomposition: the two differ by a rotation, so cosines agree)."""
    e = np.asarray(store.embeddings, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if store.key_mode == "raw":
        return x
    mean = e.mean(0)
    if store.key_mode == "center":
        return x - mean
    _, s, vt = np.linalg.svd(e - mean, full_matrices=False)
    keep = s ** 2 > 1e-6 * s[0] ** 2
    return (x - mean) @ vt[keep].T / s[keep]


def brute_force(store, queries, k, exclude=None):
    """Cosine top-k of the reference keys by a dense matmul; ``exclude`` [n, 2]: document ranges whose overlapping
    chunks are dropped."""
    keys = torch.nn.functional.normalize(torch.from_numpy(reference_keys(store, store.embeddings)), dim=1)
    q = torch.nn.functional.normalize(torch.from_numpy(reference_keys(store, queries)), dim=1)
    cos = (q @ keys.T).float()
    if exclude is not None:
        spans = torch.from_numpy(store.docs)
        ex = torch.as_tensor(exclude)
        hit = (spans[None, :, 0] <= ex[:, 1:2]) & (spans[None, :, 1] >= ex[:, 0:1])
        cos = cos.masked_fill(hit, -float("inf"))
    scores, ids = cos.topk(k, dim=1)
    return ids.numpy(), scores.numpy()


def test_chunks_tile_the_stream_and_record_documents(store, stream, encoder):  # noqa: F811
    tokens, _ = stream
    n = len(tokens) // CHUNK
    assert store.n_chunks == n and store.chunks.shape == (n + 1, CHUNK)
    np.testing.assert_array_equal(np.asarray(store.chunks[:n]).reshape(-1), tokens[:n * CHUNK])
    tail = tokens[n * CHUNK:]
    np.testing.assert_array_equal(store.chunks[n, :len(tail)], tail)
    assert (store.chunks[n, len(tail):] == encoder.tokenizer.pad_id).all()
    docs = reference_doc_ids(tokens, encoder.tokenizer.eos_id)
    assert docs[-1] >= 10, "the fixture stream should hold many documents"
    for i in range(n):
        value_docs = docs[i * CHUNK:min((i + 2) * CHUNK, len(tokens))]
        assert tuple(store.docs[i]) == (value_docs.min(), value_docs.max())
    per_doc = [sum(1 for a, b in store.docs if a <= d <= b) for d in range(docs[-1] + 1)]
    assert store.max_doc_chunks == max(per_doc)


def test_embeddings_are_mean_pooled_last_hidden_states(store, encoder, encoder_run):  # noqa: F811
    from lmkit.generation import read_model

    model, *_ = read_model(encoder_run)
    model.eval()
    ids = torch.from_numpy(np.asarray(store.chunks[:store.n_chunks], dtype=np.int64))
    with torch.no_grad():
        expected = model(ids).mean(dim=1).numpy()
    np.testing.assert_allclose(store.embeddings, expected, rtol=1e-5, atol=1e-5)
    assert store.encoder_fingerprint == encoder.fingerprint
    # a padded batch of texts pools only over each text's own tokens
    texts = ["First Citizen:\nBefore we proceed", "All:\nSpeak, speak."]
    batch = encoder.embed_texts(texts)
    for text, row in zip(texts, batch):
        own = torch.tensor([encoder.tokenizer.encode(text)])
        with torch.no_grad():
            np.testing.assert_allclose(row, model(own).mean(dim=1)[0].numpy(), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module", params=["center", "whiten", "raw"])
def each_keys(request, store, encoder, stream, tmp_path_factory):  # noqa: F811
    """The fixture store (center, the default) and stores of the same chunks with the other key modes."""
    if request.param == "center":
        return store
    return build_store(tmp_path_factory.mktemp("keys") / request.param, stream[0], encoder, chunk_len=CHUNK,
                       keys=request.param)


def test_flat_search_equals_brute_force_cosine(each_keys):
    store = each_keys
    rng = np.random.default_rng(0)
    queries = np.asarray(store.embeddings[rng.choice(store.n_chunks, 12)]) + rng.normal(0, 0.05, (12, store.d))
    ids, scores = store.search(queries.astype(np.float32), 5)
    ref_ids, ref_scores = brute_force(store, queries, 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_keys_are_centered_or_whitened_on_the_stores_embeddings(each_keys):
    store = each_keys
    e = np.asarray(store.embeddings, dtype=np.float64)
    mean, w = store.key_transform[0], store.key_transform[1:]
    assert store.manifest["build"]["keys"] == store.key_mode
    if store.key_mode == "raw":
        assert not mean.any() and np.array_equal(w, np.eye(store.d))
        return
    np.testing.assert_allclose(mean, e.mean(0), rtol=1e-6, atol=1e-6)
    white = (e - mean) @ w
    np.testing.assert_allclose(white.mean(0), 0, atol=1e-4)
    cov = np.cov(white.T)
    if store.key_mode == "center":
        assert np.array_equal(w, np.eye(store.d))
        return
    # identity covariance on the embeddings' own subspace, nothing outside it (the LayerNorm's null direction)
    eig = np.linalg.eigvalsh(cov)
    rank = np.linalg.matrix_rank(e - e.mean(0), tol=1e-3 * np.linalg.norm(e - e.mean(0), 2))
    assert 0 < rank < store.d
    np.testing.assert_allclose(eig[-rank:], 1, atol=1e-3)
    np.testing.assert_allclose(eig[:-rank], 0, atol=1e-3)


def test_every_chunk_retrieves_itself_even_from_an_anisotropic_encoder(store, encoder_run, stream,  # noqa: F811
                                                                         tmp_path):
    """An encoder whose states share one large common component (its last LayerNorm's bias + 10⁴): raw cosines of
    any two chunks round to 1 in float32 and retrieval is random; centered or whitened keys find each chunk."""
    from lmkit.generation import read_model
    from lmkit_retrieval.encoder import ChunkEncoder

    model, tokenizer, _, _ = read_model(encoder_run)
    with torch.no_grad():
        model.blocks[-1].ln_2.bias += 1e4
    shifted = ChunkEncoder(model, tokenizer, "shifted")
    chunks = np.asarray(store.chunks[:store.n_chunks])
    _, first = np.unique(chunks, axis=0, return_index=True)
    distinct = np.sort(first)  # chunks whose tokens occur once (a repeated chunk may rank its twin first)
    assert len(distinct) > 0.9 * store.n_chunks
    found = {}
    for mode in ("raw", "center", "whiten"):
        built = build_store(tmp_path / mode, stream[0], shifted, chunk_len=CHUNK, keys=mode)
        ids, _ = built.search(np.asarray(built.embeddings)[distinct], 1)
        found[mode] = (ids[:, 0] == distinct).mean()
    assert found["center"] == 1.0 and found["whiten"] == 1.0, found
    assert found["raw"] < 0.5, found
    # the unshifted encoder's store finds each chunk too (its default keys are centered)
    ids, _ = store.search(np.asarray(store.embeddings)[distinct], 1)
    assert (ids[:, 0] == distinct).all()


def test_a_query_never_retrieves_its_own_document(store):
    queries = np.asarray(store.embeddings)
    own = store.docs[:, 0]
    plain, _ = store.search(queries, 3)
    assert (plain[:, 0] == np.arange(store.n_chunks)).mean() > 0.9  # without exclusion a chunk finds itself
    k = 6
    ids, scores = store.search(queries, k, exclude_docs=own)
    assert (ids >= 0).all()
    spans = store.docs[ids]
    assert not ((spans[..., 0] <= own[:, None]) & (spans[..., 1] >= own[:, None])).any()
    ref_ids, ref_scores = brute_force(store, queries, k, np.stack([own, own], 1))
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ids, ref_ids)
    # document ranges wider than max_doc_chunks make the search widen its candidate list
    ranges = np.stack([own, own + 8], 1)
    ids, scores = store.search(queries, k, exclude_docs=ranges)
    ref_ids, ref_scores = brute_force(store, queries, k, ranges)
    valid = np.isfinite(ref_scores)
    np.testing.assert_array_equal(np.where(valid, ids, -1), np.where(valid, ref_ids, -1))
    assert (ids[~valid] == -1).all()
    # excluding every document leaves nothing
    everything = np.tile([0, int(store.docs.max())], (2, 1))
    ids, scores = store.search(queries[:2], 2, exclude_docs=everything)
    assert (ids == -1).all() and np.isneginf(scores).all()


def test_neighbours_are_chunk_plus_continuation(store, stream, encoder):  # noqa: F811
    tokens, _ = stream
    n, pad = store.n_chunks, encoder.tokenizer.pad_id
    ids = np.array([[0, 5], [n - 1, -1]])
    values = store.neighbours(ids)
    assert values.shape == (2, 2, 2 * CHUNK) and values.dtype == np.int64
    np.testing.assert_array_equal(values[0, 0], tokens[:2 * CHUNK])
    np.testing.assert_array_equal(values[0, 1], tokens[5 * CHUNK:7 * CHUNK])
    last = tokens[(n - 1) * CHUNK:]
    np.testing.assert_array_equal(values[1, 0, :len(last)], last)
    assert (values[1, 0, len(last):] == pad).all() and (values[1, 1] == pad).all()


def test_interrupted_build_resumes_to_identical_files(encoder, stream, tmp_path, monkeypatch):  # noqa: F811
    tokens, _ = stream
    kwargs = dict(chunk_len=CHUNK, shard_size=40, batch_size=20, data={"test": 1})
    build_store(tmp_path / "whole", tokens, encoder, **kwargs)

    calls = {"n": 0}
    real = type(encoder).embed

    def failing(self, ids, mask=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the first batch of the second shard
            raise KeyboardInterrupt
        return real(self, ids, mask)

    monkeypatch.setattr(type(encoder), "embed", failing)
    with pytest.raises(KeyboardInterrupt):
        build_store(tmp_path / "resumed", tokens, encoder, **kwargs)
    assert (tmp_path / "resumed.partial/shards/embeddings-000000.npy").is_file()
    with pytest.raises(DataError, match="interrupted build"):
        Datastore.open(tmp_path / "resumed")
    monkeypatch.setattr(type(encoder), "embed", real)

    counted = {"n": 0}

    def counting(self, ids, mask=None):
        counted["n"] += 1
        return real(self, ids, mask)

    monkeypatch.setattr(type(encoder), "embed", counting)
    build_store(tmp_path / "resumed", tokens, encoder, **kwargs)
    n = len(tokens) // CHUNK
    assert counted["n"] == sum(-(-min(40, n - start) // 20) for start in range(40, n, 40))  # shard 0 was reused
    assert not (tmp_path / "resumed.partial").exists()
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_indexes_agree_with_flat(kind, store, encoder, stream, tmp_path):  # noqa: F811
    tokens, _ = stream
    spec = IndexSpec(kind=kind, nlist=4, m=8, nbits=4, nprobe=4)
    approx = build_store(tmp_path / kind, tokens, encoder, chunk_len=CHUNK, index=spec)
    assert approx.manifest["build"]["index"]["kind"] == kind
    queries = np.asarray(store.embeddings)
    found, found_scores = approx.search(queries, 4)
    if kind == "hnsw":  # a graph over 162 nodes with efSearch 64 is close to exhaustive
        exact, _ = store.search(queries, 4)
        recall = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(exact, found)])
        assert recall > 0.95, recall
    else:  # nprobe = nlist visits every list: exact search over the index's own (quantized) reconstructions
        approx.index.make_direct_map()
        recon = torch.from_numpy(approx.index.reconstruct_n(0, approx.n_chunks))
        q = torch.from_numpy(approx.keys(queries))
        ref_scores, _ = (q @ recon.T).topk(4, dim=1)
        np.testing.assert_allclose(found_scores, ref_scores.numpy(), rtol=1e-4, atol=1e-4)
    own = approx.docs[:, 0]
    ids, _ = approx.search(queries, 4, exclude_docs=own)
    spans = approx.docs[np.clip(ids, 0, None)]
    assert not ((ids >= 0) & (spans[..., 0] <= own[:, None]) & (spans[..., 1] >= own[:, None])).any()


def _one_line(excinfo, *expected):
    message = str(excinfo.value)
    assert "\n" not in message and all(e in message for e in expected), message


def test_bad_stores_are_refused_in_one_line(store, tmp_path):
    import shutil

    with pytest.raises(DataError) as e:
        Datastore.open(tmp_path / "nowhere")
    _one_line(e, "does not exist")

    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    with open(copy / "embeddings.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 7)
    with pytest.raises(DataError) as e:
        Datastore.open(copy)
    _one_line(e, "embeddings.npy", "truncated")

    shutil.rmtree(copy)
    shutil.copytree(store.path, copy)
    (copy / "index.faiss").unlink()
    with pytest.raises(DataError) as e:
        Datastore.open(copy)
    _one_line(e, "missing index.faiss")

    shutil.rmtree(copy)
    shutil.copytree(store.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["complete"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as e:
        Datastore.open(copy)
    _one_line(e, "incomplete")

    # a store of the previous format (raw embeddings indexed, no keys.npy) is refused, not searched differently
    shutil.rmtree(copy)
    shutil.copytree(store.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["build"]["format"] = 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as e:
        Datastore.open(copy)
    _one_line(e, "format 1", "rebuild the store")
    with pytest.raises(ConfigError) as e:
        build_store(tmp_path / "x", np.zeros(64, np.int64), store.load_encoder(), chunk_len=CHUNK, keys="centre")
    _one_line(e, "keys", "center")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_other_tokenizer_or_encoder_and_big_k_are_refused(store, encoder):  # noqa: F811
    from lmkit.tokenizers.byte import ByteTokenizer

    store.check_compatible(encoder.tokenizer, encoder.fingerprint)
    with pytest.raises(ConfigError) as e:
        store.check_compatible(ByteTokenizer(num_sentinels=3))
    _one_line(e, "another tokenizer")
    with pytest.raises(ConfigError) as e:
        store.check_compatible(encoder.tokenizer, "0" * 64)
    _one_line(e, "another encoder")
    with pytest.raises(ConfigError) as e:
        store.search(np.zeros((1, store.d), np.float32), store.n_chunks + 1)
    _one_line(e, f"k={store.n_chunks + 1}", f"{store.n_chunks} chunks")
    with pytest.raises(ConfigError) as e:
        IndexSpec(kind="flta").check()
    _one_line(e, "Did you mean 'flat'")


@pytest.mark.parametrize("kind", ["decoder", "encoder_decoder"])
def test_decoders_and_encoder_decoders_embed_with_their_last_states(kind, encoder):  # noqa: F811
    """A GPT is pooled over its (causal) last states; a T5 over its encoder's, as ``T5.encode`` gives them."""
    from lmkit.models.gpt import GPT, GPTConfig
    from lmkit.models.t5 import T5, T5Config
    from lmkit_retrieval import ChunkEncoder

    torch.manual_seed(0)
    tok = encoder.tokenizer
    if kind == "decoder":
        model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, max_seq_len=64, vocab_size=tok.vocab_size))
    else:
        model = T5(T5Config(n_layer=1, n_head=2, d_model=32, vocab_size=tok.vocab_size))
    chunk_encoder = ChunkEncoder(model, tok, "in-memory")
    ids = torch.randint(0, 256, (3, CHUNK))
    with torch.no_grad():
        states = model(ids) if kind == "decoder" else model.encode(ids)
    np.testing.assert_allclose(chunk_encoder.embed(ids.numpy()), states.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 10:] = False  # a padded row pools over its real tokens only
    with torch.no_grad():
        short = model(ids[1:2, :10]) if kind == "decoder" else model.encode(ids[1:2, :10])
    np.testing.assert_allclose(chunk_encoder.embed(ids.numpy(), mask.numpy())[1], short.mean(1)[0].numpy(),
                               rtol=1e-4, atol=1e-5)
