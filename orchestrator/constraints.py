"""What a spec's constraints may name: the GPUs and providers the catalog has.

A typo in `constraints.gpus` or `constraints.providers` would otherwise filter silently (an
unknown GPU just matches nothing) or end in "no offer matches"; here it is a one-line error that
lists the names the catalog knows. A GPU family ('A100') stands for its variants ('A100-80GB'),
as the planner's filter reads it.
"""
from __future__ import annotations

from typing import Sequence

from contract.errors import UserError


class UnknownNameError(UserError):
    """A constraint names a GPU or provider that no offer in the catalog has: a typo, never a filter."""


def check_names(c, offers: Sequence) -> None:
    """constraints.gpus and constraints.providers must name what the catalog has; a GPU family
    ('A100') stands for its variants ('A100-80GB'), as in the planner's `_allowed`."""
    gpus = {o.gpu.lower(): o.gpu for o in offers}
    for wanted in c.gpus or ():
        w = wanted.lower()
        if w not in gpus and not any(g.startswith(w + "-") for g in gpus):
            raise UnknownNameError(f"constraints.gpus: unknown GPU '{wanted}'; known: "
                                   f"{', '.join(sorted(set(gpus.values()), key=str.lower))}")
    providers = {o.provider.lower() for o in offers}
    for wanted in c.providers or ():
        if wanted.lower() not in providers:
            raise UnknownNameError(f"constraints.providers: unknown provider '{wanted}'; known: {', '.join(sorted(providers))}")
