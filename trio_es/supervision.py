"""Supervision trees for Trio with Erlang/OTP semantics: restart types, strategies, intensity.

Build a tree from :class:`StaticSupervisor` (a fixed list of children) and
:class:`DynamicSupervisor` (children added at run time), describe each child with
:func:`worker`, and run the root in a nursery::

    root = (
        StaticSupervisor(Strategy.REST_FOR_ONE, name="app")
        .add(worker(store_actor, name="store"))
        .add(worker(router, name="router"))
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(root.run)

A supervisor that restarts its children too often gives up with
:class:`SupervisorGaveUp`, which its own supervisor treats as a failed child.
"""

from . import _claim_public_names
from ._supervisor import ChildHandle as ChildHandle
from ._supervisor import ChildSpecification as ChildSpecification
from ._supervisor import DynamicSupervisor as DynamicSupervisor
from ._supervisor import Restart as Restart
from ._supervisor import StaticSupervisor as StaticSupervisor
from ._supervisor import Strategy as Strategy
from ._supervisor import SupervisorGaveUp as SupervisorGaveUp
from ._supervisor import worker as worker

__all__ = [
    "ChildHandle",
    "ChildSpecification",
    "DynamicSupervisor",
    "Restart",
    "StaticSupervisor",
    "Strategy",
    "SupervisorGaveUp",
    "worker",
]

_claim_public_names(globals(), __all__, __name__)
