CREATE TABLE IF NOT EXISTS {t} (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    id TEXT NOT NULL UNIQUE,
                    stream TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    msg_key TEXT,
                    okey TEXT NOT NULL,
                    payload BLOB NOT NULL,
                    content_type TEXT NOT NULL,
                    headers TEXT NOT NULL,
                    strategy TEXT NOT NULL,
                    status TEXT NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    created_at INTEGER NOT NULL,
                    next_attempt_at INTEGER NOT NULL,
                    locked_by TEXT,
                    locked_until INTEGER,
                    last_error TEXT,
                    sent_at INTEGER,
                    signature TEXT
                );
                CREATE INDEX IF NOT EXISTS {t}_unit ON {t} (stream, okey, seq) WHERE status = 'pending';
                CREATE INDEX IF NOT EXISTS {t}_leased ON {t} (locked_until) WHERE status = 'pending' AND locked_until IS NOT NULL;
                CREATE INDEX IF NOT EXISTS {t}_backoff ON {t} (next_attempt_at) WHERE status = 'pending' AND attempts > 0;
                CREATE INDEX IF NOT EXISTS {t}_sent ON {t} (sent_at) WHERE status = 'sent';
                CREATE INDEX IF NOT EXISTS {t}_dead ON {t} (created_at) WHERE status = 'dead';
