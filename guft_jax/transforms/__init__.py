"""GUFT and element-level masks as optax gradient transformations, for any model and loop.

Three pieces, each an ``optax.GradientTransformationExtraArgs`` built by a factory (optax's own
conventions: ``init(params) -> state``, ``update(updates, state, params=None, **extra_args)``,
a small NamedTuple state), so they chain with anything optax offers:

- :func:`masked`: an element-level mask around an inner optimizer (True = trainable). Unlike
  ``optax.masked``, which passes the raw gradient of its masked-out leaves through as their
  update, :func:`masked` freezes every entry outside its mask (its update there is ``-0.0``).
  Gradients outside the mask are zeroed before ``inner`` (its moments stay exactly zero there,
  and an entry unfrozen later starts from zero moments); ``optax.apply_updates`` then leaves
  frozen entries bitwise unchanged, decoupled weight decay included. The masking is
  :func:`guft_jax.optim.masked_update`, the engine's. The mask is fixed at construction, a
  function of the params, or the ``mask=`` extra argument of ``update`` (a traced value: a
  changing mask never retraces). ``sparse=True`` keeps ``inner``'s state only for the selected
  entries.
- :func:`gradual_unfreeze`: GUFT (docs: GUFT guide) as a transform. Its state holds
  the OR-merged mask (``sparse=True``: the selected entries' indices and ``inner``'s state for
  them only) and the round counter; at the scheduled steps it reads the ``saliency=`` extra
  argument (a score pytree, e.g. from :func:`guft_jax.saliency.compute`) and adds its exact
  top-``k`` (:func:`guft_jax.guft.select`, the selection rule of :func:`guft_jax.guft.guft`;
  the schedule's budgets and the sparse store are GUFT's too, :mod:`guft_jax.guft`).
  The round runs inside the jitted step (``lax.cond`` / ``lax.switch``): one trace for a whole
  run. :func:`round_due` / :func:`updates_until_round` tell the loop when to compute saliency.
- :func:`oneshot_mask` / :func:`magnitude_mask`: the one-shot masks (SNIP, SalUN, Fisher,
  magnitude; docs: sparse methods) as ``scores -> mask`` functions whose mask feeds :func:`masked`.

Parameters are named by ``/``-joined key paths (``Conv_0/kernel``); a Flax NNX ``State``'s
trailing ``value`` attribute is dropped, so NNX and linen params are selected by the same regexes.
The task head (``head=``) trains in full; the default names the ``head`` subtree where there is
one and nothing otherwise.

Gradient clipping: put it inside the mask, ``masked(optax.chain(optax.clip_by_global_norm(1.0),
optax.adamw(1e-3)))``, to clip by the norm of the gradients that train (what
:func:`guft_jax.train.fit` does); a clip before :func:`masked` also counts the frozen entries'
gradients in the norm.

Modules: :mod:`~guft_jax.transforms.leaves` (paths, eligibility, the head),
:mod:`~guft_jax.transforms.masking` (:func:`masked`), :mod:`~guft_jax.transforms.unfreeze`
(:func:`gradual_unfreeze`), :mod:`~guft_jax.transforms.scores` (saliency checks),
:mod:`~guft_jax.transforms.loop` (:func:`round_due`, :func:`grow`, :func:`unfrozen`) and
:mod:`~guft_jax.transforms.oneshot` (:func:`oneshot_mask`).
"""

from guft_jax.guft.schedule import (
    schedule_steps,
)
from guft_jax.transforms.leaves import (
    DEFAULT_HEAD,
    Selection,
    eligibility,
    full_mask,
    map_paths,
    match_paths,
    path_str,
    tree_paths,
)
from guft_jax.transforms.loop import (
    find_state,
    grow,
    round_due,
    unfrozen,
    updates_until_round,
)
from guft_jax.transforms.masking import (
    MaskedState,
    SparseMaskedState,
    masked,
)
from guft_jax.transforms.oneshot import (
    magnitude_mask,
    oneshot_mask,
)
from guft_jax.transforms.scores import (
    saliency_error,
)
from guft_jax.transforms.unfreeze import (
    CAPACITIES,
    GradualUnfreezeState,
    SparseUnfreezeState,
    gradual_unfreeze,
)

__all__ = [
    "CAPACITIES",
    "DEFAULT_HEAD",
    "GradualUnfreezeState",
    "MaskedState",
    "Selection",
    "SparseMaskedState",
    "SparseUnfreezeState",
    "eligibility",
    "find_state",
    "full_mask",
    "gradual_unfreeze",
    "grow",
    "magnitude_mask",
    "map_paths",
    "masked",
    "match_paths",
    "oneshot_mask",
    "path_str",
    "round_due",
    "saliency_error",
    "schedule_steps",
    "tree_paths",
    "unfrozen",
    "updates_until_round",
]
