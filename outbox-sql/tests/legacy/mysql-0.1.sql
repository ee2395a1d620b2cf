CREATE TABLE {t} (
    seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    id CHAR(36) NOT NULL,
    stream VARCHAR(255) COLLATE utf8mb4_nopad_bin NOT NULL,
    destination VARCHAR(512) NOT NULL,
    msg_key VARCHAR(255) COLLATE utf8mb4_nopad_bin NULL,
    okey VARCHAR(255) COLLATE utf8mb4_nopad_bin NOT NULL,
    payload LONGBLOB NOT NULL,
    content_type VARCHAR(255) NOT NULL,
    headers LONGTEXT NOT NULL,
    strategy VARCHAR(16) NOT NULL,
    status VARCHAR(16) NOT NULL,
    attempts INT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    locked_by VARCHAR(64) COLLATE utf8mb4_nopad_bin NULL,
    locked_until BIGINT NULL,
    last_error TEXT NULL,
    sent_at BIGINT NULL,
    signature VARCHAR(255) NULL,
    UNIQUE KEY {t}_id (id),
    KEY {t}_unit (status, stream, okey, seq),
    KEY {t}_leased (status, locked_until),
    KEY {t}_backoff (status, next_attempt_at),
    KEY {t}_sent (status, sent_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
CREATE TABLE {t}_locks (
    stream VARCHAR(255) NOT NULL,
    okey VARCHAR(255) NOT NULL,
    PRIMARY KEY (stream, okey)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_nopad_bin;
CREATE TABLE {t}_claim (id TINYINT NOT NULL PRIMARY KEY) ENGINE = InnoDB;
INSERT IGNORE INTO {t}_claim (id) VALUES (1)
