"""Every registered method in a user's own loop (``guft_jax.peft.adapt``), on a Flax linen CNN
with BatchNorm and a Flax NNX MLP with LayerNorm: a donating jitted step trains it (the loss
falls), entries the method does not train stay bitwise, and an orbax checkpoint taken mid-run
resumes to the uninterrupted run's exact bits. Methods that cannot run on these models are
listed with the reason, and the list is the one the docs show."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from guft_jax import methods, paths, peft

LAYOUT = [(r"Conv_\d+/kernel$", 3)]  # (kh, kw, cin, cout): the leading three are the input
EPOCHS, STEPS, BATCH = 3, 3, 16


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return nn.Dense(3, name="classifier")(x)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(32, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)

    def __call__(self, x):
        return self.norm(nnx.relu(self.fc(x)))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc_in = nnx.Linear(10, 32, rngs=rngs)
        self.block0 = Block(rngs)
        self.block1 = Block(rngs)
        self.head = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.block1(self.block0(nnx.relu(self.fc_in(x)))))


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, EPOCHS * STEPS * BATCH)
    x = rng.normal(size=(len(y), *shape)).astype(np.float32) * 0.5
    x += (y - 1).reshape(-1, *[1] * len(shape))
    return x, y.astype(np.int32)


class Model:
    """A model as an own loop sees it: params, extra model state (BatchNorm statistics) and a
    forward ``(params, extra, x, train) -> (logits, extra)``."""

    def __init__(self, name):
        self.name = name
        if name == "linen_cnn":
            self.x, self.y = _data((8, 8, 1))
            net = CNN()
            v = net.init(jax.random.key(0), jnp.asarray(self.x[:2]))
            self.params, self.extra = v["params"], v["batch_stats"]

            def forward(p, bs, x, train):
                if not train:
                    return net.apply({"params": p, "batch_stats": bs}, x, train=False), bs
                out, upd = net.apply(
                    {"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"]
                )
                return out, upd["batch_stats"]

            self.head, self.targets = r"^classifier/", r"(Conv_\d+|Dense_0)/kernel$"
            self.norms = r"BatchNorm_0/(scale|bias)$"
        else:
            self.x, self.y = _data((10,))
            graphdef, self.params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
            self.extra = {}

            def forward(p, bs, x, train):
                return nnx.merge(graphdef, p)(x), bs

            self.head, self.targets = r"^head/", r"(fc_in|block\d/fc)/kernel$"
            self.norms = r"block\d/norm/(scale|bias)$"
        self.forward = forward

    def batches(self, epoch):
        for i in range(STEPS):
            j = ((epoch - 1) * STEPS + i) * BATCH
            yield jnp.asarray(self.x[j : j + BATCH]), jnp.asarray(self.y[j : j + BATCH])


# The methods these two models cannot run, with the reason: guft_jax.peft.VIT_ONLY (the docs'
# own-loop table shows the same list; test_the_unsupported_list_is_the_documented_one).
UNSUPPORTED = dict(peft.VIT_ONLY)

SELECTIVE = ("guft", "magnitude", "snip", "salun", "fisher", "diff_pruning")


def _kwargs(name: str, m: Model) -> dict:
    """Hyperparameters sized for these tiny models (dimensions 9..128)."""
    t = m.targets
    dense = r"(Dense_0|block\d/fc)/kernel$"
    table = {
        "full": {},
        "linear": {},
        "bitfit": {},
        "lora": dict(targets=t, rank=2, alpha=4.0),
        "dora": dict(targets=t, rank=2, alpha=4.0),
        "vera": dict(targets=t, rank=16),
        "fourierft": dict(targets=t, n=8, alpha=1.0),
        "adalora": dict(targets=t, init_rank=4, target_rank=2, delta_t=1, t_init=1, t_final=2),
        "aflora": dict(targets=t, rank=2, window=1, t_init=0.0),
        "dylora": dict(targets=t, rank=4, alpha=8.0),
        "qlora": dict(targets=dense, quantize=dense, rank=2, block_size=32),
        "hra": dict(targets=dense, r=2),
        "ia3": dict(targets=t, feedforward=dense),
        "ln_tuning": dict(targets=m.norms),
        "loha": dict(targets=t, rank=2),
        "lokr": dict(targets=dense, rank=2),
        "oft": dict(targets=dense, oft_block_size=8),
        "boft": dict(targets=dense, boft_block_size=4, boft_n_butterfly_factor=2),
        "shira": dict(targets=t, r=2),
        "gps": dict(targets=t, k=1),
        "ssf": dict(targets=(t, m.norms.replace("(scale|bias)", "scale"))),
        "guft": dict(eligible="all", recompute_epochs=(1, 2, 3), ratios=(0.02,) * 3),
        "diff_pruning": dict(eligible="all", ratio=0.05),
    }
    kw = table.get(name)
    if kw is None and name in ("magnitude", "snip", "salun", "fisher"):
        kw = dict(eligible="all", ratio=0.05, epoch=1)
    if kw is None:
        raise AssertionError(f"{name}: give its hyperparameters for the tiny models")
    return kw


def _lr(name):
    return {"full": 3e-3, "fourierft": 3e-2, "vera": 3e-2}.get(name, 1e-2)


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint32) if x.dtype == np.float32 else x


def _make_step(m: Model, ad):
    """The user's jitted step (donating the trainable tree, optimizer and method states and
    the BatchNorm statistics) and its optimizer."""
    total = EPOCHS * STEPS
    tx = optax.adamw(_lr(ad.name), weight_decay=0.01)
    params = m.params

    def step_fn(tr, opt, state, extra, step, rng, x, y):
        rng, key = jax.random.split(jax.random.wrap_key_data(rng))

        def loss(t):
            p = ad.apply(params, t, state, key)
            logits, new_extra = m.forward(p, extra, x, True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + ad.loss(params, t, state, key), (ce, new_extra)

        g, (ce, extra) = jax.grad(loss, has_aux=True)(tr)
        tr, opt, state = ad.update(tx, g, opt, tr, state, params, step=step, total_steps=total)
        return tr, opt, state, extra, step + 1, jax.random.key_data(rng), ce

    return jax.jit(step_fn, donate_argnums=(0, 1, 2, 3)), tx


KEYS = ("trainable", "opt", "state", "extra", "step", "rng")


def _train(m: Model, ad, step, tx, carry=None, start=1, save=None):
    """Epochs ``start..EPOCHS`` of a plain user loop; ``carry`` resumes one. ``save(epoch,
    carry)`` is called after each epoch. Returns ``(carry, mean loss per epoch)``."""
    if carry is None:
        tr = ad.init(jax.random.key(1), m.params)
        carry = dict(
            trainable=tr,
            opt=tx.init(tr),
            state=ad.init_state(m.params, tr),
            extra=jax.tree.map(jnp.copy, m.extra),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(jax.random.key(2)),
        )

    def per_example(p, x, y):  # saliency passes: BatchNorm with its current statistics
        logits, _ = m.forward(p, carry["extra"], x, False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    means = []
    for e in range(start, EPOCHS + 1):
        tr, opt, st = ad.epoch_start(
            e,
            m.params,
            carry["trainable"],
            carry["opt"],
            carry["state"],
            loss_fn=per_example,
            batches=lambda e=e: m.batches(e),
            epochs=EPOCHS,
            log=lambda s: None,
        )
        carry = dict(carry, trainable=tr, opt=opt, state=st)
        losses = []
        for x, y in m.batches(e):
            *out, ce = step(*(carry[k] for k in KEYS), x, y)
            carry = dict(zip(KEYS, out, strict=True))
            losses.append(float(ce))
        means.append(float(np.mean(losses)))
        if save is not None:
            save(e, carry)
    return carry, means


def _touched(name: str, m: Model, kw: dict, path: str) -> bool:
    """Whether the method may change the whole leaf at ``path`` of the effective params
    (selective methods are checked entry by entry instead)."""
    if re.search(m.head, path) or name == "full":
        return True
    pats = {"bitfit": [r"bias$"], "linear": []}.get(name)
    if pats is None:
        t = kw.get("targets", ())
        pats = [t] if isinstance(t, str) else list(t)
    if name == "ssf":  # a scaled layer's bias takes the shift
        pats = pats + [p.replace("kernel", "bias").replace("scale", "bias") for p in pats]
    return any(re.search(p, path) for p in pats)


MODELS = ("linen_cnn", "nnx_mlp")
BOTH = ("lora", "guft", "dora", "fourierft")  # on both trees; every other method on one
NAMES = [name for name in methods.method_names() if name not in UNSUPPORTED]
# Each method on one of the two trees, alternating in registry order (so both trees see every
# family: the registry lists each family's methods together), the BOTH methods on the other too.
CASES = [(MODELS[i % 2], name) for i, name in enumerate(NAMES)] + [
    (MODELS[(i + 1) % 2], name) for i, name in enumerate(NAMES) if name in BOTH
]


@pytest.mark.parametrize("model,name", CASES)
def test_every_method_in_a_donating_user_loop_with_an_orbax_resume(model, name, tmp_path):
    m = Model(model)
    kw = _kwargs(name, m)
    ad = peft.adapt(name, head=m.head, layout=LAYOUT, **kw)
    before = jax.tree.map(np.array, m.params)
    ckpt = ocp.StandardCheckpointer()
    saved = {}

    def save(epoch, carry):
        if epoch == 1:
            ckpt.save(tmp_path / "ckpt", carry)
            ckpt.wait_until_finished()
            saved["abstract"] = jax.tree.map(ocp.utils.to_shape_dtype_struct, carry)

    step, tx = _make_step(m, ad)
    whole, means = _train(m, ad, step, tx, save=save)
    assert means[-1] < means[0], (name, means)

    # resumed from the epoch-1 checkpoint: the same bits as the uninterrupted run
    restored = ckpt.restore(tmp_path / "ckpt", saved["abstract"])
    resumed, _ = _train(m, ad, step, tx, carry=restored, start=2)
    for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(whole)[0], jax.tree.leaves(resumed), strict=True
    ):
        assert np.array_equal(_bits(a), _bits(b)), (name, paths.key_to_str(p))

    # the user's params are untouched (donation never reached them)
    for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(before), strict=True):
        assert np.array_equal(_bits(a), _bits(b))

    # entries the method does not train are bitwise the pretrained ones
    eff = ad.merge(m.params, whole["trainable"], whole["state"])
    assert type(eff) is type(m.params)
    changed = 0
    for p, a, b in zip(
        paths.leaf_paths(m.params), jax.tree.leaves(eff), jax.tree.leaves(before), strict=True
    ):
        diff = _bits(a) != _bits(b)
        if name in SELECTIVE and not re.search(m.head, p):
            changed += int(diff.sum())
        elif not _touched(name, m, kw, p):
            assert not diff.any(), (name, p)
    if name in SELECTIVE:  # only selected entries moved
        assert 0 < changed <= ad.trained(m.params, whole["trainable"], whole["state"])


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_vit_only_methods_are_refused_on_other_models_in_one_line(name):
    m = Model("linen_cnn")
    ad = peft.adapt(name, head=m.head)
    with pytest.raises(ValueError, match=f"peft.{name}: runs on guft_jax's ViT only"):
        ad.init(jax.random.key(0), m.params)


def test_the_unsupported_list_is_the_documented_one():
    doc = pathlib.Path(__file__).parents[1] / "docs" / "own_loop.md"
    text = doc.read_text()
    block = text.split("<!-- vit-only:begin -->")[1].split("<!-- vit-only:end -->")[0]
    listed = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|$", block, flags=re.M))
    assert listed == UNSUPPORTED
    # every registered method is either refused or trained (on at least one tree)
    assert {n for _, n in CASES} | set(UNSUPPORTED) == set(methods.method_names())
    assert not {n for _, n in CASES} & set(UNSUPPORTED)


def test_a_prepared_base_is_prepared_once_and_trains_the_same_bits():
    """QLoRA's NF4 quantisation of the base: with ``ad.prepare(params)`` passed to the jitted
    step it is done once, outside the step (the step's program is smaller), and the result is
    bitwise the same as passing the params themselves."""
    m = Model("nnx_mlp")
    kw = _kwargs("qlora", m)
    ad = peft.adapt("qlora", head=m.head, **kw)
    prepared = ad.prepare(m.params)
    tx = optax.adam(1e-2)
    x, y = next(m.batches(1))

    def step(tr, opt, base):
        def loss(t):
            logits, _ = m.forward(ad.apply(base, t), m.extra, x, True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        g = jax.grad(loss)(tr)
        tr, opt, _ = ad.update(tx, g, opt, tr, (), base, step=jnp.zeros((), jnp.int32))
        return tr, opt

    tr = ad.init(jax.random.key(1), prepared)
    runs = []
    for base in (m.params, prepared):
        t, o = tr, tx.init(tr)
        for _ in range(3):
            t, o = jax.jit(step)(t, o, base)
        runs.append(t)
    for a, b in zip(*map(jax.tree.leaves, runs), strict=True):
        assert np.array_equal(_bits(a), _bits(b))
    size = lambda base: len(jax.make_jaxpr(step)(tr, tx.init(tr), base).jaxpr.eqns)  # noqa: E731
    assert size(prepared) < size(m.params)
    assert type(ad.merge(prepared, runs[1])) is type(m.params)
