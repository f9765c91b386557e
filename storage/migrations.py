"""Schema migrations, in order. Never edit a shipped migration: append a new one.

Times are stored as Unix seconds (REAL, UTC). JSON columns hold text.

Tables
- ``inbox``: every Feishu event the webhook accepted, keyed for dedup (message_id for messages,
  event_id otherwise); the worker or the web dispatcher claims and handles it once.
- ``batches`` / ``tasks``: the durable work queue. A task is claimed with a lease
  (``lease_owner``, ``lease_until``); ``execute_id`` is written before anything else after submit.
- ``attempts``: one row per stage attempt (for retries, latency and the daily report), with the
  bytes of the stage's input and output (``input_bytes``, ``output_bytes``; NULL when unknown).
- ``outbox``: every outgoing Feishu call (send, reply, patch, Bitable write), sent at least once
  by a sender and made idempotent by ``uuid``.
- ``breakers``: circuit breaker state per service (submit failures counted apart).
- ``alerts`` / ``silences``: grouped alerts and silenced keys.
- ``kv``: small named values (last report date, etc.).
- ``workers``: one row per worker process start (id, host, PID namespace, stages, heartbeat).
- ``run_times``: the last run times of each workflow (see :mod:`storage.runtimes`), so a new
  worker places its polls from what earlier ones learned.
- ``budgets``: the Coze QPS budget shared by every process of one account.
- ``batches.pipeline``: the pipeline (``[[pipelines]]`` name) a batch belongs to; batches from
  before it are ``default``.
"""

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE inbox (
            key TEXT PRIMARY KEY,
            event_id TEXT,
            event_type TEXT NOT NULL,
            payload TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'new',      -- new | done | failed
            received_at REAL NOT NULL,
            handled_at REAL,
            lease_owner TEXT,
            lease_until REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            error TEXT
        )""",
        "CREATE INDEX inbox_status ON inbox(status, received_at)",
        """CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            source TEXT NOT NULL,                    -- chat | cli | bitable
            status TEXT NOT NULL DEFAULT 'queued',   -- queued|running|paused|blocked|cancelled|done
            chat_id TEXT,
            command_message_id TEXT,
            progress_message_id TEXT,
            created_by TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            blocked_reason TEXT,
            workflow_id TEXT,
            options TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX batches_status ON batches(status)",
        """CREATE TABLE tasks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            batch_id TEXT NOT NULL REFERENCES batches(id),
            task_key TEXT NOT NULL,                  -- the user's task_id
            record_id TEXT,                          -- Bitable record, when it came from there
            params TEXT NOT NULL DEFAULT '{}',
            status TEXT NOT NULL DEFAULT 'queued',
                -- queued | running | retrying | succeeded | failed | cancelled | ignored
            stage TEXT NOT NULL DEFAULT 'coze',      -- coze | synthesis | done
            attempts INTEGER NOT NULL DEFAULT 0,
            resubmits INTEGER NOT NULL DEFAULT 0,
            execute_id TEXT,
            submitted_at REAL,
            debug_url TEXT,
            coze_output TEXT,
            output TEXT,
            error_class TEXT,
            error_code TEXT,
            error_message TEXT,
            error_node TEXT,
            next_at REAL NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_until REAL,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            coze_seconds REAL,
            synthesis_seconds REAL,
            UNIQUE(batch_id, task_key)
        )""",
        "CREATE INDEX tasks_claim ON tasks(status, next_at)",
        "CREATE INDEX tasks_batch ON tasks(batch_id, status)",
        """CREATE TABLE attempts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id INTEGER NOT NULL REFERENCES tasks(id),
            batch_id TEXT NOT NULL,
            stage TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL,
            outcome TEXT,                            -- success | retry | resubmit | fail | fatal
            error_class TEXT,
            error_code TEXT,
            error_message TEXT,
            node TEXT,
            execute_id TEXT
        )""",
        "CREATE INDEX attempts_time ON attempts(started_at)",
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            uuid TEXT NOT NULL UNIQUE,               -- idempotency key, also Feishu's send uuid
            kind TEXT NOT NULL,                      -- send | reply | patch | bitable_update
            target TEXT NOT NULL,                    -- chat_id | message_id | table
            payload TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending',  -- pending | sent | dead
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_until REAL,
            last_error TEXT,
            result TEXT,                             -- e.g. the message_id Feishu assigned
            ref TEXT,                                -- what it is about (alert key, batch id)
            created_at REAL NOT NULL,
            sent_at REAL
        )""",
        "CREATE INDEX outbox_due ON outbox(status, next_at)",
        """CREATE TABLE breakers (
            service TEXT PRIMARY KEY,
            state TEXT NOT NULL DEFAULT 'closed',    -- closed | open | half_open
            failures INTEGER NOT NULL DEFAULT 0,
            successes INTEGER NOT NULL DEFAULT 0,
            opened_at REAL,
            reason TEXT,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE alerts (
            key TEXT PRIMARY KEY,
            tier TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'open',     -- open | resolved | ignored
            count INTEGER NOT NULL DEFAULT 1,
            first_at REAL NOT NULL,
            last_at REAL NOT NULL,
            resolved_at REAL,
            message_uuid TEXT,                       -- outbox uuid of the card
            batch_id TEXT,
            task_id INTEGER,
            details TEXT NOT NULL DEFAULT '{}'
        )""",
        """CREATE TABLE silences (
            key TEXT PRIMARY KEY,
            until REAL NOT NULL,
            created_by TEXT,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE kv (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at REAL NOT NULL
        )""",
    ],
    [
        # the workflow a run was submitted to (a fallback workflow may differ from the batch's)
        "ALTER TABLE tasks ADD COLUMN run_workflow_id TEXT",
        "CREATE INDEX tasks_stage ON tasks(stage, status)",
    ],
    [
        # set while a submit is on the wire: a worker that finds it set (and no execute_id)
        # knows its predecessor died mid-submit and Coze may hold a run it cannot see
        "ALTER TABLE tasks ADD COLUMN submit_started_at REAL",
    ],
    [
        # per-node log: bytes of a stage's input (params, or the workflow output for synthesis
        # and the quality gate) and of its output
        "ALTER TABLE attempts ADD COLUMN input_bytes INTEGER",
        "ALTER TABLE attempts ADD COLUMN output_bytes INTEGER",
        # a task's attempts (the gate's resubmit budget, alert cards' attempt counts)
        "CREATE INDEX attempts_task ON attempts(task_id, id)",
    ],
    [
        # learned run times per workflow (the last few hundred; see storage.runtimes)
        """CREATE TABLE run_times (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            workflow_id TEXT NOT NULL,
            seconds REAL NOT NULL,
            execute_id TEXT,
            ended_at REAL NOT NULL
        )""",
        "CREATE INDEX run_times_workflow ON run_times(workflow_id, id)",
        # the breaker counts failed submits apart from failed polls (see pipeline.breaker)
        "ALTER TABLE breakers ADD COLUMN submit_failures INTEGER NOT NULL DEFAULT 0",
    ],
    [
        # One Coze QPS budget per account, shared by every process on this store
        # (storage.budget): the next free send slot, the pause after a 429, the reduced rate.
        """CREATE TABLE budgets (
            key TEXT PRIMARY KEY,                    -- hash of the account (never the token)
            next_slot REAL NOT NULL DEFAULT 0,       -- Unix seconds of the next free slot
            paused_until REAL NOT NULL DEFAULT 0,
            reduced_rate REAL,                       -- rate right after the last 429 (NULL: none)
            reduced_at REAL,
            updated_at REAL NOT NULL
        )""",
        # the process running a batch of its own (`opsbot run`); other workers leave the
        # batch alone while runner_until is in the future
        "ALTER TABLE batches ADD COLUMN runner TEXT",
        "ALTER TABLE batches ADD COLUMN runner_until REAL",
        # Feishu dedupes a send by uuid for one hour from its first attempt; a replayed dead
        # row is sent under a new uuid (send_uuid) while `uuid` stays its name for patches
        "ALTER TABLE outbox ADD COLUMN first_attempt_at REAL",
        "ALTER TABLE outbox ADD COLUMN send_uuid TEXT",
    ],
    [
        # worker processes: a unique id per process start (the tasks' lease_owner), where it
        # runs, which stages it takes, and its heartbeat (see storage.workers)
        """CREATE TABLE workers (
            id TEXT PRIMARY KEY,
            hostname TEXT NOT NULL,
            pid INTEGER NOT NULL,
            pid_ns TEXT,
            proc_start INTEGER,
            stages TEXT NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            stopped_at REAL
        )""",
    ],
    [
        # many pipelines (bot.settings): the batch's pipeline picks its workflow, Coze
        # account, alert chat and table; batches from before are the default pipeline's
        "ALTER TABLE batches ADD COLUMN pipeline TEXT NOT NULL DEFAULT 'default'",
        "CREATE INDEX batches_pipeline ON batches(pipeline, status)",
    ],
    [
        # pgfix: the claim's scan of running tasks (to take over the expired lease of a dead
        # worker) seeks the expired leases, instead of reading every running task with a
        # valid lease through tasks_claim (status, next_at) (see storage.queue._due_sql)
        "CREATE INDEX tasks_lease ON tasks(status, lease_until)",
    ],
]
