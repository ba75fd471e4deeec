//! Helpers for the integration tests: connections to the throwaway cluster
//! that `make test` starts (scripts/cluster.sh), unique keys, SQLSTATEs.
//!
//! The cluster is found through `PGFENCE_PORT` (default 28815) on 127.0.0.1,
//! database `pg_fence`, trust authentication.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use tokio_postgres::{Client, Error, NoTls};

mod faulty;
pub use faulty::{Acquire, Faulty};

pub fn port() -> u16 {
    std::env::var("PGFENCE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(28815)
}

/// A session as `user` on the cluster at `port`.
pub async fn connect_to(port: u16, user: &str) -> Client {
    connect_to_database(port, user, "pg_fence").await
}

/// A session as `user` on database `dbname` of the cluster at `port`.
pub async fn connect_to_database(port: u16, user: &str, dbname: &str) -> Client {
    let config = format!(
        "host=127.0.0.1 port={port} user={user} dbname={dbname} application_name=pg_fence_tests"
    );
    let (client, connection) = tokio_postgres::connect(&config, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test cluster on port {port} as {user} (run `make test`): {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A superuser session on the shared test cluster.
pub async fn connect() -> Client {
    connect_to(port(), "postgres").await
}

/// A session as another role on the shared test cluster.
pub async fn connect_as(user: &str) -> Client {
    connect_to(port(), user).await
}

/// A key no other test (or earlier run) uses.
pub fn unique_key(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}:{}:{nanos}:{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(error: &Error) -> Option<String> {
    error.code().map(|code| code.code().to_owned())
}

/// Run `sql`, expect it to fail, and return (SQLSTATE, message).
pub async fn expect_error(client: &Client, sql: &str) -> (String, String) {
    match client.simple_query(sql).await {
        Ok(_) => panic!("expected an error from: {sql}"),
        Err(error) => {
            let state = sqlstate(&error)
                .unwrap_or_else(|| panic!("not a database error from {sql}: {error}"));
            let message = error
                .as_db_error()
                .map(|db| db.message().to_owned())
                .unwrap_or_default();
            (state, message)
        }
    }
}

/// `lock_acquire` returning the token, or None when not granted.
pub async fn acquire(
    client: &Client,
    key: &str,
    ttl: &str,
    holder: Option<&str>,
    wait: &str,
) -> Result<Option<i64>, Error> {
    let row = client
        .query_one(
            "SELECT (fence.lock_acquire($1, $2::text::interval, $3, $4::text::interval)).token",
            &[&key, &ttl, &holder, &wait],
        )
        .await?;
    Ok(row.get(0))
}

pub async fn release(client: &Client, key: &str, token: i64) -> Result<bool, Error> {
    Ok(client
        .query_one("SELECT fence.lock_release($1, $2)", &[&key, &token])
        .await?
        .get(0))
}

pub async fn renew(client: &Client, key: &str, token: i64) -> Result<bool, Error> {
    let row = client
        .query_one(
            "SELECT fence.lock_renew($1, $2) IS NOT NULL",
            &[&key, &token],
        )
        .await?;
    Ok(row.get(0))
}

pub async fn live_token(client: &Client, key: &str) -> Option<i64> {
    client
        .query_one("SELECT (fence.lock_status($1)).token", &[&key])
        .await
        .unwrap()
        .get(0)
}

/// Roles for the privilege tests (cluster-wide, created once): two plain
/// login roles and a member of fence_admin.
pub async fn ensure_test_roles(db: &Client) {
    db.batch_execute(
        "BEGIN;
         SELECT pg_advisory_xact_lock(4242); -- tests creating roles run concurrently
         DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fence_test_alice') THEN CREATE ROLE fence_test_alice LOGIN; END IF;
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fence_test_bob') THEN CREATE ROLE fence_test_bob LOGIN; END IF;
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fence_test_admin') THEN CREATE ROLE fence_test_admin LOGIN; END IF;
         END $$;
         GRANT fence_admin TO fence_test_admin;
         -- PostgreSQL 15 no longer lets PUBLIC create in schema public.
         GRANT CREATE ON SCHEMA public TO fence_test_alice, fence_test_bob, fence_test_admin;
         COMMIT;",
    )
    .await
    .unwrap();
}

/// A table name no other test uses.
pub fn unique_table(prefix: &str) -> String {
    unique_key(prefix).replace(':', "_")
}

/// The port the client tests' pools connect to: a PgBouncer in front of
/// the test cluster (`PGFENCE_POOLER_PORT`, set by `make test-pgbouncer`),
/// else the cluster itself. Sessions from [`connect`] always go straight
/// to the cluster.
pub fn pool_port() -> u16 {
    match std::env::var("PGFENCE_POOLER_PORT") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("PGFENCE_POOLER_PORT={value:?} is not a port")),
        Err(_) => port(),
    }
}

/// Whether the client tests' pools go through a transaction pooler: a
/// test of something only a session gives (a pooled connection's own
/// backend, to terminate or watch) is skipped then.
pub fn through_pooler() -> bool {
    pool_port() != port()
}

/// A sqlx pool on the test cluster, its connections named `application_name`.
pub async fn sqlx_pool(application_name: &str) -> sqlx::PgPool {
    let options = sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(pool_port())
        .username("postgres")
        .database("pg_fence")
        .application_name(application_name);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap()
}

/// A deadpool-postgres pool on the test cluster, likewise.
pub async fn deadpool_pool(application_name: &str) -> deadpool_postgres::Pool {
    let mut config = deadpool_postgres::Config::new();
    config.host = Some("127.0.0.1".into());
    config.port = Some(pool_port());
    config.user = Some("postgres".into());
    config.dbname = Some("pg_fence".into());
    config.application_name = Some(application_name.into());
    config
        .create_pool(Some(deadpool_postgres::Runtime::Tokio1), NoTls)
        .unwrap()
}

/// The repository's top directory.
pub fn repository_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Run `scripts/cluster.sh <action>` for a throwaway cluster of a test's own
/// (for tests that crash or stop their server): `target/<base>`, `port`.
pub fn side_cluster(action: &str, base: &str, port: u16) {
    side_cluster_preloading(action, base, port, true)
}

/// [`side_cluster`], with pg_fence in `shared_preload_libraries` or not
/// (`PGFENCE_PRELOAD`), for `start`.
pub fn side_cluster_preloading(action: &str, base: &str, port: u16, preload: bool) {
    let root = repository_root();
    let status = std::process::Command::new(root.join("scripts/cluster.sh"))
        .arg(action)
        .env("PGFENCE_PORT", port.to_string())
        .env("PGFENCE_BASE", root.join("target").join(base))
        .env("PGFENCE_PRELOAD", if preload { "1" } else { "0" })
        .status()
        .expect("run scripts/cluster.sh");
    assert!(status.success(), "cluster.sh {action} failed for {base}");
}

/// A side cluster from scratch (destroyed first, then started) with a fresh
/// pg_fence; returns a superuser connection to it.
pub async fn fresh_side_cluster(base: &str, port: u16) -> Client {
    side_cluster("destroy", base, port);
    side_cluster("start", base, port);
    let client = connect_to(port, "postgres").await;
    client
        .batch_execute("DROP EXTENSION IF EXISTS pg_fence; CREATE EXTENSION pg_fence")
        .await
        .unwrap();
    client
}

/// A new, empty database on the shared test cluster (dropped first if an
/// earlier run left it), and a superuser session on it.
pub async fn fresh_database(name: &str) -> Client {
    let admin = connect().await;
    for statement in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.simple_query(&statement).await.unwrap();
    }
    connect_to_database(port(), "postgres", name).await
}

/// The backend pid of a session.
pub async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Wait, up to 10 seconds, until session `pid` is blocked: sleeping inside
/// `lock_acquire` (wait event class `Extension`) or queued in the lock
/// manager (class `Lock`), as `pg_stat_activity` shows it. Race tests use it
/// instead of sleeping "long enough" for the other session to get there.
pub async fn until_waiting(observer: &Client, pid: i32) {
    for _ in 0..1000 {
        let waiting: bool = observer
            .query_one(
                "SELECT coalesce(wait_event_type IN ('Extension', 'Lock'), false)
                   FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if waiting {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("session {pid} never started waiting");
}

/// Wait, up to 10 s, until session `pid` is listed in `fence.waiters` (in
/// the queue of a key, preload mode), or with `listed = false` no longer.
pub async fn until_listed(db: &Client, pid: i32, listed: bool) {
    for _ in 0..1000 {
        let found = count(
            db,
            &format!("SELECT count(*) FROM fence.waiters WHERE pid = {pid}"),
        )
        .await;
        if (found == 1) == listed {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("waiter {pid} never became listed = {listed}");
}

/// The single `bigint` a query returns (a `count(*)`, say).
pub async fn count(db: &Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// A trigger's `tgenabled` state on a table ('A', 'O', 'R' or 'D').
pub async fn trigger_state(db: &Client, table: &str, trigger: &str) -> String {
    db.query_one(
        "SELECT tgenabled::text FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname = $2",
        &[&table, &trigger],
    )
    .await
    .unwrap()
    .get(0)
}

/// Defines a module `$name` with one test per client backend (sqlx and
/// deadpool-postgres), each running `$name(backend, application_name)`.
#[macro_export]
macro_rules! through_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlx() {
                let app = $crate::unique_table("sqlx");
                super::$name($crate::sqlx_pool(&app).await, app).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn deadpool() {
                let app = $crate::unique_table("dpool");
                super::$name($crate::deadpool_pool(&app).await, app).await
            }
        }
    };
}
