"""Issue 8 item 4: delete the database files while the exporter runs, then keep reserving.

Prints the day's tokens granted against a 1000-token budget after the deletion (floor: never
above 1000; the unfixed store started a fresh ledger and granted up to 1600).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio

from exporter.budget import Budget, BudgetLimits
from exporter.clock import FakeClock
from exporter.store import Store


async def main() -> None:
    clock = FakeClock(1_700_000_000.0)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "data" / "store.db"
        async with await Store.open(db, clock=clock) as store:
            budget = Budget(store, {"p": BudgetLimits(daily_tokens=1000)}, clock)
            granted = 0
            for _ in range(6):  # 600 before the deletion
                granted += 100 if await budget.reserve("p", 100, 0.0) else 0
            for path in db.parent.glob("store.db*"):
                path.unlink()
            for _ in range(10):  # as many as the store grants after it
                granted += 100 if await budget.reserve("p", 100, 0.0) else 0
    print(f"tokens granted in the day against a 1000-token budget: {granted} (floor: <= 1000)")


if __name__ == "__main__":
    anyio.run(main)
