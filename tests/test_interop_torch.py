"""guft_jax against real timm, Hugging Face transformers and PEFT (PyTorch, CPU).

The PyTorch side runs in ``.torch-venv`` (``tools/torch_env.sh``: Debian's torch 1.13, timm
1.0.15, PEFT 0.17.1), in one subprocess for the whole module: the two sides exchange arrays
through safetensors / npz files. If that environment cannot be set up the module FAILS (it never
skips): ``make test`` runs the set-up first.

Every exported method: guft_jax -> PEFT (``save_peft`` then ``PeftModel.from_pretrained`` on a
small timm ViT and an HF ViT) and PEFT -> guft_jax (``get_peft_model`` with random adapter
weights, ``save_pretrained``, then ``load_peft``) give the same logits within 1e-4 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guft_jax import vit
from guft_jax.interop import export_hf, export_timm, load_peft, load_timm, peft_io, save_peft
from guft_jax.methods import base as base_lib
from guft_jax.methods import get_method

ROOT = Path(__file__).resolve().parents[1]
TORCH_PY = ROOT / os.environ.get("TORCH_VENV", ".torch-venv") / "bin" / "python"
RTOL = 1e-4
SIZES = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
EPS = {"timm": 1e-6, "hf": 1e-12}
N_CLS = 5
ATT = "MultiHeadDotProductAttention_1"

# guft_jax -> PEFT: method name -> (hyperparameters, targets per base)
OUT = {
    "lora": (dict(rank=2, alpha=3.0), rf"{ATT}/(query|value|out)/kernel$"),
    "dora": (dict(rank=2, alpha=3.0), rf"{ATT}/(query|value)/kernel$|Dense_1/kernel$"),
    "adalora": (dict(init_rank=3, target_rank=2, alpha=5.0), rf"{ATT}/(query|key|value)/kernel$"),
    "vera": (dict(rank=4), {"timm": rf"{ATT}/out/kernel$|Dense_0/kernel$", "hf": None}),
    "fourierft": (dict(n=20, alpha=50.0), {"timm": rf"{ATT}/out/kernel$|Dense_0/kernel$"}),
    "ia3": (dict(), None),  # default targets: key, value (output) and fc2 (input)
    "ln_tuning": (dict(), None),
    "loha": (dict(rank=2, alpha=3.0), rf"{ATT}/(query|value)/kernel$|Dense_1/kernel$"),
    "lokr": (dict(rank=2, alpha=3.0), r"Dense_[01]/kernel$"),  # no fused qkv form
    "oft": (dict(oft_block_size=8), rf"{ATT}/out/kernel$|Dense_0/kernel$"),
    "boft": (dict(boft_block_size=4), rf"{ATT}/out/kernel$|Dense_0/kernel$"),
    "hra": (dict(r=2), rf"{ATT}/out/kernel$|Dense_0/kernel$"),
}
# PEFT -> guft_jax: (config class, kwargs, target_modules per base)
IN = {
    "LORA": ("LoraConfig", dict(r=2, lora_alpha=3), (["attn.qkv", "mlp.fc1"], ["query", "value"])),
    "DORA": (
        "LoraConfig",
        dict(r=2, lora_alpha=3, use_dora=True),
        (["attn.qkv", "attn.proj"], ["key", "dense"]),
    ),
    "ADALORA": (
        "AdaLoraConfig",
        dict(init_r=3, target_r=2, lora_alpha=5, total_step=10),
        (["attn.qkv", "mlp.fc2"], ["query", "value"]),
    ),
    "VERA": ("VeraConfig", dict(r=4), (["attn.proj", "mlp.fc1"], ["query", "value"])),
    "FOURIERFT": (
        "FourierFTConfig",
        dict(n_frequency=20, scaling=50.0),
        (["attn.proj", "mlp.fc1"], ["query", "value"]),
    ),
    "SHIRA": ("ShiraConfig", dict(r=1), (["attn.qkv", "mlp.fc2"], ["query", "output.dense"])),
    "IA3": ("IA3Config", dict(), (["attn.qkv", "fc2"], ["key", "output.dense"])),  # last: ff
    "LOHA": ("LoHaConfig", dict(r=2, alpha=3), (["attn.qkv", "fc1"], ["query", "value"])),
    "LOKR": ("LoKrConfig", dict(r=2, alpha=3), (["fc1", "fc2"], ["query", "value"])),
    "OFT": ("OFTConfig", dict(r=0, oft_block_size=8), (["attn.qkv", "fc1"], ["query", "value"])),
    "BOFT": ("BOFTConfig", dict(boft_block_size=4), (["attn.qkv", "fc1"], ["query", "value"])),
    "HRA": ("HRAConfig", dict(r=2), (["attn.qkv", "fc1"], ["query", "value"])),
    "LN_TUNING": ("LNTuningConfig", dict(), (["norm1", "norm2"], ["layernorm_after"])),
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def torch_env() -> None:
    """Sets up (or finds cached) the PyTorch side; fails the test loudly if it cannot."""
    r = subprocess.run(
        ["bash", str(ROOT / "tools" / "torch_env.sh")], cwd=ROOT, capture_output=True, text=True
    )
    if r.returncode or not TORCH_PY.exists():
        pytest.fail(f"the PyTorch side could not be set up:\n{r.stdout[-2000:]}{r.stderr[-4000:]}")


def run_torch(jobs: list[dict], images: np.ndarray, tmp: Path) -> dict[str, np.ndarray]:
    np.save(tmp / "images.npy", images)
    spec = dict(images=str(tmp / "images.npy"), results=str(tmp / "results.npz"), jobs=jobs)
    (tmp / "jobs.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    script = ROOT / "guft_jax" / "interop" / "torch_side.py"
    r = subprocess.run(
        [str(TORCH_PY), str(script), str(tmp / "jobs.json")],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    if r.returncode:
        pytest.fail(f"the PyTorch side failed:\n{r.stderr[-6000:]}")
    with np.load(tmp / "results.npz") as f:
        return {k: f[k] for k in f.files}


def tiny_model(base: str) -> vit.VisionTransformer:
    return vit.VisionTransformer(
        num_classes=N_CLS, gelu_approximate=False, layer_norm_eps=EPS[base], **SIZES
    )


def noisy(tree, seed: int, scale: float = 0.1):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        x + scale * jax.random.normal(k, x.shape, jnp.float32)
        if jnp.issubdtype(x.dtype, jnp.floating)
        else x
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def torch_cfg(base: str) -> dict:
    return dict(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_dim=64,
        num_classes=N_CLS,
        eps=EPS[base],
    )


def guft_method_and_state(params):
    """Real GUFT (dense reference path) with a random 5% selection over the blocks."""
    method = get_method("guft", sparse=False, recompute_epochs=[1], ratios=[0.05])
    tr = method.init(jax.random.key(0), params)
    st = base_lib.init_state(method, params, tr)
    rng = np.random.default_rng(0)
    sel = {k: jnp.asarray(rng.random(m.shape) < 0.05) for k, m in st.selected.items()}
    st = st._replace(selected=sel)
    tr = {"head": tr["head"], "delta": noisy(tr["delta"], 3)}
    return method, tr, st


def shira_method_and_state(params, r=2):
    """guft_jax's SHiRA (dense path) with a random selection of exactly PEFT's r·(d_in + d_out)
    entries per target (the selection a run's first epoch would make)."""
    method = get_method("shira", sparse=False, r=r)
    tr = method.init(jax.random.key(0), params)
    st = base_lib.init_state(method, params, tr)
    rng = np.random.default_rng(1)
    sel = {}
    for k, m in st.selected.items():
        flat = np.zeros(m.size, bool)
        d_in, d_out = m.shape[0], m.size // m.shape[0]
        flat[rng.choice(m.size, r * (d_in + d_out), replace=False)] = True
        sel[k] = jnp.asarray(flat.reshape(m.shape))
    st = st._replace(selected=sel)
    return method, {"head": tr["head"], "delta": noisy(tr["delta"], 6)}, st


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything both sides compute, with one PyTorch subprocess for the whole module."""
    torch_env()
    tmp = tmp_path_factory.mktemp("interop")
    images = np.asarray(jax.random.normal(jax.random.key(7), (3, 16, 16, 3)), np.float32)
    jobs, ours = [], {}
    bases = {}
    for base in ("timm", "hf"):
        model = tiny_model(base)
        params = noisy(vit.init_params(model, jax.random.key(1), 16), 2, 0.2)
        weights = tmp / f"{base}_base.safetensors"
        (export_timm if base == "timm" else export_hf)(params, model, str(weights))
        bases[base] = (model, params)
        common = dict(base=base, model=torch_cfg(base), weights=str(weights))
        jobs.append(dict(kind="logits", out=f"{base}/base", **common))
        ours[f"{base}/base"] = model.apply({"params": params}, images)
        for name, (hp, targets) in OUT.items():
            t = targets.get(base) if isinstance(targets, dict) else targets
            if t is None:  # the method's default targets
                method = get_method(name, **hp)
            else:
                method = get_method(name, targets=(t,), **hp)
            tr = noisy(method.init(jax.random.key(4), params), 5)
            d = tmp / f"{base}_{name}"
            save_peft(str(d), method, tr, params=params, base=base)
            ours[f"{base}/{name}"] = base_lib.forward(model, method, params, tr, (), images)
            ours[f"{base}/{name}/reload"] = _reload(d, params, base, model, images)
            jobs.append(dict(kind="logits", out=f"{base}/{name}", adapter=str(d), **common))
        for name, make in (("guft", guft_method_and_state), ("shira", shira_method_and_state)):
            method, tr, st = make(params)
            d = tmp / f"{base}_{name}"
            save_peft(str(d), method, tr, params=params, state=st, base=base)
            ours[f"{base}/{name}"] = base_lib.forward(model, method, params, tr, st, images)
            ours[f"{base}/{name}/reload"] = _reload(d, params, base, model, images)
            upd = d / peft_io.BASE_UPDATES
            job = dict(kind="logits", out=f"{base}/{name}", adapter=str(d), **common)
            jobs.append({**job, "updates": str(upd) if upd.exists() else None})
        for ptype, (cls, kw, mods) in IN.items():
            d = tmp / f"{base}_peft_{ptype}"
            head = "head" if base == "timm" else "classifier"
            config = dict(kw, target_modules=mods[base == "hf"], modules_to_save=[head])
            if ptype == "IA3":
                config["feedforward_modules"] = mods[base == "hf"][-1:]
            jobs.append(
                dict(kind="make_adapter", out=f"{base}/in/{ptype}", dir=str(d), config_class=cls)
                | dict(config=config, seed=len(jobs), **common)
            )
    for n, seed in ((1024, 2024), (2048, 777), (37, 5)):
        jobs.append(dict(kind="randperm", n=n, seed=seed, out=f"randperm/{n}/{seed}"))
    big = dict(img_size=32, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072)
    big_w, big_x = tmp / "vit_b16.safetensors", tmp / "images_32.npy"
    np.save(big_x, np.asarray(jax.random.normal(jax.random.key(8), (2, 32, 32, 3)), np.float32))
    big_job = dict(kind="timm_init", out="vit_b16", seed=0, weights=str(big_w), images=str(big_x))
    jobs.append(dict(big_job, model=dict(big, num_classes=10)))
    theirs = run_torch(jobs, images, tmp)
    return dict(ours=ours, theirs=theirs, tmp=tmp, bases=bases, images=images, big=(big_w, big_x))


def _reload(d, params, base, model, images):
    loaded = load_peft(str(d), params, base=base)
    st = ()
    return base_lib.forward(model, loaded.method, loaded.params, loaded.trainable, st, images)


@pytest.mark.parametrize("base", ["timm", "hf"])
def test_base_weights_match(world, base):
    assert rel_err(world["ours"][f"{base}/base"], world["theirs"][f"{base}/base"]) < RTOL


@pytest.mark.parametrize("name", [*OUT, "guft", "shira"])
@pytest.mark.parametrize("base", ["timm", "hf"])
def test_guft_jax_to_peft_logits(world, base, name):
    ours, theirs = world["ours"][f"{base}/{name}"], world["theirs"][f"{base}/{name}"]
    base_logits = world["theirs"][f"{base}/base"]
    assert rel_err(ours, base_logits) > 1e-2  # the adapter changes the logits
    print(f"guft_jax->PEFT {base}/{name}: rel err {rel_err(ours, theirs):.1e}")
    assert rel_err(ours, theirs) < RTOL
    # and back: load_peft of the exported adapter gives the same logits in guft_jax
    assert rel_err(world["ours"][f"{base}/{name}/reload"], ours) < RTOL


@pytest.mark.parametrize("ptype", list(IN))
@pytest.mark.parametrize("base", ["timm", "hf"])
def test_peft_to_guft_jax_logits(world, base, ptype):
    model, params = world["bases"][base]
    d = world["tmp"] / f"{base}_peft_{ptype}"
    loaded = load_peft(str(d), params, base=base)
    ours = base_lib.forward(
        model, loaded.method, loaded.params, loaded.trainable, (), world["images"]
    )
    theirs = world["theirs"][f"{base}/in/{ptype}"]
    assert rel_err(theirs, world["theirs"][f"{base}/base"]) > 1e-2
    print(f"PEFT->guft_jax {base}/{ptype}: rel err {rel_err(ours, theirs):.1e}")
    assert rel_err(ours, theirs) < RTOL
    # and out again: save_peft of what was loaded reproduces the same files' logits in guft_jax
    d2 = world["tmp"] / f"{base}_peft_{ptype}_again"
    save_peft(str(d2), loaded.method, loaded.trainable, params=loaded.params, base=base)
    again = load_peft(str(d2), loaded.params, base=base)
    out2 = base_lib.forward(model, again.method, again.params, again.trainable, (), world["images"])
    assert rel_err(out2, theirs) < RTOL


def test_torch_randperm_replica(world):
    for key, perm in world["theirs"].items():
        if key.startswith("randperm/"):
            _, n, seed = key.split("/")
            np.testing.assert_array_equal(peft_io.torch_randperm(int(n), int(seed)), perm)


def test_vit_b16_shaped_timm_checkpoint(world):
    """timm's own random init at ViT-B/16 shapes: load_timm's logits equal timm's; swapping q
    and k in the fused qkv (a negative control) breaks the match."""
    from safetensors.numpy import load_file

    state = load_file(str(world["big"][0]))
    images = np.load(world["big"][1])
    theirs = world["theirs"]["vit_b16"]
    model, params = load_timm(state)
    assert (model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim) == (
        768,
        12,
        12,
        3072,
    )
    ours = model.apply({"params": params}, images)
    print(f"ViT-B/16-shaped timm weights: rel err {rel_err(ours, theirs):.1e}")
    assert rel_err(ours, theirs) < RTOL
    swapped = dict(state)
    for i in range(12):
        w = state[f"blocks.{i}.attn.qkv.weight"]
        swapped[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([w[768:1536], w[:768], w[1536:]])
    _, bad = load_timm(swapped)
    err = rel_err(model.apply({"params": bad}, images), theirs)
    print(f"ViT-B/16-shaped, q and k swapped (negative control): rel err {err:.1e}")
    assert err > RTOL


def test_negative_control_adapter_qk_swapped(world):
    """PEFT's fused LoRA with its q and k row blocks swapped no longer matches PEFT's logits."""
    from safetensors.numpy import load_file, save_file

    model, params = world["bases"]["timm"]
    d = world["tmp"] / "timm_peft_LORA"
    bad = world["tmp"] / "timm_peft_LORA_swapped"
    bad.mkdir()
    (bad / peft_io.CONFIG).write_text((d / peft_io.CONFIG).read_text())
    t = load_file(str(d / peft_io.WEIGHTS))
    for k, v in t.items():
        if k.endswith("attn.qkv.lora_B.weight"):
            t[k] = np.concatenate([v[32:64], v[:32], v[64:]])
    save_file(t, str(bad / peft_io.WEIGHTS))
    loaded = load_peft(str(bad), params, base="timm")
    ours = base_lib.forward(model, loaded.method, params, loaded.trainable, (), world["images"])
    err = rel_err(ours, world["theirs"]["timm/in/LORA"])
    print(f"PEFT->guft_jax timm/LORA, q and k swapped (negative control): rel err {err:.1e}")
    assert err > RTOL
