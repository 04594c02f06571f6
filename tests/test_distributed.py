"""Two real processes on localhost (``jax.distributed`` with a local coordinator, 4 fake CPU
devices each, gloo collectives) train LoRA and GUFT like one process with 8 devices; each
process loads only its rows; a checkpoint saved by the 2 processes restores bitwise in one
process on a (4, 2) and an (8, 1) mesh."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

WORKER = textwrap.dedent(
    """
    import json, os, sys
    tests_dir, pid, nproc, port, out_dir = sys.argv[1:6]
    pid, nproc = int(pid), int(nproc)
    import jax, numpy as np
    from guft_jax import distributed
    if nproc > 1:
        distributed.initialize(f"localhost:{port}", nproc, pid)
    sys.path.insert(0, tests_dir)
    from conftest import make_source
    from guft_jax import checkpoint, guft, sharding, train, vit
    from guft_jax.config import TrainConfig
    from guft_jax.data import ArraySource
    from guft_jax.methods import get_method

    LOADED = []

    class Recorded:  # the images of a split; records the indices read
        def __init__(self, a, split):
            self.a, self.split, self.shape = a, split, a.shape
        def __len__(self):
            return len(self.a)
        def __getitem__(self, i):
            LOADED.append([self.split, np.asarray(i).tolist()])
            return self.a[i]

    class RecordedSource(ArraySource):
        def raw(self, split):
            x, y = super().raw(split)
            return Recorded(x, split), y

    def method(name):
        if name == "lora":
            return get_method("lora", rank=2, alpha=3.0)
        return guft.guft(recompute_epochs=[1, 2], ratios=[0.02, 0.02])

    model = vit.build_model("ViT-tiny/4", num_classes=3)
    params = vit.init_params(model, jax.random.key(0), 16)
    rules = sharding.fsdp_rules(0)
    out = {"process_count": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count()}
    for name in ("lora", "guft"):
        src = make_source()
        object.__setattr__(src, "__class__", RecordedSource)  # a frozen dataclass
        LOADED.clear()
        wd = os.path.join(out_dir, f"{name}{nproc}")
        cfg = TrainConfig(image_size=16, batch_size=16, epochs=2, lr=1e-2, progress=False,
                          warmup_epochs=0, param_rules=tuple(rules),
                          train_split="train800val200")
        r = train.fit(model, params, method(name), src, cfg, workdir=wd,
                      mesh=sharding.make_mesh(fsdp=4), hooks=lambda s: None)
        state = distributed.gather_processes(r["state"])
        out[name] = dict(
            loss=[h["train_loss"] for h in r["history"]],
            acc=r["test_accuracy"], examples=r["test_examples"],
            loaded=list(LOADED),
            specs=sorted({str(a.sharding.spec) for a in jax.tree.leaves(r["state"])}),
            leaves=[np.asarray(a).ravel().tolist() for a in jax.tree.leaves(state)])
        if nproc == 1 and len(sys.argv) > 6:  # restore the 2-process checkpoint here
            saved = os.path.join(sys.argv[6], f"{name}2", "checkpoints")
            m = method(name)
            p2 = train.mbase.prepare_base(m, params)
            _, fresh = train.optimizer_for(m, p2, steps_per_epoch=3, epochs=2, lr=1e-2)
            for shape in ((4, 2), (8, 1)):
                mesh = sharding.make_mesh(fsdp=shape[1])
                def target(structure, mesh=mesh):
                    st = fresh
                    if m.hooks.resize is not None:
                        tr, opt, ms = m.hooks.resize(st.trainable, st.opt_state,
                                                     st.method_state, structure)
                        st = st._replace(trainable=tr, opt_state=opt, method_state=ms)
                    return jax.device_put(st, sharding.tree_shardings(st, mesh, rules))
                mgr = checkpoint.manager(saved)
                got, meta, step = checkpoint.restore_intact(mgr, target, method=m.name)
                mgr.close()
                out[name][f"restored{shape}"] = dict(
                    step=step, mesh=dict(got.step.sharding.mesh.shape),
                    specs=sorted({str(a.sharding.spec) for a in jax.tree.leaves(got)}),
                    leaves=[[str(a.dtype), np.asarray(a).ravel().tolist()]
                            for a in jax.tree.leaves(got)])
    with open(os.path.join(out_dir, f"out{nproc}_{pid}.json"), "w") as f:
        json.dump(out, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    script = d / "worker.py"
    script.write_text(WORKER)
    tests_dir = os.path.dirname(__file__)
    two, one = d / "two", d / "one"
    two.mkdir()
    one.mkdir()
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), tests_dir, str(i), "2", port, str(two)],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    ref = subprocess.run(
        [sys.executable, str(script), tests_dir, "0", "1", "0", str(one), str(two)],
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    return read(two / "out2_0.json"), read(two / "out2_1.json"), read(one / "out1_0.json")


@pytest.mark.parametrize("name", ["lora", "guft"])
def test_two_processes_train_like_one_process_with_8_devices(runs, name):
    p0, p1, one = runs
    assert (p0["process_count"], p0["devices"], p0["local_devices"]) == (2, 8, 4)
    assert (one["process_count"], one["devices"]) == (1, 8)
    assert any("fsdp" in s for s in p0[name]["specs"])  # the state is sharded over fsdp
    for p in (p0, p1):  # the same global values on both processes
        np.testing.assert_allclose(p[name]["loss"], one[name]["loss"], rtol=1e-5, atol=1e-6)
        for a, b in zip(one[name]["leaves"], p[name]["leaves"], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        # evaluation: exact counts over both processes' rows
        assert p[name]["examples"] == one[name]["examples"] == 32
        assert p[name]["acc"] == one[name]["acc"]


@pytest.mark.parametrize("name", ["lora", "guft"])
def test_each_process_loads_only_its_rows(runs, name):
    p0, p1, one = runs
    full, halves = one[name]["loaded"], (p0[name]["loaded"], p1[name]["loaded"])
    assert len(halves[0]) == len(halves[1]) == len(full)  # one read per batch and process
    for i, (split, rows) in enumerate(full):
        a, b = halves[0][i], halves[1][i]
        assert a[0] == b[0] == split
        assert len(rows) == 16 and len(a[1]) == len(b[1]) == 8  # its half of the batch
        assert a[1] + b[1] == rows  # process 0 the first half, process 1 the second
        assert not set(a[1]) & set(b[1])
    splits = {s for s, _ in full}
    assert splits == {"train800val200", "test"}


@pytest.mark.parametrize("name", ["lora", "guft"])
def test_checkpoint_from_2_processes_restores_bitwise_on_1_process_4x2_and_8x1(runs, name):
    p0, _, one = runs
    saved = p0[name]["leaves"]
    for shape in ("(4, 2)", "(8, 1)"):
        got = one[name][f"restored{shape}"]
        assert got["step"] == 2  # the last epoch's checkpoint
        assert got["mesh"] == dict(zip(("data", "fsdp"), eval(shape), strict=True))
        if shape == "(4, 2)":
            assert any("fsdp" in s for s in got["specs"])
        assert len(got["leaves"]) == len(saved)
        for (dtype, a), b in zip(got["leaves"], saved, strict=True):
            x, y = np.asarray(a, dtype), np.asarray(b, dtype)
            assert x.tobytes() == y.tobytes()
