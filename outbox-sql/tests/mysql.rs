//! The delivery contract against a real MariaDB / MySQL (OUTBOX_MYSQL_URL, default
//! mysql://root@127.0.0.1:3306/test). No skip: an unreachable server fails the tests.

#[macro_use]
mod common;

sql_store_tests! {
    harness: My,
    store: MySqlStore,
    options: MySqlOptions,
    module: mysql,
    url_env: "OUTBOX_MYSQL_URL",
    default_url: "mysql://root@127.0.0.1:3306/test",
    unreachable_url: "mysql://app:hunter2secret@127.0.0.1:1/db",
    business_ddl: "id BIGINT AUTO_INCREMENT PRIMARY KEY",
    business_insert: "INSERT INTO {}_business () VALUES ()",
    tamper: "UPDATE {} SET payload = 'tampered' WHERE seq = ?",
}
