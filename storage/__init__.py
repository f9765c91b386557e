"""The store: every SQL statement of opsbot lives in this package.

``bot/`` and ``pipeline/`` call the named functions of the modules here (tests/test_storage_seam.py
fails when SQL appears anywhere else), so another backend has one package to implement:
:mod:`.db` (opening, migrations, transactions, lock wait), :mod:`.queue` (batches, tasks,
attempts), :mod:`.inbox`, :mod:`.outbox`, :mod:`.alerts` (alerts and silences),
:mod:`.breakers`, :mod:`.kv`, :mod:`.budget` (the shared Coze QPS budget), :mod:`.runtimes`,
:mod:`.workers` (worker processes and their heartbeats),
:mod:`.reports` (the daily report's aggregates) and :mod:`.metrics` (``/metrics`` aggregates).
A function whose name ends in ``_in`` takes the caller's connection and runs inside the
caller's transaction.
"""
