"""RETRO decoder: chunked cross-attention causality against the paper's rule, plain-decoder equality,
whole-model causality, the query-conditioned neighbour encoder, config errors, and a learning check."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmkit.errors import ConfigError
from lmkit.models.gpt import GPT, GPTConfig
from lmkit_retrieval.cca import ChunkedCrossAttention, chunk_of_positions
from lmkit_retrieval.retro import RETRO, RETROConfig

V, D, M, K, R = 50, 32, 4, 2, 8


@pytest.fixture(autouse=True)
def seeded_single_thread():
    """Same RNG state in every test; one intra-op thread (tiny tensors: threads only contend on a loaded machine)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw) -> RETRO:
    args = dict(vocab_size=V, n_layer=4, n_head=2, d_model=D, max_seq_len=64, chunk_len=M, n_neighbours=K,
                neighbour_len=R, cca_layers=[1, 3], enc_layers=2, enc_d_model=16)
    args.update(kw)
    return RETRO(RETROConfig(**args)).eval()


def paper_mask(n: int, m: int) -> torch.Tensor:
    """Bool [n, l]: position p may attend to the neighbours of chunk u (paper, §2.4: its attending chunk)."""
    l = math.ceil(n / m)
    allowed = torch.zeros(n, l, dtype=torch.bool)
    for p in range(n):
        for u in range(l):
            allowed[p, u] = u * m + m - 1 <= p < (u + 1) * m + m - 1
    return allowed


def test_attending_chunk_of_each_position_matches_the_paper():
    for n in (3, 4, 14, 16):
        allowed = paper_mask(n, M)
        chunk = chunk_of_positions(n, M)
        assert torch.equal(chunk >= 0, allowed.any(1))
        assert torch.equal(allowed.long().argmax(1)[chunk >= 0], chunk[chunk >= 0])


@pytest.mark.parametrize("n", [16, 14])  # 14: a partial last chunk
def test_cca_reads_exactly_its_attending_chunks_neighbours(n):
    cca = ChunkedCrossAttention(D, 16, 2, M)
    l = math.ceil(n / M)
    x = torch.randn(1, n, D)
    memory = torch.randn(1, l, K * R, 16, requires_grad=True)
    mask = torch.rand(1, l, K * R) > 0.3
    mask[0, 1] = False  # chunk 1: every neighbour missing
    out = cca(x, memory, mask)
    allowed = paper_mask(n, M) & mask[0].any(-1)[None, :]
    seen = torch.zeros(n, l, dtype=torch.bool)
    for p in range(n):
        (grad,) = torch.autograd.grad(out[0, p].sum(), memory, retain_graph=True)
        seen[p] = grad[0].abs().sum(dim=(1, 2)) > 0
        # the gradient also never reaches masked neighbour tokens
        assert not (grad[0].abs().sum(-1) > 0)[~mask[0]].any()
    assert torch.equal(seen, allowed)
    assert out[0, : M - 1].abs().sum() == 0  # nothing before the end of chunk 1
    # values: dense per-position attention with the layer's own weights
    h = cca.n_head
    for p in range(n):
        u = int(chunk_of_positions(n, M)[p])
        if u < 0 or not mask[0, u].any():
            assert out[0, p].abs().sum() == 0
            continue
        q = cca.q(x[0, p]).view(h, -1)
        k, v = cca.kv(memory[0, u][mask[0, u]]).split(D, dim=-1)
        k, v = k.view(-1, h, D // h), v.view(-1, h, D // h)
        att = torch.einsum("hd,shd->hs", q, k).div(math.sqrt(D // h)).softmax(-1)
        ref = cca.proj(torch.einsum("hs,shd->hd", att, v).reshape(D))
        torch.testing.assert_close(out[0, p], ref, atol=1e-5, rtol=1e-5)


def test_model_output_depends_on_neighbours_of_complete_chunks_only():
    model = tiny()
    n = 14
    ids = torch.randint(0, V, (1, n))
    neighbours = torch.randint(0, V, (1, math.ceil(n / M), K, R))
    captured = []  # the neighbour tokens' embeddings as the encoder takes them in, [l·k, r, enc_d_model]

    def keep(module, args, out):
        out.retain_grad()
        captured.append(out)

    model.encoder.inp.register_forward_hook(keep)
    out = model(ids, neighbours=neighbours)
    (emb,) = captured
    l = neighbours.shape[1]
    probe = torch.randn(D)  # not .sum(): a LayerNorm output's features sum to ~0 whatever the input
    for p in range(n):
        emb.grad = None
        (out[0, p] @ probe).backward(retain_graph=True)
        seen = emb.grad.reshape(l, K * R, -1).abs().sum(dim=(1, 2)) > 0
        # through the causal self-attention after a CCA layer: every chunk whose attending chunk began at or before p
        want = torch.tensor([u * M + M - 1 <= p for u in range(l)])
        assert torch.equal(seen, want), (p, seen, want)


def gpt_twin(model: RETRO) -> GPT:
    c = model.cfg
    gpt = GPT(GPTConfig(vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, d_model=c.d_model,
                        max_seq_len=c.max_seq_len)).eval()
    own = model.state_dict()
    gpt.load_state_dict({name: own[name] for name in gpt.state_dict()}, strict=True)
    return gpt


def test_without_neighbours_the_model_is_the_plain_decoder():
    model = tiny()
    gpt = gpt_twin(model)
    ids = torch.randint(0, V, (2, 16))
    pad = torch.ones(2, 16, dtype=torch.bool)
    pad[1, 11:] = False
    neighbours = torch.randint(0, V, (2, 4, K, R))
    none_real = torch.zeros(2, 4, K, R, dtype=torch.bool)
    with torch.no_grad():
        for kw in ({}, {"padding_mask": pad}):
            want = gpt(ids, **kw)
            assert torch.equal(model(ids, **kw), want)
            assert torch.equal(model(ids, neighbours=neighbours, neighbour_mask=none_real, **kw), want)
            with_neighbours = model(ids, neighbours=neighbours, **kw)
            assert torch.isfinite(with_neighbours).all() and not torch.allclose(with_neighbours, want)


def test_causal_in_the_input_tokens_with_fixed_neighbours():
    model = tiny()
    n = 16
    ids = torch.randint(0, V, (1, n))
    neighbours = torch.randint(0, V, (1, 4, K, R))
    with torch.no_grad():
        base = model(ids, neighbours=neighbours)
        for j in range(n):
            changed = ids.clone()
            changed[0, j] = (changed[0, j] + 1) % V
            out = model(changed, neighbours=neighbours)
            torch.testing.assert_close(out[0, :j], base[0, :j], atol=1e-6, rtol=0)
            assert not torch.allclose(out[0, j], base[0, j])


def test_neighbour_encoder_is_conditioned_on_its_query_chunk():
    model = tiny()
    ids = torch.randint(0, V, (1, 16))
    neighbours = torch.randint(0, V, (1, 4, K, R))
    encoded = []
    model.encoder.register_forward_hook(lambda mod, args, out: encoded.append(out))
    with torch.no_grad():
        model(ids, neighbours=neighbours)
        changed = ids.clone()
        changed[0, 2 * M + 1] = (changed[0, 2 * M + 1] + 1) % V  # a token of chunk 2
        model(changed, neighbours=neighbours)
    before, after = encoded
    torch.testing.assert_close(after[:, :2], before[:, :2], atol=1e-6, rtol=0)  # earlier chunks' neighbours
    assert (after[:, 2] - before[:, 2]).abs().amax() > 1e-4  # E(Ret(C_2)) follows C_2


@pytest.mark.parametrize("kw, key", [
    ({"chunk_len": 0}, "model.chunk_len"),
    ({"n_neighbours": 0}, "model.n_neighbours"),
    ({"cca_layers": [1, 4]}, "model.cca_layers"),
    ({"cca_layers": [-1]}, "model.cca_layers"),
    ({"cca_layers": []}, "model.cca_layers"),
    ({"cca_layers": [1, 1]}, "model.cca_layers"),
    ({"enc_layers": 0}, "model.enc_layers"),
    ({"enc_d_model": 30, "enc_n_head": 4}, "model.enc_d_model=30"),
    ({"chunk_len": 128, "max_seq_len": 64}, "model.chunk_len"),
])
def test_bad_config_is_one_clear_line(kw, key):
    args = dict(vocab_size=V, n_layer=4, n_head=2, d_model=D)
    args.update(kw)
    with pytest.raises(ConfigError) as err:
        RETROConfig(**args)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_default_cca_layers_follow_the_paper():
    assert RETROConfig(n_layer=12).cca_layer_indices() == [5, 8, 11]
    assert RETROConfig(n_layer=32).cca_layer_indices() == list(range(5, 32, 3))
    assert RETROConfig(n_layer=4).cca_layer_indices() == [3]


def test_neighbours_of_the_wrong_shape_are_refused():
    model = tiny()
    ids = torch.randint(0, V, (2, 14))
    with pytest.raises(ValueError, match=r"\[2, 4, 2, r<=8\].*ceil\(14 / chunk_len=4\)"):
        model(ids, neighbours=torch.randint(0, V, (2, 3, K, R)))
    with pytest.raises(ValueError, match="neighbour_mask"):
        model(ids, neighbours=torch.randint(0, V, (2, 4, K, R)),
              neighbour_mask=torch.ones(2, 4, K, 4, dtype=torch.bool))


def copy_batch(B, n, vocab, with_answer: bool):
    """Random tokens; each chunk's neighbours are the chunk and its true continuation (the next chunk)."""
    ids = torch.randint(0, vocab, (B, n + M))  # one extra chunk: the continuation of the last chunk
    l = n // M
    chunks = ids.view(B, l + 1, M)
    neighbour = torch.cat([chunks[:, :l], chunks[:, 1:]], dim=-1)  # [B, l, 2M]
    neighbours = neighbour[:, :, None].expand(B, l, K, 2 * M).contiguous()
    return ids[:, :n], ids[:, 1: n + 1], (neighbours if with_answer else None)


def train_loss(with_answer: bool, steps=120, vocab=16, n=16):
    """Mean loss of the last 10 of ``steps`` Adam steps, each on a fresh random batch."""
    torch.manual_seed(0)
    # init_std 0.1: at d_model 32 the default 0.02 takes several hundred steps to start copying
    model = tiny(vocab_size=vocab, n_layer=2, cca_layers=[1], enc_layers=1, max_seq_len=n, init_std=0.1).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        inputs, targets, neighbours = copy_batch(16, n, vocab, with_answer)
        logits = model.logits(model(inputs, neighbours=neighbours))
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


def test_neighbours_holding_the_continuation_are_learned_from():
    with_answer, without = train_loss(True), train_loss(False)
    # Random tokens: without neighbours nothing beats ln 16 = 2.77. With them, the 13 of 16 targets whose
    # tokens are in the neighbour's continuation can be copied (floor 3/16 * ln 16 = 0.52).
    assert without > math.log(16) - 0.15
    assert with_answer < 1.2, (with_answer, without)
