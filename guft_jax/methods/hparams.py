"""A method's validated hyperparameters (a NamedTuple) as its JSON-able ``Method.hparams``."""

from __future__ import annotations

from typing import NamedTuple


def as_json(hp: NamedTuple) -> dict:
    """``hp`` as a dict in field order, every tuple (a list of regexes) as a list.

    >>> class Hp(NamedTuple):
    ...     rank: int
    ...     targets: tuple[str, ...]
    >>> as_json(Hp(4, ("query",)))
    {'rank': 4, 'targets': ['query']}
    """
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hp._asdict().items()}
