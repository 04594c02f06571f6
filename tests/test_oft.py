"""OFT and BOFT: the Cayley transform, the butterfly permutation and the rotated kernels against
numpy oracles (PEFT 0.17.1's formulas), orthogonality after AdamW steps, closed-form counts,
COFT, the interface properties and bad input."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from guft_jax import paths, vit
from guft_jax.methods import get_method
from guft_jax.methods import oft as oft_mod
from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import StepInfo

Q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
# small settings for the 32-wide tiny ViT: blocks of 8; 2 butterfly factors of 4-blocks
CASES = [
    ("oft", dict(oft_block_size=8)),
    ("boft", dict(boft_block_size=4, boft_n_butterfly_factor=2)),
]


def np_skew(vec, b):
    u = np.zeros((*vec.shape[:-1], b, b))
    rows, cols = np.triu_indices(b, 1)  # torch.triu_indices(b, b, 1): the same row-major order
    u[..., rows, cols] = vec
    return u - np.swapaxes(u, -1, -2)


def np_block_diag(blocks):
    n, b, _ = blocks.shape
    out = np.zeros((n * b, n * b))
    for i in range(n):
        out[i * b : (i + 1) * b, i * b : (i + 1) * b] = blocks[i]
    return out


def np_butterfly_perm(n, b, r, n_butterfly_factor):
    """PEFT 0.17.1's ``block_butterfly_perm`` as its loop (b blocks, base block r)."""
    if n_butterfly_factor == 0:
        return np.arange(n)
    block_size = n // b
    step = block_size / r
    order = list(range(0, int(np.ceil(step)), 2)) + list(range(1, int(np.ceil(step)), 2))
    sorted_order = np.empty(block_size, np.int64)
    for i, pos in enumerate(order):
        sorted_order[i * r : i * r + r] = np.arange(block_size)[pos * r : pos * r + r]
    idx = np.arange(n)
    for i in range(0, n, block_size):
        idx[i : i + block_size] = idx[i : i + block_size][sorted_order]
    return idx


def np_boft_matrix(boft_r):
    """PEFT's ``get_delta_weight``: Π_i P_i blockdiag(cayley(R_i)) P_iᵀ with P = perm2mat."""
    m, d, b, _ = boft_r.shape
    n = d * b
    s = 0.5 * (boft_r - np.swapaxes(boft_r, -1, -2))
    eye = np.eye(b)
    q = np.stack(
        [[(eye - s[i, j]) @ np.linalg.inv(eye + s[i, j]) for j in range(d)] for i in range(m)]
    )
    total = np.eye(n)
    for i in range(m):
        perm = np_butterfly_perm(n, d // 2**i, b // 2, m - 1)
        p = np.zeros((n, n))
        p[np.arange(n), perm] = 1  # perm2mat
        total = p @ np_block_diag(q[i]) @ p.T @ total
    return total


def test_skew_and_both_cayley_paths_match_numpy():
    b, terms = 6, 5
    vec = np.random.default_rng(0).normal(0, 0.1, (3, b * (b - 1) // 2))
    s = np_skew(vec, b)
    np.testing.assert_array_equal(
        oft_mod.skew(jnp.asarray(vec, jnp.float32), b), s.astype(np.float32)
    )
    eye = np.eye(b)
    exact = np.stack([(eye - x) @ np.linalg.inv(eye + x) for x in s])  # PEFT: solve(left=False)
    series = np.stack(
        [eye + 2 * sum(np.linalg.matrix_power(x, k) for k in range(1, terms)) for x in s]
    )
    got = oft_mod.cayley(jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(got, exact, atol=1e-6)
    np.testing.assert_allclose(
        oft_mod.cayley(jnp.asarray(s), neumann_terms=terms), series, atol=1e-6
    )
    # the series converges to (I + S)(I - S)^-1: the transpose of the exact path's R
    long = oft_mod.cayley(jnp.asarray(s, jnp.float32), neumann_terms=40)
    np.testing.assert_allclose(long, np.swapaxes(exact, -1, -2), atol=1e-5)
    np.testing.assert_allclose(
        got @ jnp.swapaxes(got, -1, -2), np.broadcast_to(eye, s.shape), atol=1e-6
    )
    assert got.dtype == jnp.float32


@pytest.mark.parametrize(
    "n, b, m", [(32, 4, 2), (32, 4, 3), (64, 8, 3), (48, 2, 4), (24, 6, 2), (16, 3, 1)]
)
def test_butterfly_perm_matches_peft_loop(n, b, m):
    d = n // b
    for i in range(m):
        want = np_butterfly_perm(n, d // 2**i, b // 2, m - 1)
        got = oft_mod.butterfly_perm(n, block_num=d, block_size=b, index=i, factors=m)
        np.testing.assert_array_equal(got, want)
    if m > 1:  # factor 0 is the identity, the later ones are not
        assert np.array_equal(
            oft_mod.butterfly_perm(n, block_num=d, block_size=b, index=0, factors=m), np.arange(n)
        )
        assert not np.array_equal(
            oft_mod.butterfly_perm(n, block_num=d, block_size=b, index=1, factors=m), np.arange(n)
        )


@pytest.mark.parametrize("n, b, m", [(32, 4, 3), (24, 6, 2), (16, 8, 1)])
def test_boft_rotation_matches_dense_butterfly_product(n, b, m):
    rng = np.random.default_rng(1)
    boft_r = rng.normal(0, 0.2, (m, n // b, b, b))
    w = rng.normal(size=(n, 5))
    want = np_boft_matrix(boft_r)
    np.testing.assert_allclose(want @ want.T, np.eye(n), atol=1e-10)
    got = oft_mod.boft_rotate(jnp.asarray(w, jnp.float32), jnp.asarray(boft_r, jnp.float32))
    np.testing.assert_allclose(got, want @ w, atol=1e-5)


def test_oft_merge_rotates_the_input_side_as_peft(tiny):
    _, params = tiny
    for kw in (dict(oft_block_size=8), dict(r=2, oft_block_size=0, block_share=True)):
        m = get_method("oft", **kw)
        tr = mc.perturb(m.init(jax.random.key(0), params), scale=0.1)
        vec = np.asarray(tr["oft"][ws.key(Q)]["oft_R"], np.float64)
        b = 8 if kw.get("oft_block_size") else 16
        s = np_skew(vec, b)
        blocks = np.stack([(np.eye(b) - x) @ np.linalg.inv(np.eye(b) + x) for x in s])
        blocks = np.broadcast_to(blocks, (32 // b, b, b))
        w0 = np.asarray(ws.matrix(params, Q), np.float64).T  # torch orientation (out, in)
        want = w0 @ np_block_diag(blocks).T  # PEFT merge: W'ᵀ = R W0ᵀ
        got = ws.matrix(m.merge(params, tr), Q)
        np.testing.assert_allclose(np.asarray(got).T, want, atol=1e-5)


def test_boft_merge_scales_output_units(tiny):
    _, params = tiny
    m = get_method("boft", boft_block_size=4, boft_n_butterfly_factor=3)
    tr = mc.perturb(m.init(jax.random.key(0), params), scale=0.1)
    f = tr["boft"][ws.key(Q)]
    w0 = np.asarray(ws.matrix(params, Q), np.float64).T
    rot = np_boft_matrix(np.asarray(f["boft_R"], np.float64))
    want = (w0 @ rot.T) * np.asarray(f["boft_s"], np.float64)  # PEFT: (R W0ᵀ)ᵀ * boft_s (out, 1)
    np.testing.assert_allclose(np.asarray(ws.matrix(m.merge(params, tr), Q)).T, want, atol=1e-5)


@pytest.mark.parametrize("name, kw", CASES)
def test_interface_properties(tiny, tmp_path, name, kw):
    model, params = tiny
    m = get_method(name, **kw)
    mc.identity_at_init(model, params, m, atol=1e-6)
    mc.merge_equals_apply(model, params, m)
    g = mc.gradients_reach_every_trained_leaf(model, params, m)
    assert set(g) == {"head", name}
    mc.artifact_round_trip(params, m, tmp_path)


def rotations(name, f, d_in):
    """The dense (in, in) rotation of one adapted kernel, from its trained factors."""
    if name == "boft":
        return oft_mod.boft_rotate(jnp.eye(d_in), f["boft_R"])
    vec = f["oft_R"]
    b = d_in // vec.shape[0]
    return jax.scipy.linalg.block_diag(*oft_mod.cayley(oft_mod.skew(vec, b)))


@pytest.mark.parametrize("name, kw", CASES)
def test_engine_one_trace_and_rotations_stay_orthogonal(tiny, source, name, kw):
    model, params = tiny
    r = mc.trains_in_one_trace(model, params, get_method(name, **kw), source, lr=3e-2)
    factors = r.state.trainable[name]
    moved = 0.0
    for k, f in factors.items():
        d_in = ws.matrix(params, ws.path_of(k)).shape[0]
        rot = rotations(name, f, d_in)
        np.testing.assert_allclose(rot @ rot.T, np.eye(d_in), atol=1e-5)
        moved = max(moved, float(jnp.abs(rot - jnp.eye(d_in)).max()))
    assert moved > 1e-2  # the rotations trained (the check is not about R = I)


def test_vit_b16_counts_closed_form_and_peft():
    # PEFT 0.17.1 OFTConfig(oft_block_size=32, target_modules=["query", "value"]) on a ViT-B/16
    # (12 blocks x 2 Linear(768, 768)): update_layer sets r = 768 // 32 = 24 and
    # OFTRotationModule.weight = (r, 32*31//2) = (24, 496) per layer: 24 * 11,904 = 285,696.
    assert mc.vit_b16_count("oft") == 24 * 24 * 496 == 285_696
    # block_share: weight (1, 496) per layer; r = 4 blocks: (4, 192*191//2).
    assert mc.vit_b16_count("oft", block_share=True) == 24 * 496
    assert mc.vit_b16_count("oft", r=4, oft_block_size=0) == 24 * 4 * 192 * 191 // 2
    # PEFT BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2): boft_R (2, 192, 4, 4) and
    # boft_s (768, 1) per layer: 24 * (6,144 + 768) = 165,888 (with the CUDA extension; without
    # it PEFT forces one factor: 24 * (3,072 + 768) = 92,160).
    assert mc.vit_b16_count("boft", boft_n_butterfly_factor=2) == 24 * (2 * 192 * 16 + 768)
    assert mc.vit_b16_count("boft", boft_n_butterfly_factor=2) == 165_888
    assert mc.vit_b16_count("boft") == 92_160  # the factory default is PEFT's: one factor
    assert mc.vit_b16_count("boft", boft_block_size=0, boft_block_num=8) == 24 * (8 * 96 * 96 + 768)


def test_coft_projects_each_block_onto_the_eps_ball(tiny):
    model, params = tiny
    eps = 0.05
    m = get_method("oft", oft_block_size=8, coft=True, eps=eps)
    tr = mc.perturb(m.init(jax.random.key(0), params), scale=0.1)
    vec = tr["oft"][ws.key(Q)]["oft_R"]  # 4 blocks: radius eps / 2
    proj = oft_mod.coft_project(vec, 8, eps)
    norms = np.linalg.norm(np_skew(np.asarray(proj, np.float64), 8), axis=(-2, -1))
    np.testing.assert_allclose(norms, eps / 2, rtol=1e-5)
    small = vec * 1e-4
    np.testing.assert_array_equal(oft_mod.coft_project(small, 8, eps), small)
    # the step hook stores the projected weights; merge uses the projection of what it gets
    info = StepInfo(0, 1, tr, tr, (), (), tr, params)
    stored = m.hooks.step(info)[0]
    np.testing.assert_allclose(stored["oft"][ws.key(Q)]["oft_R"], proj, rtol=1e-6)
    a, b = m.merge(params, tr), m.merge(params, stored)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # straight-through: the gradient is the one at the projected point, not zero
    loss = lambda t: jnp.sum(paths.get(m.merge(params, t), Q) ** 2)  # noqa: E731
    g, g_proj = jax.grad(loss)(tr), jax.grad(loss)(stored)
    np.testing.assert_allclose(
        g["oft"][ws.key(Q)]["oft_R"], g_proj["oft"][ws.key(Q)]["oft_R"], atol=1e-6
    )
    assert float(jnp.abs(g["oft"][ws.key(Q)]["oft_R"]).max()) > 0


@pytest.mark.parametrize(
    "name, kw, field",
    [
        ("oft", dict(r=4), "oft.r, oft.oft_block_size"),
        ("oft", dict(oft_block_size=0), "oft.r, oft.oft_block_size"),
        ("oft", dict(module_dropout=0.1), "oft.module_dropout"),
        ("oft", dict(eps=0.0), "oft.eps"),
        (
            "oft",
            dict(use_cayley_neumann=True, num_cayley_neumann_terms=0),
            "oft.num_cayley_neumann_terms",
        ),
        ("boft", dict(boft_block_num=4), "boft.boft_block_num, boft.boft_block_size"),
        ("boft", dict(boft_n_butterfly_factor=0), "boft.boft_n_butterfly_factor"),
        ("boft", dict(boft_dropout=0.1), "boft.boft_dropout"),
    ],
)
def test_bad_hyperparameters_name_the_field(name, kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        get_method(name, **kw)


@pytest.mark.parametrize(
    "name, kw, field",
    [
        ("oft", dict(oft_block_size=12), "oft.oft_block_size: 12 does not divide the 32"),
        ("oft", dict(r=3, oft_block_size=0), "oft.r: 3 does not divide"),
        (
            "boft",
            dict(boft_block_size=8, boft_n_butterfly_factor=4),
            "boft.boft_n_butterfly_factor",
        ),
        (
            "boft",
            dict(boft_block_size=1, boft_n_butterfly_factor=2),
            "boft.boft_n_butterfly_factor",
        ),
    ],
)
def test_blocks_that_do_not_fit_a_kernel_are_errors(tiny, name, kw, field):
    with pytest.raises(ValueError, match=field):
        get_method(name, **kw).init(jax.random.key(0), tiny[1])


def test_coft_in_the_engine_keeps_every_block_in_its_ball(tiny, source):
    model, params = tiny
    eps = 0.5
    m = get_method("oft", oft_block_size=8, coft=True, eps=eps)
    r = mc.trains_in_one_trace(model, params, m, source, lr=3e-2)
    for f in r.state.trainable["oft"].values():
        norms = np.linalg.norm(np_skew(np.asarray(f["oft_R"], np.float64), 8), axis=(-2, -1))
        assert norms.max() <= eps / 2 * (1 + 1e-5) and norms.max() > eps / 4, norms


@pytest.mark.parametrize("name", ["oft", "boft"])
def test_all_kernels_rotate_in_one_batched_solve(name):
    """Every adapted kernel's Cayley blocks go through one ``solve`` (one LU) in the step: on
    XLA:CPU many concurrent batched solves in one program can deadlock (24 kernels of 12 blocks
    of 32 x 32 hung), one batched call does not."""
    model = vit.build_model("ViT-tiny/4", num_classes=3)
    params = jax.eval_shape(lambda: vit.init_params(model, jax.random.key(0), 16))
    targets = (r"(query|key|value)/kernel$", r"Dense_[01]/kernel$")
    m = get_method(name, targets=targets)
    tr = jax.eval_shape(lambda p: m.init(jax.random.key(0), p), params)
    assert len(tr[name]) >= 8
    jaxpr = jax.make_jaxpr(jax.grad(lambda t, p: jnp.sum(jax.tree.leaves(m.merge(p, t))[0])))(
        tr, params
    )
    assert str(jaxpr).count("custom_linear_solve[") == 1


def test_mixed_block_sizes_solve_together_and_match_one_by_one():
    rng = np.random.default_rng(0)
    skews = []
    for n, b in ((3, 4), (2, 8), (1, 2)):
        u = np.triu(rng.normal(size=(n, b, b)), 1)
        skews.append(jnp.asarray(u - np.swapaxes(u, -1, -2), jnp.float32))
    for got, s in zip(oft_mod.cayley_all(skews), skews, strict=True):
        np.testing.assert_allclose(got, oft_mod.cayley(s), atol=1e-6)
