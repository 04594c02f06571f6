"""sparse_delta_matmul and its SDDMM: the forward equals the dense matmul, ``dx`` equals the
dense gradient, the sampled weight gradient equals the dense gradient read at the entries for
every implementation CPU has (Pallas in interpret mode), and padding slots are inert; also under
jit and vmap, in float32 and bfloat16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guft_jax import kernels, ops

IMPLS = ("gather", "dense", "pallas")


def _setup(seed=0, lead=(3, 4), d_in=6, d_out=5, cap=7, n_pad=2, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*lead, d_in)).astype(np.float32)
    w0 = rng.normal(size=(d_in, d_out)).astype(np.float32)
    flat = rng.choice(d_in * d_out, size=cap - n_pad, replace=False)  # duplicate-free
    rows = np.concatenate([flat // d_out, np.full(n_pad, d_in)]).astype(np.int32)
    cols = np.concatenate([flat % d_out, np.zeros(n_pad)]).astype(np.int32)
    values = rng.normal(size=cap).astype(np.float32)
    cast = lambda a: jnp.asarray(a, dtype)
    return cast(x), cast(w0), jnp.asarray(rows), jnp.asarray(cols), cast(values)


def _dense_grads(x, w0, rows, cols, values, g):
    """Gradients of ``sum(g * (x @ W))`` by plain autodiff of the densified weight."""
    w = ops.dense_delta_reference(w0, rows, cols, values)
    gx, gw = jax.grad(lambda x, w: jnp.sum((x @ w).astype(jnp.float32) * g), (0, 1))(x, w)
    return gx, gw


def test_forward_matches_dense():
    x, w0, rows, cols, values = _setup()
    dense = np.array(w0)
    for r, c, v in zip(np.asarray(rows), np.asarray(cols), np.asarray(values), strict=True):
        if r < w0.shape[0]:
            dense[r, c] += v
    y = ops.sparse_delta_matmul(x, w0, rows, cols, values)
    np.testing.assert_allclose(y, np.asarray(x) @ dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_dense_and_padding_is_inert(impl):
    x, w0, rows, cols, values = _setup(seed=1)
    g = jax.random.normal(jax.random.PRNGKey(2), (3, 4, w0.shape[1]))

    def loss(x, values):
        y = ops.sparse_delta_matmul(x, w0, rows, cols, values, impl=impl)
        return jnp.sum(y * g)

    gx, gv = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, values)
    gx_ref, gw_ref = _dense_grads(x, w0, rows, cols, values, g)
    valid = np.asarray(rows) < w0.shape[0]
    # dx is the same matmul as the dense reference's: exact up to float rounding.
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(gv)[valid], np.asarray(gw_ref)[rows[valid], cols[valid]], rtol=1e-5, atol=1e-5
    )
    assert np.all(np.asarray(gv)[~valid] == 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_sddmm_larger_shapes_multiple_blocks_and_tiles(impl):
    # Small tiles so the Pallas grid has several entry blocks, token splits and inner steps, and
    # the gather impl several chunks with a ragged last one; token count not a tile multiple.
    tiling = ops.Tiling(gather_chunk=16, pallas_block_k=8, pallas_block_t=16, pallas_token_splits=3)
    rng = np.random.default_rng(3)
    t, d_in, d_out, k = 197, 24, 40, 53
    x = jnp.asarray(rng.normal(size=(t, d_in)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(t, d_out)), jnp.float32)
    flat = rng.choice(d_in * d_out, size=k, replace=False)
    rows = jnp.asarray(np.where(np.arange(k) % 10 == 9, d_in, flat // d_out), jnp.int32)
    cols = jnp.asarray(flat % d_out, jnp.int32)
    got = jax.jit(lambda *a: ops.sddmm(*a, impl=impl, tiling=tiling))(x, dy, rows, cols)
    ref = np.asarray(x, np.float64).T @ np.asarray(dy, np.float64)
    valid = np.asarray(rows) < d_in
    want = np.where(valid, ref[np.minimum(rows, d_in - 1), cols], 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert got.dtype == jnp.float32


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicate_entries_each_get_the_entry_gradient(impl):
    x, w0, _, _, _ = _setup(seed=4)
    rows = jnp.asarray([1, 1, 3, 6], jnp.int32)
    cols = jnp.asarray([2, 2, 0, 0], jnp.int32)
    values = jnp.asarray([0.5, -1.0, 2.0, 9.0], jnp.float32)
    g = jax.random.normal(jax.random.PRNGKey(5), (3, 4, w0.shape[1]))
    gv = jax.grad(lambda v: jnp.sum(ops.sparse_delta_matmul(x, w0, rows, cols, v, impl=impl) * g))(
        values
    )
    _, gw_ref = _dense_grads(x, w0, rows, cols, values, g)
    want = np.asarray([gw_ref[1, 2], gw_ref[1, 2], gw_ref[3, 0], 0.0])
    np.testing.assert_allclose(gv, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs_accumulate_in_float32(impl):
    x, w0, rows, cols, values = _setup(seed=6, lead=(64,), d_in=16, d_out=12, cap=20, n_pad=3)
    xb, wb, vb = (a.astype(jnp.bfloat16) for a in (x, w0, values))
    g = jax.random.normal(jax.random.PRNGKey(7), (64, 12))

    def loss(x, v):
        y = ops.sparse_delta_matmul(x, wb, rows, cols, v, impl=impl)
        return jnp.sum(y.astype(jnp.float32) * g)

    gx, gv = jax.grad(loss, argnums=(0, 1))(xb, vb)
    assert gx.dtype == jnp.bfloat16 and gv.dtype == jnp.bfloat16
    gx_ref, gw_ref = _dense_grads(xb, wb, rows, cols, vb, g)
    np.testing.assert_array_equal(np.asarray(gx, np.float32), np.asarray(gx_ref, np.float32))
    # float32 accumulation over the 64 tokens of bf16 products: only the final rounding to
    # bfloat16 (half a unit in the last place, 2^-9 relative) separates it from the exact sum.
    dy = np.asarray(g.astype(jnp.bfloat16), np.float64)
    exact = np.asarray(xb, np.float64).T @ dy
    valid = np.asarray(rows) < 16
    want = exact[rows[valid], cols[valid]]
    np.testing.assert_allclose(np.asarray(gv, np.float64)[valid], want, rtol=2**-8, atol=1e-6)
    assert np.all(np.asarray(gv, np.float32)[~valid] == 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_over_a_run_axis(impl):
    runs = [_setup(seed=10 + i) for i in range(3)]
    x, w0, rows, cols, values = (jnp.stack(a) for a in zip(*runs, strict=True))
    g = jax.random.normal(jax.random.PRNGKey(8), (3, 4, w0.shape[-1]))

    def loss(x, w0, rows, cols, values):
        return jnp.sum(ops.sparse_delta_matmul(x, w0, rows, cols, values, impl=impl) * g)

    gx, gv = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 4))))(x, w0, rows, cols, values)
    for i, (xi, wi, ri, ci, vi) in enumerate(runs):
        gx_ref, gw_ref = _dense_grads(xi, wi, ri, ci, vi, g)
        valid = np.asarray(ri) < wi.shape[0]
        np.testing.assert_allclose(gx[i], gx_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(gv[i])[valid], np.asarray(gw_ref)[ri[valid], ci[valid]], rtol=1e-5, atol=1e-5
        )
        assert np.all(np.asarray(gv[i])[~valid] == 0.0)


def test_backward_saves_no_densified_weight():
    x, w0, rows, cols, values = _setup()
    _, vjp = jax.vjp(lambda v: ops.sparse_delta_matmul(x, w0, rows, cols, v), values)
    saved = [a for a in jax.tree.leaves(vjp) if hasattr(a, "shape")]
    dense = ops.dense_delta_reference(w0, rows, cols, values)
    assert not any(a.shape == dense.shape and np.array_equal(a, dense) for a in saved)
    assert any(a.shape == w0.shape and np.array_equal(a, w0) for a in saved)


def test_auto_resolves_per_backend_and_rejects_unknown():
    assert ops.resolve_sddmm_impl("auto", "cpu") == kernels.SDDMM_DEFAULTS["cpu"]
    assert ops.resolve_sddmm_impl("auto", "tpu") == "dense"
    assert ops.resolve_sddmm_impl("pallas", "cpu") == "pallas"
    with pytest.raises(ValueError, match="allowed: auto, gather, dense, pallas"):
        ops.resolve_sddmm_impl("triton")
    x, w0, rows, cols, values = _setup()
    with pytest.raises(ValueError, match="w0"):
        ops.sparse_delta_matmul(x, w0.T, rows, cols, values)


def test_auto_falls_back_to_dense_dw_above_the_gather_density():
    assert kernels.SDDMM_DEFAULTS["cpu"] == "gather"
    assert ops.resolve_sddmm_impl("auto", "cpu", density=ops.GATHER_MAX_DENSITY) == "gather"
    assert ops.resolve_sddmm_impl("auto", "cpu", density=2 * ops.GATHER_MAX_DENSITY) == "dense"
    assert ops.resolve_sddmm_impl("gather", "cpu", density=1.0) == "gather"
    assert ops.resolve_sddmm_impl("auto", "tpu", density=1e-6) == "dense"


def test_gather_skips_unfilled_capacity_and_matches_dense():
    # Mostly padding (GUFT's capacity slack), filled slots first and a few padding slots among
    # them: the chunk loop stops after the last filled chunk, results equal the dense gradient.
    rng = np.random.default_rng(8)
    t, d_in, d_out, k, filled = 37, 12, 20, 200, 23
    x = jnp.asarray(rng.normal(size=(t, d_in)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(t, d_out)), jnp.float32)
    flat = rng.choice(d_in * d_out, size=k, replace=False)
    rows = np.where(np.arange(k) < filled, flat // d_out, d_in).astype(np.int32)
    rows[[3, 11]] = d_in
    cols = (flat % d_out).astype(np.int32)
    want = np.asarray(ops.sddmm(x, dy, jnp.asarray(rows), jnp.asarray(cols), impl="dense"))
    for chunk in (4, 7, 256):
        tiling = ops.Tiling(gather_chunk=chunk)
        f = functools.partial(ops.sddmm, impl="gather", tiling=tiling)
        got = jax.jit(f)(x, dy, rows, cols)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(got)[rows >= d_in] == 0.0)


def test_empty_capacity():
    x, w0, _, _, _ = _setup()
    e = jnp.zeros((0,), jnp.int32)
    for impl in IMPLS:
        gv = jax.grad(
            lambda v, impl=impl: jnp.sum(ops.sparse_delta_matmul(x, w0, e, e, v, impl=impl))
        )(jnp.zeros((0,), jnp.float32))
        assert gv.shape == (0,)


def test_pallas_kernel_lowers_to_triton_for_cuda():
    # No GPU here: lower the compiled (non-interpret) kernel for the CUDA platform, which runs the
    # Pallas -> Triton IR lowering (gathered loads, loop, reduction) on this machine.
    export = pytest.importorskip("jax.export")
    x = jax.ShapeDtypeStruct((12608, 768), jnp.bfloat16)
    dy = jax.ShapeDtypeStruct((12608, 3072), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((7078,), jnp.int32)
    f = jax.jit(lambda x, dy, r, c: ops.sddmm(x, dy, r, c, impl="pallas", interpret=False))
    exp = export.export(
        f,
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(x, dy, idx, idx)
    text = exp.mlir_module()
    assert "__gpu$xla.gpu.triton" in text and 'name = "guft_sddmm"' in text


def _clustered(seed, t=40, d_in=24, d_out=20, n_rows=5, n_cols=4, k=12, n_pad=3):
    """Entries inside a random n_rows x n_cols sub-block (as saliency selections cluster), plus
    padding slots; the block from ops.block_of with spare (padding) capacity."""
    rng = np.random.default_rng(seed)
    br = np.sort(rng.choice(d_in, n_rows, replace=False))
    bc = np.sort(rng.choice(d_out, n_cols, replace=False))
    cells = rng.choice(n_rows * n_cols, k, replace=False)
    rows = np.concatenate([br[cells // n_cols], np.full(n_pad, d_in)]).astype(np.int32)
    cols = np.concatenate([bc[cells % n_cols], np.zeros(n_pad)]).astype(np.int32)
    block = ops.block_of(rows, cols, (d_in, d_out), (n_rows + 2, n_cols + 1))
    x = jnp.asarray(rng.normal(size=(t, d_in)).astype(np.float32))
    w0 = jnp.asarray(rng.normal(size=(d_in, d_out)).astype(np.float32))
    values = jnp.asarray(rng.normal(size=rows.shape).astype(np.float32))
    return x, w0, rows, cols, values, block


def test_block_of_is_the_sorted_unique_rows_and_cols_padded():
    rows = np.array([5, 2, 5, 9, 7], np.int32)  # 9 >= d_in: padding, dropped
    cols = np.array([1, 3, 0, 0, 3], np.int32)
    br, bc = ops.block_of(rows, cols, (9, 4), (5, 4))
    assert br.tolist() == [2, 5, 7, 9, 9] and bc.tolist() == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="exceed capacity"):
        ops.block_of(rows, cols, (9, 4), (2, 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_covers_is_true_exactly_when_every_entry_lies_in_the_block(seed):
    """Against a set-membership reference (padding ignored): the block of the entries covers
    them; one entry moved to a row, or a column, outside the block does not."""
    x, w0, rows, cols, values, block = _clustered(seed)
    shape = w0.shape
    br, bc = (jnp.asarray(b) for b in block)
    rset, cset = set(block[0].tolist()), set(block[1].tolist())

    def reference(r, c):
        return all(i in rset and j in cset for i, j in zip(r, c, strict=True) if i < shape[0])

    covers = jax.jit(ops.block_covers, static_argnums=0)
    assert reference(rows, cols) and bool(covers(shape, rows, cols, br, bc))
    rng = np.random.default_rng(seed)
    for axis, used in ((0, rset), (1, cset)):
        moved = [rows.copy(), cols.copy()]
        moved[axis][0] = rng.choice([i for i in range(shape[axis]) if i not in used])
        got = bool(covers(shape, *(jnp.asarray(m) for m in moved), br, bc))
        assert got == reference(*moved) and not got


@pytest.mark.parametrize("forward", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_path_equals_the_dense_matmul_and_gradient_at_the_entries(seed, forward):
    kw = dict(impl="block", block_forward=forward)
    x, w0, rows, cols, values, block = _clustered(seed)
    g = jax.random.normal(jax.random.PRNGKey(seed), (x.shape[0], w0.shape[1]))
    rows_j, cols_j = jnp.asarray(rows), jnp.asarray(cols)
    blk = tuple(jnp.asarray(b) for b in block)

    def loss(x, values):
        y = ops.sparse_delta_matmul(x, w0, rows_j, cols_j, values, block=blk, **kw)
        return jnp.sum(y * g)

    gx, gv = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, values)
    gx_ref, gw_ref = _dense_grads(x, w0, rows_j, cols_j, values, g)
    valid = rows < w0.shape[0]
    # forward and dx: x @ w0 plus the block's part, never a densified weight; same numbers
    y = ops.sparse_delta_matmul(x, w0, rows_j, cols_j, values, block=blk, **kw)
    dense_w = ops.dense_delta_reference(w0, rows_j, cols_j, values)
    np.testing.assert_allclose(y, np.asarray(x) @ np.asarray(dense_w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(gv)[valid], np.asarray(gw_ref)[rows[valid], cols[valid]], rtol=1e-5, atol=1e-5
    )
    assert np.all(np.asarray(gv)[~valid] == 0.0)
    # the numpy closed form of the block product, read at the entries
    ref = (np.asarray(x).T @ np.asarray(g))[rows[valid], cols[valid]]
    direct = ops.block_sddmm(x, np.asarray(g), rows_j, cols_j, *blk)
    np.testing.assert_allclose(np.asarray(direct)[valid], ref, rtol=1e-5, atol=1e-4)


def test_block_entry_outside_its_block_gets_zero_never_a_wrong_value():
    x, w0, rows, cols, values, (br, bc) = _clustered(3)
    br = br.copy()
    br[0] = br[1]  # the first unique row is now missing from the block (and br stays sorted)
    missing = rows == _clustered(3)[5][0][0]
    out = np.asarray(ops.block_sddmm(x, x[:, : w0.shape[1]], rows, cols, br, bc))
    assert missing.any() and np.all(out[missing] == 0.0)


def _block_sddmm_calls(f, *args):
    return kernels.count_calls(jax.make_jaxpr(f)(*args), "block_sddmm")


def test_auto_takes_the_block_only_where_it_is_small():
    x, w0, rows, cols, values, block = _clustered(4)
    grad = lambda blk, **kw: jax.grad(
        lambda v: jnp.sum(ops.sparse_delta_matmul(x, w0, rows, cols, v, block=blk, **kw))
    )
    assert _block_sddmm_calls(grad(block), values) == 1  # 7 x 5 of 24 x 20: 7% of the matrix
    full = ops.block_of(rows, cols, w0.shape, w0.shape)  # capacity = the whole matrix
    assert _block_sddmm_calls(grad(full), values) == 0  # not taken: the per-backend impl ran
    np.testing.assert_allclose(grad(block)(values), grad(full)(values), rtol=1e-5, atol=1e-5)
    # the fraction is an argument: 0 never takes a block, 1 takes the whole-matrix one
    assert _block_sddmm_calls(grad(block, block_max_fraction=0.0), values) == 0
    assert _block_sddmm_calls(grad(full, block_max_fraction=1.0), values) == 1
    # an explicit impl still takes a block that pays (impl is the kernel outside blocks)
    assert _block_sddmm_calls(grad(block, impl="gather"), values) == 1
    with pytest.raises(ValueError, match="needs block"):
        ops.sparse_delta_matmul(x, w0, rows, cols, values, impl="block")


def test_block_path_holds_no_weight_sized_temporaries():
    """Through 8 layers with blocks, XLA's temporaries stay far below one weight per layer (no
    densified copy in either pass); the path without blocks, which densifies, holds about one
    per layer (XLA schedules those copies early), which is what the block path removes."""
    d, t, n_layers = 256, 4, 8
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.normal(size=(d, d)).astype(np.float32) / 16) for _ in range(n_layers)]
    r = rng.integers(0, 32, 64).astype(np.int32)  # entries inside a 32 x 32 block
    c = rng.integers(0, 32, 64).astype(np.int32)
    blk = tuple(jnp.asarray(b) for b in ops.block_of(r, c, (d, d)))
    rows, cols = jnp.asarray(r), jnp.asarray(c)
    x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))

    def temp_bytes(block):
        def f(vs, ws, x):
            for w, v in zip(ws, vs, strict=True):
                y = ops.sparse_delta_matmul(x, w, rows, cols, v, block=block, block_forward=True)
                x = jnp.tanh(y)
            return jnp.sum(x)

        vs = [jnp.zeros((64,), jnp.float32)] * n_layers
        c = jax.jit(jax.grad(f)).lower(vs, ws, x).compile()
        return c.memory_analysis().temp_size_in_bytes

    w_bytes = d * d * 4
    assert temp_bytes(blk) < w_bytes, temp_bytes(blk) / w_bytes
    assert temp_bytes(None) >= n_layers * w_bytes / 2


def test_block_forward_off_densifies_and_gives_the_same_gradients():
    x, w0, rows, cols, values, block = _clustered(6)
    blk = tuple(jnp.asarray(b) for b in block)
    g = jax.random.normal(jax.random.PRNGKey(6), (x.shape[0], w0.shape[1]))

    def grads(block_forward):
        f = lambda x, v: jnp.sum(
            ops.sparse_delta_matmul(x, w0, rows, cols, v, block=blk, block_forward=block_forward)
            * g
        )
        return jax.grad(f, argnums=(0, 1))(x, values)

    on = grads(True)
    off = grads(False)
    for a, b in zip(on, off, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gather_max_density_is_an_argument_of_the_matmul():
    """A "gather" layer above gather_max_density runs the dense dW matmul instead (no chunk
    loop in its backward), with the same gradient; "auto" applies the default limit, an
    explicit "gather" none."""
    x, w0, rows, cols, values = _setup(seed=9)  # 7 slots of 30 entries: density 0.23
    g = jax.random.normal(jax.random.PRNGKey(9), (3, 4, w0.shape[1]))

    def grad(**kw):
        return jax.grad(lambda v: jnp.sum(ops.sparse_delta_matmul(x, w0, rows, cols, v, **kw) * g))

    def loops(**kw):
        return str(jax.make_jaxpr(grad(**kw))(values)).count("while[")

    assert loops(impl="gather") == 1
    assert loops(impl="gather", gather_max_density=0.2) == 0
    assert loops(impl="gather", gather_max_density=0.25) == 1
    want = grad(impl="dense")(values)
    np.testing.assert_allclose(grad(impl="gather", gather_max_density=0.2)(values), want, rtol=1e-6)
    assert ops.resolve_sddmm_impl("gather", "cpu", density=0.3, gather_max_density=0.2) == "dense"
    assert ops.resolve_sddmm_impl("auto", "cpu", density=0.3, gather_max_density=0.5) == "gather"


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_kernel_arguments_are_the_resolved_options(backend):
    r = kernels.resolve(None, backend=backend)
    args = ops.kernel_arguments(backend=backend)
    assert args == {
        "impl": r.sddmm,
        "block_forward": r.block_forward == "on",
        "block_max_fraction": r.block_max_fraction,
        "gather_max_density": r.gather_max_density,
    }
    explicit = kernels.KernelOptions(sddmm="pallas", block_forward="off", block_max_fraction=0.1)
    assert ops.kernel_arguments(explicit) == {
        "impl": "pallas",
        "block_forward": False,
        "block_max_fraction": 0.1,
        "gather_max_density": kernels.GATHER_MAX_DENSITY,
    }
