"""SQLite history and budget ledger (see docs/storage.md).

``Store`` is the component; ``ProbeStore`` the narrow Protocol the scheduler and HTTP API
depend on. Submodules: ``engine`` (connection, transactions, faults and the retry queue),
``statements`` (the SQL), ``migrations`` (forward-only schema versions), ``models`` (values).
"""

from exporter.store.core import MAX_RECENT_RUNS, OPERATIONS, ProbeStore, Store
from exporter.store.engine import Connector, connect_sqlite
from exporter.store.migrations import SchemaTooNewError, StoreError
from exporter.store.models import (
    LedgerDecision,
    LedgerLimits,
    LedgerTotals,
    LedgerWindows,
    ModelState,
    WindowTotals,
)

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
