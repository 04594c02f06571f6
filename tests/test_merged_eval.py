"""Evaluation through a method's merge (``step.MergedEval``) gives the interceptor path's
numbers: every method with an interceptor and a merge, trained 2 epochs on the tiny ViT."""

import method_checks as mc
import numpy as np
import pytest

from guft_jax import epochs, step, train
from guft_jax.methods import get_method, method_names, spec


def _built(name: str):
    return get_method(name, **(spec(name).defaults.dry_kwargs or {}))


MERGED = [n for n in method_names() if isinstance(step.make_eval_step(None, _built(n)),
                                                  step.MergedEval)]  # fmt: skip


def test_merged_eval_is_exactly_the_methods_with_an_interceptor_and_a_merge():
    for name in method_names():
        m = _built(name)
        want = m.hooks.intercept is not None and m.merge is not None
        assert (name in MERGED) == want, name
    assert {"guft", "fisher", "qlora", "ssf"} <= set(MERGED)


@pytest.mark.parametrize("name", MERGED)
def test_evaluation_through_the_merge_equals_the_interceptor_path(name, tiny, source):
    model, params = tiny
    m = _built(name)
    config = mc.tiny_config(epochs=2)
    r = train.fit(model, params, m, source, config, hooks=mc.print_nothing)
    ev = step.make_eval_step(model, m)
    kw = dict(batch_size=config.batch_size, image_size=config.image_size,
              normalization=config.normalization)  # fmt: skip
    merged = epochs.evaluate(ev, params, r.state, source, "test", **kw)
    intercepted = epochs.evaluate(ev.step, params, r.state, source, "test", **kw)
    assert merged["num_examples"] == intercepted["num_examples"] == 32
    assert merged["accuracy"] == intercepted["accuracy"]
    np.testing.assert_allclose(merged["loss"], intercepted["loss"], rtol=1e-5)
    # what fit reported is the merged path's
    assert r.results["test_accuracy"] == merged["accuracy"]
