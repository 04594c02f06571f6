"""masks: eligibility presets, exact top-k under every budget allocation (against numpy references
on small score trees with ties, NaNs and exclusions), OR-merge, exclude_selected growth, reports."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guft_jax import masks, paths, vit

ALLOCATIONS = ["global", "per_tensor", "per_row"]
NORMALIZE = [None, "mean"]

# Small leaves named like ViT params, so that row_view's inference is exercised: attention
# query (d, h, hd) -> (d, h*hd), out (h, hd, d) -> (h*hd, d), Dense (in, out), 1-D / non-kernel
# leaves -> (1, size).
SHAPES = {
    "b0.attn.query.kernel": (4, 2, 3),
    "b0.attn.query.bias": (2, 3),
    "b0.attn.out.kernel": (2, 3, 4),
    "b0.mlp.Dense_0.kernel": (4, 5),
    "b0.mlp.Dense_0.bias": (5,),
    "b0.LayerNorm_0.scale": (4,),
}
VIEWS = {
    "b0.attn.query.kernel": (4, 6),
    "b0.attn.query.bias": (1, 6),
    "b0.attn.out.kernel": (6, 4),
    "b0.mlp.Dense_0.kernel": (4, 5),
    "b0.mlp.Dense_0.bias": (1, 5),
    "b0.LayerNorm_0.scale": (1, 4),
}
N = sum(math.prod(s) for s in SHAPES.values())  # 83


def _scores(seed, ties=True, nans=False):
    """Non-negative saliency-like scores; with ``ties`` only 4 distinct values."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in SHAPES.items():
        x = rng.integers(0, 4, shape) if ties else np.abs(rng.normal(size=shape))
        x = x.astype(np.float32) * (1 + 3 * (key.endswith("bias")))  # uneven scales per tensor
        if nans:
            x[rng.random(shape) < 0.1] = np.nan
        out[key] = x
    return out


def _exclude(seed, p=0.3):
    rng = np.random.default_rng(1000 + seed)
    return {key: rng.random(shape) < p for key, shape in SHAPES.items()}


# ---------------------------------------------------------------- numpy references


def _rank(x, ex):
    """Indices of a flat vector best first: selectable before excluded, then score descending
    (NaN as -inf, -0.0 == 0.0), then lower index."""
    x = np.where(np.isnan(x), -np.inf, x.astype(np.float32)) + np.float32(0)
    ex = np.zeros(x.shape, bool) if ex is None else ex
    return np.lexsort((np.arange(x.size), -x, ex))


def _ref_mean(x, ex):
    x = x.astype(np.float32)
    ok = np.isfinite(x) & (True if ex is None else ~ex)
    mean = np.float32(np.sum(np.where(ok, x, 0), dtype=np.float32) / max(ok.sum(), 1))
    return x / (mean if mean > 0 else np.float32(1))


def _ref_quotas(k, sel):
    """Largest remainder with exact fractions (independent of the library's integer version)."""
    from fractions import Fraction

    total = sum(sel)
    share = [Fraction(k * s, total) if total else Fraction(0) for s in sel]
    base = [math.floor(x) for x in share]
    order = sorted(range(len(sel)), key=lambda i: (-(share[i] - base[i]), i))
    for i in order[: k - sum(base)]:
        base[i] += 1
    return base


def _ref_topk(scores, k, exclude=None, allocation="global", normalize=None):
    keys = sorted(scores)
    ex = {key: (None if exclude is None else np.asarray(exclude[key])) for key in keys}
    out = {}
    if allocation == "global":
        xs = [
            (_ref_mean(scores[key], ex[key]) if normalize == "mean" else scores[key]).ravel()
            for key in keys
        ]
        exs = [np.zeros(scores[k].size, bool) if ex[k] is None else ex[k].ravel() for k in keys]
        flat = np.concatenate(xs)
        chosen = np.zeros(flat.size, bool)
        chosen[_rank(flat, np.concatenate(exs))[:k]] = True
        off = 0
        for key in keys:
            n = scores[key].size
            out[key] = chosen[off : off + n].reshape(scores[key].shape)
            off += n
        return out
    sel = [scores[key].size - (0 if ex[key] is None else int(ex[key].sum())) for key in keys]
    quotas = _ref_quotas(k, sel)
    for key, k_t in zip(keys, quotas, strict=True):
        x, e = scores[key], ex[key]
        if allocation == "per_tensor":
            chosen = np.zeros(x.size, bool)
            chosen[_rank(x.ravel(), None if e is None else e.ravel())[:k_t]] = True
            out[key] = chosen.reshape(x.shape)
            continue
        d_in, d_out = VIEWS[key]
        rows = x.reshape(d_in, d_out).T
        erows = np.zeros(rows.shape, bool) if e is None else e.reshape(d_in, d_out).T
        cap = (~erows).sum(1)
        q = 0  # water-filling: raise the level while it fits
        while q < d_in and np.minimum(cap, q + 1).sum() <= k_t:
            q += 1
        n_r = np.minimum(cap, q)
        left = k_t - n_r.sum()
        ranked = [_rank(rows[r], erows[r]) for r in range(d_out)]
        cands = [r for r in range(d_out) if cap[r] > q]
        nxt = {r: rows[r][ranked[r][q]] for r in cands}
        nxt = {r: (-np.inf if np.isnan(v) else v + 0) for r, v in nxt.items()}
        for r in sorted(cands, key=lambda r: (-nxt[r], r))[:left]:
            n_r[r] += 1
        chosen = np.zeros(rows.shape, bool)
        for r in range(d_out):
            chosen[r, ranked[r][: n_r[r]]] = True
        out[key] = chosen.T.reshape(x.shape)
    return out


def _np(mask):
    return {k: np.asarray(v) for k, v in mask.items()}


def _assert_equal(got, ref):
    assert sorted(got) == sorted(ref)
    for key in ref:
        np.testing.assert_array_equal(np.asarray(got[key]), ref[key], err_msg=key)


# ---------------------------------------------------------------- selection properties


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_topk_equals_numpy_reference_exact_k(allocation, normalize):
    for seed, (ties, nans) in enumerate([(True, False), (False, False), (True, True)]):
        s = _scores(seed, ties, nans)
        for k in (0, 1, 7, 50, N):
            got = masks.topk_mask(s, k, allocation=allocation, normalize=normalize)
            assert masks.count(got) == k
            _assert_equal(got, _ref_topk(s, k, None, allocation, normalize))


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_exclude_is_never_selected_and_reference_holds(allocation):
    for seed in range(3):
        s, ex = _scores(seed, nans=seed == 2), _exclude(seed)
        n_sel = N - sum(int(e.sum()) for e in ex.values())
        for k in (1, 13, n_sel):  # k = n_sel: every selectable entry, NaN ones included
            for normalize in NORMALIZE:
                kw = dict(exclude=ex, allocation=allocation, normalize=normalize)
                got = _np(masks.topk_mask(s, k, **kw))
                assert sum(int(m.sum()) for m in got.values()) == k
                assert not any(np.any(got[key] & ex[key]) for key in s)
                _assert_equal(got, _ref_topk(s, k, ex, allocation, normalize))
        with pytest.raises(ValueError, match="k:"):
            masks.topk_mask(s, n_sel + 1, exclude=ex, allocation=allocation)


@pytest.mark.parametrize("allocation", ["per_tensor", "per_row"])
def test_per_tensor_quotas_are_rounded_proportional_shares(allocation):
    s = _scores(3)
    for k in (3, 10, 33, 64):
        got = _np(masks.topk_mask(s, k, allocation=allocation))
        counts = {key: int(m.sum()) for key, m in got.items()}
        assert sum(counts.values()) == k
        for key, c in counts.items():
            exact = k * s[key].size / N
            assert math.floor(exact) <= c <= math.ceil(exact), (key, c, exact)
            assert abs(c - round(exact)) <= 1


def test_per_row_gives_every_row_its_quota():
    s = _scores(4)
    for k in (5, 20, 47, 80):
        got = _np(masks.topk_mask(s, k, allocation="per_row"))
        keys = sorted(s)
        quotas = dict(zip(keys, _ref_quotas(k, [s[key].size for key in keys]), strict=True))
        for key, m in got.items():
            d_in, d_out = VIEWS[key]
            per_row = m.reshape(d_in, d_out).sum(0)
            k_t = quotas[key]
            assert per_row.sum() == k_t
            assert per_row.min() >= k_t // d_out and per_row.max() <= -(-k_t // d_out), key


def test_per_row_redistributes_a_short_row_exactly():
    # One output unit of an (in=4, out=3) kernel has a single selectable entry: its deficit is
    # spread over the other rows and the total stays exact.
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    ex = np.zeros((4, 3), bool)
    ex[1:, 0] = True  # column (output unit) 0 keeps only entry (0, 0)
    got = masks.topk_mask({"l.kernel": x}, 7, exclude={"l.kernel": ex}, allocation="per_row")
    got = np.asarray(got["l.kernel"])
    assert got.sum() == 7 and not np.any(got & ex)
    assert got.sum(0).tolist() == [1, 3, 3]


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_exclude_selected_grows_by_exactly_k_and_or_merge(allocation):
    s1, s2 = _scores(5), _scores(6)
    k = 12
    m1 = masks.topk_mask(s1, k, allocation=allocation)
    m2 = masks.topk_mask(s2, k, allocation=allocation)
    plain = _np(masks.merge_masks(m1, m2))
    for key in s1:
        np.testing.assert_array_equal(plain[key], np.asarray(m1[key]) | np.asarray(m2[key]))
    assert k <= masks.count(plain) <= 2 * k
    grown = m1
    for r in range(1, 4):  # LT-SFT's rule: rank only entries not yet selected
        new = masks.topk_mask(s1, k, exclude=grown, allocation=allocation)
        assert not any(np.any(np.asarray(new[key]) & np.asarray(grown[key])) for key in s1)
        grown = masks.merge_masks(grown, new)
        assert masks.count(grown) == (r + 1) * k


def test_normalize_is_rank_preserving_within_tensors():
    s = _scores(7, ties=False)
    for allocation in ("per_tensor", "per_row"):
        _assert_equal(
            masks.topk_mask(s, 30, allocation=allocation, normalize="mean"),
            _np(masks.topk_mask(s, 30, allocation=allocation)),
        )
    # Global: the bias tensors (scores x4) stop dominating once each tensor is divided by its mean.
    raw = _np(masks.topk_mask(s, 30))
    norm = _np(masks.topk_mask(s, 30, normalize="mean"))
    bias = [k for k in s if k.endswith("bias")]
    assert sum(norm[k].sum() for k in bias) < sum(raw[k].sum() for k in bias)


def test_quotas_are_data_one_compile_for_changing_exclude():
    s = _scores(8)
    programs = {"per_tensor": masks.select_per_tensor, "per_row": masks.select_per_row}
    for allocation, fn in programs.items():
        masks.topk_mask(s, 9, exclude=_exclude(0), allocation=allocation)
        before = fn._cache_size()
        for seed in (1, 2, 3):
            masks.topk_mask(s, 9, exclude=_exclude(seed, p=0.1 * seed), allocation=allocation)
        assert fn._cache_size() == before
    # per_row does not even specialise on k.
    before = masks.select_per_row._cache_size()
    for k in (1, 5, 17):
        masks.topk_mask(s, k, exclude=_exclude(0), allocation="per_row")
    assert masks.select_per_row._cache_size() == before


def test_bad_options_name_the_field():
    s = _scores(0)
    with pytest.raises(ValueError, match="allocation"):
        masks.topk_mask(s, 3, allocation="per_layer")
    with pytest.raises(ValueError, match="normalize"):
        masks.topk_mask(s, 3, normalize="max")
    with pytest.raises(ValueError, match="row_dims"):
        masks.topk_mask(s, 3, allocation="per_row", row_dims={"b0.mlp.Dense_0.kernel": (3, 5)})
    with pytest.raises(ValueError, match="k:"):
        masks.topk_mask(s, N + 1, allocation="per_row")
    assert masks.largest_remainder(5, [1, 1, 1]) == [2, 2, 1]
    assert masks.largest_remainder(0, [0, 0]) == [0, 0]


def test_row_dims_override_and_inference():
    s = {"w.kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}
    # Default view (2 in, 3 out): one entry per output unit -> the larger row of each column.
    got = np.asarray(masks.topk_mask(s, 3, allocation="per_row")["w.kernel"])
    assert got.tolist() == [[False] * 3, [True] * 3]
    # Override to (6, 1): one output unit holding everything -> the global top 3.
    got = np.asarray(
        masks.topk_mask(s, 3, allocation="per_row", row_dims={"w.kernel": (6, 1)})["w.kernel"]
    )
    assert got.ravel().tolist() == [False] * 3 + [True] * 3
    for key, view in VIEWS.items():
        assert masks.row_view(key, SHAPES[key]) == view


# ---------------------------------------------------------------- eligibility presets


@pytest.fixture(scope="module")
def trees():
    out = {}
    for name in ("ViT-tiny/4", "DINOv2-tiny/4"):
        model = vit.build_model(name, num_classes=3)
        out[name] = jax.eval_shape(lambda m=model: vit.init_params(m, jax.random.key(0), 8))
    return out


BLOCKS_NAMED = re.compile(
    r"^Transformer/encoderblock_\d+/(MultiHeadDotProductAttention_1/(query|key|value|out)"
    r"|MlpBlock_3/Dense_[01])/(kernel|bias)$"
)
NEVER_IN_BLOCKS = re.compile(r"^embedding/|^cls|pos_embedding|LayerScale|LayerNorm|encoder_norm")


@pytest.mark.parametrize("name", ["ViT-tiny/4", "DINOv2-tiny/4"])
def test_presets_select_only_what_they_name(trees, name):
    params = trees[name]
    leaves = [p for p in paths.leaf_paths(params)]
    blocks = {masks.key_path(k) for k in masks.eligible_leaves(params, preset="blocks")}
    assert all(BLOCKS_NAMED.search(p) and not NEVER_IN_BLOCKS.search(p) for p in blocks)
    assert blocks == {p for p in leaves if BLOCKS_NAMED.search(p)}
    assert len(blocks) == 2 * 12  # 2 blocks x (4 attention + 2 MLP Dense) x (kernel, bias)
    if name.startswith("DINOv2"):
        assert any("LayerScale" in p for p in leaves)
    every = {masks.key_path(k) for k in masks.eligible_leaves(params, preset="all")}
    assert every == {p for p in leaves if not p.startswith("head/")}
    assert masks.eligible_leaves(params) == masks.eligible_leaves(params, preset="all")
    # User regexes on top of the preset: intersection with include, minus exclude.
    mlp_kernels = masks.eligible_leaves(params, ["MlpBlock"], ["bias"], preset="blocks")
    assert {masks.key_path(k) for k in mlp_kernels} == {
        p for p in blocks if "MlpBlock" in p and not p.endswith("bias")
    }
    assert all(mlp_kernels[k] == params_shape(params, k) for k in mlp_kernels)


def params_shape(params, key):
    return tuple(paths.get(params, masks.key_path(key)).shape)


def test_preset_and_regex_errors_name_the_field(trees):
    params = trees["ViT-tiny/4"]
    with pytest.raises(ValueError, match=r"guft\.eligible.*'all'.*'blocks'"):
        masks.eligible_leaves(params, preset="kernels")
    with pytest.raises(ValueError, match=r"guft\.include"):
        masks.eligible_leaves(params, include=["no_such_layer"], preset="blocks")
    with pytest.raises(ValueError, match=r"guft\.exclude"):
        masks.eligible_leaves(params, exclude=["no_such_layer"])
    with pytest.raises(ValueError, match=r"guft\.include.*'blocks'"):  # exists, but not in preset
        masks.eligible_leaves(params, include=["LayerNorm"], preset="blocks")
    with pytest.raises(ValueError, match=r"guft\.eligible"):
        no_blocks = {"head": params["head"], "other": {"w": params["cls"]}}
        masks.eligible_leaves(no_blocks, preset="blocks")


def test_row_view_matches_the_models_kernel_view(trees):
    params = trees["ViT-tiny/4"]
    for key, shape in masks.eligible_leaves(params).items():
        d_in, d_out = masks.row_view(key, shape)
        if key.endswith("kernel"):
            w = jnp.zeros(shape)
            assert vit.kernel_as_matrix(w, masks.key_path(key)).shape == (d_in, d_out)
        else:
            assert (d_in, d_out) == (1, math.prod(shape))


# ---------------------------------------------------------------- reports


def test_budget_breakdown_counts_and_densities(trees):
    params = trees["DINOv2-tiny/4"]
    elig = masks.eligible_leaves(params)
    rng = np.random.default_rng(0)
    scores = {k: rng.random(s).astype(np.float32) for k, s in elig.items()}
    n = sum(math.prod(s) for s in elig.values())
    k = 300
    mask = masks.topk_mask(scores, k, allocation="per_tensor")
    bd = masks.budget_breakdown(mask, elig)
    assert bd["total"] == {"selected": k, "eligible": n, "density": k / n}
    for group in ("per_module_type", "per_layer"):
        rows = bd[group]
        assert sum(r["selected"] for r in rows.values()) == k
        assert sum(r["eligible"] for r in rows.values()) == n
        assert all(r["density"] == r["selected"] / r["eligible"] for r in rows.values())
    assert list(bd["per_layer"]) == ["encoderblock_0", "encoderblock_1", "other"]
    assert "layerscale.scale" in bd["per_module_type"]
    rep = masks.mask_report(mask)
    assert rep["per_layer"] == {g: r["selected"] for g, r in bd["per_layer"].items()}
    assert rep["per_module_type"] == {g: r["selected"] for g, r in bd["per_module_type"].items()}
    # A sub-mask over fewer keys still reports every eligible group (zero selected there).
    part = {k: v for k, v in mask.items() if "encoderblock_0" in k}
    bd0 = masks.budget_breakdown(part, elig)
    assert bd0["per_layer"]["encoderblock_1"]["selected"] == 0
    with pytest.raises(ValueError, match="mask"):
        masks.budget_breakdown({"nope.kernel": np.zeros(3, bool)}, elig)
