"""SQLite history and budget ledger (see docs/storage.md).

``Store`` is the component and ``ProbeStore`` the narrow Protocol the recorder and the HTTP
API depend on. Modules: ``history`` (runs, balances, model state, retention: ``Store``),
``ledger`` (reserve-before-send and its values), ``migrations`` (forward-only schema
versions), ``engine`` (the connection, transactions, faults and the retry queue).
"""

from exporter.store.engine import Connector, connect_sqlite
from exporter.store.history import MAX_RECENT_RUNS, OPERATIONS, ModelState, ProbeStore, Store
from exporter.store.ledger import (
    LedgerDecision,
    LedgerLimits,
    LedgerTotals,
    LedgerWindows,
    WindowTotals,
)
from exporter.store.migrations import SchemaTooNewError, StoreError

__all__ = [
    "MAX_RECENT_RUNS",
    "OPERATIONS",
    "Connector",
    "LedgerDecision",
    "LedgerLimits",
    "LedgerTotals",
    "LedgerWindows",
    "ModelState",
    "ProbeStore",
    "SchemaTooNewError",
    "Store",
    "StoreError",
    "WindowTotals",
    "connect_sqlite",
]
