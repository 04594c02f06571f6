"""LoSiA's configuration, method state and target layout (arXiv:2507.04487): which kernels train
a subnet, in which slot, with which block size."""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import jax

from guft_jax import paths
from guft_jax.methods.losia_ops import effective_matrix
from guft_jax.vit import kernel_as_matrix

DEFAULT_TARGETS = (r"^Transformer/encoderblock_\d+/.+/kernel$",)
BLOCK_RE = re.compile(r"(?:^|/)encoderblock_(\d+)/")


class LosiaState(NamedTuple):
    """LoSiA's method state (checkpointed). Dict keys are ``paths.key_of`` of kernel paths
    (``rows`` … ``res_vals``) or of the matrix type (``imp``, ``unc``: the path below
    ``encoderblock_i``).

    - ``rows``, ``cols``: the current subnet's input / output units, ``(kr,)`` / ``(kc,)`` int32.
    - ``res_rows``, ``res_cols``, ``res_vals``: the ring of retired blocks, ``(H, kr)``,
      ``(H, kc)``, ``(H, kr, kc)``; an empty slot has rows equal to ``in`` (dropped).
    - ``imp``, ``unc``: ``Ī`` and ``Ū`` of the recording layer, ``(in, out)`` per matrix type.
    - ``restart``: ``(L,)`` int32, the step at which each layer's re-warm began (``-T``: none).
    - ``relocs``: ``(L,)`` int32, relocalisations done per layer.
    - ``count``: steps done; ``(count // T) mod L`` is the layer recording in the next forward.
    """

    rows: dict
    cols: dict
    res_rows: dict
    res_cols: dict
    res_vals: dict
    imp: dict
    unc: dict
    restart: jax.Array
    relocs: jax.Array
    count: jax.Array


class Target(NamedTuple):
    """One target kernel of the layout."""

    key: str  # paths.key_of(kernel path)
    path: str  # kernel path
    pos: int  # slot position of its encoder block (0..L-1)
    kind: str  # matrix type key, shared by the blocks
    dims: tuple[int, int]  # (in, out) of the 2-D view
    sub: tuple[int, int]  # (kr, kc)


@dataclasses.dataclass(frozen=True)
class LosiaConfig:
    """The validated hyperparameters of :func:`guft_jax.methods.losia.losia` and its name."""

    ratio: float
    period: int
    beta1: float
    beta2: float
    history: int
    targets: tuple[str, ...]
    seed: int
    relocalize: bool
    pro: bool
    name: str

    def hparams(self) -> dict:
        """The JSON-able ``Method.hparams``."""
        return dict(
            ratio=self.ratio,
            period=self.period,
            beta1=self.beta1,
            beta2=self.beta2,
            history=self.history,
            targets=list(self.targets),
            seed=self.seed,
            relocalize=self.relocalize,
        )

    def sub(self, n: int) -> int:
        """A subnet's side for a matrix side of ``n``."""
        return max(1, int(self.ratio * n))  # the official int(rank_factor * dim)

    def recording(self, count, num_layers: int):
        """The slot position of the layer recording importance after ``count`` steps."""
        return (count // self.period) % num_layers

    def layout(self, params) -> list[Target]:
        """The targets (works on abstract params): kernels matched by ``targets``, each under an
        ``encoderblock_i``, with the same 2-D shape for the same matrix type."""
        field = f"{self.name}.targets"
        mask = paths.regex_mask(params, list(self.targets), [r"^head/"], field=field)
        found = [paths.key_to_str(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m]
        bad = [p for p in found if not p.endswith("/kernel") or not BLOCK_RE.search(p)]
        if bad:
            raise ValueError(f"{field}: targets must be encoder-block kernels, got {bad[:4]}")
        layers = sorted({int(BLOCK_RE.search(p).group(1)) for p in found})
        out, kinds = [], {}
        for p in found:
            m = BLOCK_RE.search(p)
            kind = paths.key_of(p[m.end() :].removesuffix("/kernel"))
            leaf = paths.get(params, p)
            view = jax.eval_shape(lambda k, p=p: kernel_as_matrix(k, p), leaf)
            dims = tuple(int(d) for d in view.shape)
            if kinds.setdefault(kind, dims) != dims:
                raise ValueError(f"{field}: {kind} has shapes {kinds[kind]} and {dims}")
            sub = (self.sub(dims[0]), self.sub(dims[1]))
            out.append(Target(paths.key_of(p), p, layers.index(int(m.group(1))), kind, dims, sub))
        return out


def layer_count(layout: list[Target]) -> int:
    """``L``, the number of encoder blocks holding targets."""
    return 1 + max(t.pos for t in layout)


def kind_dims(layout: list[Target]) -> dict[str, tuple[int, int]]:
    """``{matrix type: (in, out)}``."""
    return {t.kind: t.dims for t in layout}


def retired_of(state: LosiaState, key: str) -> tuple:
    """``(res_rows, res_cols, res_vals)``: the ring of retired blocks of kernel ``key``."""
    return (state.res_rows[key], state.res_cols[key], state.res_vals[key])


def operands(params, t: Target, blocks, state: LosiaState) -> tuple:
    """The arguments of :func:`effective_matrix` for target ``t``."""
    w0 = kernel_as_matrix(paths.get(params, t.path), t.path)
    k = t.key
    return (w0, state.rows[k], state.cols[k], blocks[k], *retired_of(state, k))


def matrix_of(params, t: Target, blocks, state: LosiaState):
    """Target ``t``'s effective ``(in, out)`` matrix."""
    return effective_matrix(*operands(params, t, blocks, state))
