"""SQLite history and budget ledger; its layers are described in docs/storage.md."""

from exporter.store.engine import connect_sqlite
from exporter.store.history import MAX_RECENT_RUNS, ModelState, Store
from exporter.store.ledger import LedgerLimits, LedgerTotals, LedgerWindows, WindowTotals
from exporter.store.migrations import SchemaTooNewError, StoreError

__all__ = [
    "MAX_RECENT_RUNS",
    "LedgerLimits",
    "LedgerTotals",
    "LedgerWindows",
    "ModelState",
    "SchemaTooNewError",
    "Store",
    "StoreError",
    "WindowTotals",
    "connect_sqlite",
]
