"""SQLite history and budget ledger (docs/storage.md).

``Store`` is the component, ``ProbeStore`` the narrow Protocol the recorder and the HTTP API
depend on. Layers: ``migrations`` (the schema), ``engine`` (the connection, transactions,
faults and the retry queue), ``ledger`` (budget reservations), ``history`` (``Store``).
"""

from exporter.store.engine import connect_sqlite
from exporter.store.history import MAX_RECENT_RUNS, ModelState, ProbeStore, Store
from exporter.store.ledger import LedgerLimits, LedgerTotals, LedgerWindows, WindowTotals
from exporter.store.migrations import SchemaTooNewError, StoreError

__all__ = [
    "MAX_RECENT_RUNS",
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
