CREATE TABLE IF NOT EXISTS {t} (
                    seq BIGSERIAL PRIMARY KEY,
                    id UUID NOT NULL UNIQUE,
                    stream TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    msg_key TEXT,
                    okey TEXT NOT NULL,
                    payload BYTEA NOT NULL,
                    content_type TEXT NOT NULL,
                    headers JSONB NOT NULL,
                    strategy TEXT NOT NULL,
                    status TEXT NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    created_at BIGINT NOT NULL,
                    next_attempt_at BIGINT NOT NULL,
                    locked_by TEXT,
                    locked_until BIGINT,
                    last_error TEXT,
                    sent_at BIGINT,
                    signature TEXT
                );
                CREATE INDEX IF NOT EXISTS {t}_pending ON {t} (seq) WHERE status = 'pending';
                CREATE INDEX IF NOT EXISTS {t}_unit ON {t} (stream, okey, seq) WHERE status = 'pending';
                CREATE INDEX IF NOT EXISTS {t}_leased ON {t} (locked_until) WHERE status = 'pending' AND locked_until IS NOT NULL;
                CREATE INDEX IF NOT EXISTS {t}_backoff ON {t} (next_attempt_at) WHERE status = 'pending' AND attempts > 0;
                CREATE INDEX IF NOT EXISTS {t}_sent ON {t} (sent_at) WHERE status = 'sent';
                CREATE INDEX IF NOT EXISTS {t}_dead ON {t} (created_at) WHERE status = 'dead';
                CREATE TABLE IF NOT EXISTS {t}_units (
                    stream TEXT NOT NULL,
                    okey TEXT NOT NULL,
                    PRIMARY KEY (stream, okey)
                );
                CREATE TABLE IF NOT EXISTS {t}_claim (id SMALLINT PRIMARY KEY CHECK (id = 1));
                INSERT INTO {t}_claim (id) VALUES (1) ON CONFLICT DO NOTHING
