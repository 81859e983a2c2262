"""FavorAttention / SoftmaxAttention as MultiheadAttention drop-ins, and the KOA block."""
import pytest
import torch
import torch.nn.functional as F

import okadfa
from okadfa.nn import FavorAttention, KOABlock, SoftmaxAttention, replace_attention
from tolerances import EXACT, ORTHONORMAL, REORDERED, REORDERED_GRAD, UNCHANGED, assert_close


def _copy_weights(src: torch.nn.MultiheadAttention, dst):
    E = src.embed_dim
    w, b = src.in_proj_weight.detach(), src.in_proj_bias.detach()
    for i, lin in enumerate((dst.q_proj, dst.k_proj, dst.v_proj)):
        lin.weight.data.copy_(w[i * E:(i + 1) * E])
        lin.bias.data.copy_(b[i * E:(i + 1) * E])
    dst.out_proj.weight.data.copy_(src.out_proj.weight.detach())
    dst.out_proj.bias.data.copy_(src.out_proj.bias.detach())


@pytest.mark.parametrize("batch_first", [True, False])
def test_softmax_attention_equals_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first)
    mine = SoftmaxAttention(32, 4, batch_first=batch_first)
    _copy_weights(mha, mine)
    x = torch.randn(2, 10, 32) if batch_first else torch.randn(10, 2, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(10)
    expected, _ = mha(x, x, x, attn_mask=mask, is_causal=True)
    out, weights = mine(x, x, x, is_causal=True)
    assert weights is None
    assert_close(out, expected, REORDERED)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_key_padding_mask(causal):
    """MultiheadAttention's key_padding_mask (True = padding, or −inf): SoftmaxAttention equals
    MultiheadAttention at real positions, FavorAttention equals favor_attention with the key_mask;
    outputs at padded positions are 0 in both."""
    torch.manual_seed(3)
    mha, mine, favor = (torch.nn.MultiheadAttention(32, 4, batch_first=True), SoftmaxAttention(32, 4, batch_first=True),
                        FavorAttention(32, 4, batch_first=True, nb_features=16))
    _copy_weights(mha, mine)
    x = torch.randn(3, 10, 32)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[0, 7:] = True                                     # right padding
    padding[1, :2] = True                                     # left padding
    causal_mask = torch.nn.Transformer.generate_square_subsequent_mask(10) if causal else None
    expected, _ = mha(x, x, x, key_padding_mask=padding, attn_mask=causal_mask, is_causal=causal, need_weights=False)
    for kpm in (padding, torch.zeros(3, 10).masked_fill(padding, float("-inf"))):
        out, _ = mine(x, x, x, key_padding_mask=kpm, is_causal=causal)
        assert_close(out[~padding], expected[~padding], REORDERED)
        assert (out[padding] == mine.out_proj.bias).all()    # 0 before the output projection
        got, _ = favor(x, x, x, key_padding_mask=kpm, is_causal=causal)
        q, k, v = (favor._heads(p(x)) for p in (favor.q_proj, favor.k_proj, favor.v_proj))
        heads = okadfa.favor_attention(q, k, v, favor.projection, causal=causal, key_mask=~padding)
        assert_close(got, favor.out_proj(heads.transpose(1, 2).reshape(3, 10, 32)), EXACT)


@pytest.mark.parametrize("cls", [SoftmaxAttention, FavorAttention])
def test_key_padding_mask_through_a_cache(cls):
    """A padded batch decoded through a cache (a left-padded prompt, then one token at a time, the
    last steps padded for one row) gives the uncached causal outputs with the whole mask."""
    torch.manual_seed(4)
    attn = cls(32, 4, batch_first=True, **({"nb_features": 16} if cls is FavorAttention else {}))
    x = torch.randn(3, 10, 32)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[1, :3] = True
    padding[2, 8:] = True
    expected, _ = attn(x, x, x, key_padding_mask=padding, is_causal=True)
    cache = attn.new_cache()
    outs = [attn(x[:, :5], x[:, :5], x[:, :5], key_padding_mask=padding[:, :5], is_causal=True, cache=cache)[0]]
    for t in range(5, 10):
        sl = slice(t, t + 1)
        outs.append(attn(x[:, sl], x[:, sl], x[:, sl], key_padding_mask=padding[:, sl], is_causal=True,
                         cache=cache)[0])
    assert_close(torch.cat(outs, 1), expected, REORDERED)
    assert (torch.cat(outs, 1)[padding] == attn.out_proj.bias).all()


def test_favor_attention_matches_functional_op_and_shapes():
    torch.manual_seed(1)
    attn = FavorAttention(48, 6, batch_first=True, nb_features=32)
    x = torch.randn(3, 20, 48)
    out, w = attn(x, x, x, is_causal=True)
    q, k, v = (attn._heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    ref = okadfa.reference.favor_attention(q, k, v, attn.projection, causal=True)
    expected = attn.out_proj(ref.transpose(1, 2).reshape(3, 20, 48))
    assert_close(out, expected, REORDERED)
    assert w is None and out.shape == x.shape
    unbatched, _ = attn(x[0], x[0], x[0], is_causal=True)
    assert_close(unbatched, out[0], REORDERED)
    seq_first = FavorAttention(48, 6, nb_features=32)
    seq_first.load_state_dict(attn.state_dict())
    assert_close(seq_first(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), is_causal=True)[0].transpose(0, 1),
                 out, REORDERED)


def test_orthogonal_init_and_state_dict():
    attn = FavorAttention(32, 4, nb_features=16)
    for w in attn.projection_weights().values():
        assert_close(w @ w.T, torch.eye(32), ORTHONORMAL)
    assert {"projection", "steps"} <= set(attn.state_dict())


def test_redraw_interval_is_deterministic():
    a = FavorAttention(16, 2, batch_first=True, nb_features=8, redraw_interval=2, feature_seed=3)
    b = FavorAttention(16, 2, batch_first=True, nb_features=8, redraw_interval=2, feature_seed=3)
    x = torch.randn(1, 5, 16)
    first = a.projection.clone()
    projections = []
    for _ in range(5):
        a(x, x, x)
        projections.append(a.projection.clone())
    assert torch.equal(projections[0], first) and torch.equal(projections[1], first)
    assert not torch.equal(projections[2], first)                 # redrawn at step 2
    assert torch.equal(projections[2], projections[3]) and not torch.equal(projections[4], projections[3])
    b.load_state_dict(a.state_dict())
    a(x, x, x), b(x, x, x)
    assert torch.equal(a.projection, b.projection)
    a.eval()
    before = a.projection.clone()
    for _ in range(3):
        a(x, x, x)
    assert torch.equal(a.projection, before)                      # no redraw in eval mode


@pytest.mark.parametrize("kwargs,call,match", [
    (dict(dropout=0.1), None, "no attention dropout"),
    (dict(add_bias_kv=True), None, "add_bias_kv"),
    (dict(), dict(attn_mask=torch.zeros(4, 4)), "attn_mask other than the causal one"),
    (dict(), dict(attn_mask=torch.ones(4, 4, dtype=torch.bool).tril()), "attn_mask other than the causal one"),
    (dict(), dict(key_padding_mask=torch.zeros(1, 3, dtype=torch.bool)), r"key_padding_mask must be a \(N, S\)"),
    (dict(), dict(key_padding_mask=torch.ones(1, 4)), "key_padding_mask must be bool"),
])
def test_unsupported_arguments(kwargs, call, match):
    with pytest.raises(ValueError, match=match):
        attn = FavorAttention(8, 2, batch_first=True, nb_features=4, **kwargs)
        x = torch.randn(1, 4, 8)
        attn(x, x, x, **call)


def test_block_forward_is_causal():
    torch.manual_seed(2)
    block = KOABlock(32, 4, attention="favor", nb_features=16)
    x = torch.randn(2, 12, 32)
    y = x.clone()
    y[:, 7:] += 3.0
    assert_close(block(x)[:, :7], block(y)[:, :7], UNCHANGED)
    assert set(block.ortho_weights()) == {"q", "k", "v", "out", "mlp_in", "mlp_out"}


def test_the_causal_mask_is_accepted_as_multihead_attention_passes_it():
    torch.manual_seed(3)
    attn = FavorAttention(16, 2, batch_first=True, nb_features=8)
    x = torch.randn(2, 7, 16)
    causal, _ = attn(x, x, x, is_causal=True)
    bool_mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    for mask in (bool_mask, torch.nn.Transformer.generate_square_subsequent_mask(7)):
        assert_close(attn(x, x, x, attn_mask=mask)[0], causal, EXACT)
        assert_close(attn(x, x, x, attn_mask=mask, is_causal=True)[0], causal, EXACT)


@pytest.mark.parametrize("separate_kv_dims", [False, True])
def test_replace_attention_keeps_the_weights_of_multihead_attention(separate_kv_dims):
    torch.manual_seed(4)
    kw = dict(kdim=12, vdim=20) if separate_kv_dims else {}
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 4, batch_first=True, **kw).double())
    mha = model[0]
    x, kx, vx = torch.randn(2, 9, 16).double(), torch.randn(2, 9, kw.get("kdim", 16)).double(), \
        torch.randn(2, 9, kw.get("vdim", 16)).double()
    if separate_kv_dims:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    else:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    replace_attention(model, nb_features=32, feature_seed=5)
    new = model[0]
    assert isinstance(new, FavorAttention) and new.batch_first and new.projection.dtype == torch.float64

    def heads(t):
        return t.view(2, 9, 4, 4).transpose(1, 2)

    q, k, v = heads(F.linear(x, wq, bq)), heads(F.linear(kx, wk, bk)), heads(F.linear(vx, wv, bv))
    expected = okadfa.favor_attention(q, k, v, new.projection, causal=True).transpose(1, 2).reshape(2, 9, 16)
    expected = F.linear(expected, mha.out_proj.weight, mha.out_proj.bias)
    assert_close(new(x, kx, vx, is_causal=True)[0], expected, REORDERED)


def test_replace_attention_in_a_transformer_encoder():
    torch.manual_seed(5)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    with pytest.raises(ValueError, match="ignore_dropout=True"):
        replace_attention(encoder)
    replace_attention(encoder, ignore_dropout=True, nb_features=16)
    assert all(isinstance(l.self_attn, FavorAttention) for l in encoder.layers)
    x = torch.randn(2, 10, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(10)
    encoder.eval()
    out = encoder(x, mask=mask, is_causal=True)
    with torch.no_grad():                                      # eval + no_grad: the fused fast path is skipped
        assert_close(encoder(x, mask=mask), out, EXACT)
    y = x.clone()
    y[:, 6:] += 1.0
    assert_close(encoder(y, mask=mask, is_causal=True)[:, :6], out[:, :6], UNCHANGED)
    with pytest.raises(ValueError, match="construct a FavorAttention"):
        replace_attention(torch.nn.MultiheadAttention(8, 2))


def test_favor_attention_compiles_fullgraph_forward_and_backward():
    torch.manual_seed(6)
    attn = FavorAttention(32, 4, batch_first=True, nb_features=16)
    x = torch.randn(2, 20, 32)

    def step(module, x):
        out, _ = module(x, x, x, is_causal=True)
        return out

    torch._dynamo.reset()
    compiled = torch.compile(attn, fullgraph=True)
    out = compiled(x, x, x, is_causal=True)[0]
    out.square().sum().backward()
    grads = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    expected = step(attn, x)
    expected.square().sum().backward()
    assert_close(out, expected, REORDERED)
    for g, p in zip(grads, attn.parameters()):
        assert_close(g, p.grad, REORDERED_GRAD)


def test_autocast_cpu_bfloat16_dtypes():
    torch.manual_seed(7)
    block = KOABlock(32, 4, attention="favor", nb_features=16)
    x = torch.randn(2, 12, 32)
    full = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = block.attn(x, x, x, is_causal=True)
        assert out.dtype == torch.bfloat16                    # the projections run in bfloat16
        y = block(x)
    assert y.dtype == torch.float32                            # the residual stream stays float32
    assert ((y - full).norm() / full.norm()).item() < 2e-2


def test_cross_attention_and_a_converted_decoder_layer():
    torch.manual_seed(8)
    attn = FavorAttention(16, 2, batch_first=True, nb_features=8).double()
    x, memory = torch.randn(2, 7, 16).double(), torch.randn(2, 11, 16).double()
    out, _ = attn(x, memory, memory)
    q = attn._heads(attn.q_proj(x))
    k, v = attn._heads(attn.k_proj(memory)), attn._heads(attn.v_proj(memory))
    expected = okadfa.favor_sdpa(q, k, v, projection=attn.projection).transpose(1, 2).reshape(2, 7, 16)
    assert_close(out, attn.out_proj(expected), REORDERED)
    with pytest.raises(ValueError, match="same length"):
        attn(x, memory, memory, is_causal=True)
    layer = torch.nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
    replace_attention(layer, nb_features=8, feature_seed=3)
    assert not torch.equal(layer.self_attn.projection, layer.multihead_attn.projection)   # seeds 3 and 4
    mask = torch.nn.Transformer.generate_square_subsequent_mask(7)
    assert layer(x.float(), memory.float(), tgt_mask=mask, tgt_is_causal=True).shape == (2, 7, 16)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(7, 7\)"):
        layer.self_attn(x.float(), x.float(), x.float(), attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(9))
