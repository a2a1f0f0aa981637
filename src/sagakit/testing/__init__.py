"""Testing sagas: failure injection at every step and checkpoint, and a pytest plugin.

:func:`explore` runs a saga once per failure point (an error in each step's action and in each
compensation, a crash at each journal write) and checks every run::

    from sagakit.testing import explore

    async def test_orders_survive_every_failure(tmp_path) -> None:
        app = create_app(f"sqlite:///{tmp_path / 'orders.db'}")
        report = await explore(app, "OrderFulfillment", order, invariant=books_balance)
        report.raise_for_failures()  # raises with the table of failure points if one failed

A failing point runs again alone by its id: ``explore(..., only="crash@7")``.

A saga with remote steps is explored with the services that answer its commands, run
in-process without a broker; its points then also lose commands and replies and deliver
commands twice (``timeout@``, ``noreply@``, ``dup@``, ``dup@undo:``)::

    report = await explore(app, "RemoteOrderFulfillment", order, invariant=books_balance,
                           services=create_services("memory://x", ledger_path=ledger))

The pytest plugin (:mod:`sagakit.testing.plugin`, registered when sagakit is installed) gives
tests an App on a temporary database (``sagakit_app``) with a virtual clock
(``sagakit_clock``), and ``sagakit_explore``, which honours ``--sagakit-point ID``.
"""

from sagakit.clock import VirtualClock
from sagakit.testing.explore import Invariant, explore
from sagakit.testing.faults import CallRecord, InjectedFault, SimulatedCrash
from sagakit.testing.points import FailurePoint, PointKind
from sagakit.testing.report import (
    ExplorationFailed,
    ExploreReport,
    PointResult,
    PointRun,
    Status,
)
from sagakit.testing.waiting import until_waiting

__all__ = [
    "CallRecord",
    "ExplorationFailed",
    "ExploreReport",
    "FailurePoint",
    "InjectedFault",
    "Invariant",
    "PointKind",
    "PointResult",
    "PointRun",
    "SimulatedCrash",
    "Status",
    "VirtualClock",
    "explore",
    "until_waiting",
]
