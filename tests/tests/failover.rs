//! G1 across the promotion of a synchronous standby: a primary and a
//! synchronous standby (throwaway clusters, like the crash test's), grants
//! and rolled-back grants under load with some sessions at
//! `synchronous_commit = off`, then the standby stops, more rolled-back
//! grants, an immediate stop of the primary, and the standby's promotion.
//! Every acknowledged grant is live with its token on the new primary, and
//! no token a client saw is issued again. Slow (two clusters, a base
//! backup): it runs in its own tier, after the others.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pg_fence_tests::*;

const PRIMARY_PORT: u16 = 28820;
const STANDBY_PORT: u16 = 28821;
const PRIMARY: &str = "pg_fence_primary";
const STANDBY: &str = "pg_fence_standby";

fn target() -> PathBuf {
    repository_root().join("target")
}

/// Run a PostgreSQL server binary as the `postgres` OS user when we are root.
fn as_postgres(tool: &str, args: &[&str]) {
    let binary = format!("/usr/lib/postgresql/15/bin/{tool}");
    let status = if is_root() {
        Command::new("runuser")
            .args(["-u", "postgres", "--", &binary])
            .args(args)
            .status()
    } else {
        Command::new(&binary).args(args).status()
    }
    .unwrap();
    assert!(status.success(), "{tool} {args:?} failed");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A standby of the primary on `primary_port`: a base backup into
/// `target/<base>/data`, listening on `port`, named `name`; not started.
/// Its data directory.
fn base_backup(primary_port: u16, base: &str, port: u16, name: &str) -> String {
    let standby_base = target().join(base);
    std::fs::create_dir_all(&standby_base).unwrap();
    if is_root() {
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&standby_base)
            .status()
            .unwrap();
    }
    let standby_data = format!("{}/data", standby_base.display());
    as_postgres(
        "pg_basebackup",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &primary_port.to_string(),
            "-U",
            "postgres",
            "-D",
            &standby_data,
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        ],
    );
    let conf = format!("{standby_data}/postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(&format!(
        "port = {port}\ncluster_name = '{name}'\nunix_socket_directories = '{}/run'\n",
        standby_base.display()
    ));
    std::fs::write(&conf, text).unwrap();
    std::fs::create_dir_all(standby_base.join("run")).unwrap();
    if is_root() {
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&standby_base)
            .status()
            .unwrap();
    }
    standby_data
}

/// A writer's grant tried on a hot standby (refused, read-only) must not
/// fill the writers' filter of shared leases: readers granted on the
/// primary afterwards arrive by replay, which sets no bits, and the
/// promoted standby keeps its shared memory. After the promotion, such a
/// reader still holds a writer off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_replayed_on_a_standby_holds_writers_off_after_its_promotion() {
    const PRIMARY2: &str = "pg_fence_primary2";
    const STANDBY2: &str = "pg_fence_standby2";
    side_cluster("destroy", STANDBY2, 28824);
    let primary = fresh_side_cluster(PRIMARY2, 28823).await;
    let standby_data = base_backup(28823, STANDBY2, 28824, "standby2");
    side_cluster("start", STANDBY2, 28824);
    let on_standby = connect_to(28824, "postgres").await;
    wait_until(&on_standby, "SELECT pg_is_in_recovery()").await;
    let (state, _) = expect_error(&on_standby, "SELECT fence.lock_acquire('replayed:x')").await;
    assert_eq!(state, "25006");
    let reader: i64 = primary
        .query_one(
            "SELECT (fence.lock_acquire_shared('replayed:r', '1 hour')).token",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_until(
        &on_standby,
        &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
    )
    .await;
    drop(on_standby);
    side_cluster("crash", PRIMARY2, 28823);
    as_postgres("pg_ctl", &["-D", &standby_data, "-w", "promote"]);
    let promoted = connect_to(28824, "postgres").await;
    wait_until(&promoted, "SELECT NOT pg_is_in_recovery()").await;
    assert_eq!(
        acquire(&promoted, "replayed:r", "1 minute", None, "0")
            .await
            .unwrap(),
        None,
        "a writer was granted beside the reader {reader} after the promotion"
    );
    assert!(release(&promoted, "replayed:r", reader).await.unwrap());
    assert!(acquire(&promoted, "replayed:r", "1 minute", None, "0")
        .await
        .unwrap()
        .is_some());
    drop(promoted);
    side_cluster("destroy", STANDBY2, 28824);
    side_cluster("destroy", PRIMARY2, 28823);
}

#[derive(Default)]
struct Seen {
    tokens: Vec<i64>,
    acknowledged: Vec<(String, i64)>,
}

async fn wait_until(db: &Client, sql: &str) {
    for _ in 0..300 {
        let done: bool = db.query_one(sql, &[]).await.unwrap().get(0);
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {sql}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_token_is_issued_twice_across_the_promotion_of_a_synchronous_standby() {
    side_cluster("destroy", STANDBY, STANDBY_PORT);
    let primary = fresh_side_cluster(PRIMARY, PRIMARY_PORT).await;

    // The standby: a base backup of the primary, on its own port.
    let standby_data = base_backup(PRIMARY_PORT, STANDBY, STANDBY_PORT, "standby1");
    let conf = format!("{standby_data}/postgresql.conf");
    side_cluster("start", STANDBY, STANDBY_PORT);
    for statement in [
        "ALTER SYSTEM SET synchronous_standby_names = 'standby1'",
        "SELECT pg_reload_conf()",
    ] {
        primary.simple_query(statement).await.unwrap();
    }
    wait_until(
        &primary,
        "SELECT EXISTS (SELECT FROM pg_stat_replication WHERE application_name = 'standby1' AND sync_state = 'sync')",
    )
    .await;

    // Load: grants that commit (two workers at synchronous_commit = off) and
    // grants in transactions that roll back.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let seen = seen.clone();
        workers.push(tokio::spawn(async move {
            let db = connect_to(PRIMARY_PORT, "postgres").await;
            if worker % 2 == 0 {
                db.batch_execute("SET synchronous_commit = off")
                    .await
                    .unwrap();
            }
            for i in 0..60 {
                let key = format!("failover:{worker}:{i}");
                if worker == 3 {
                    db.batch_execute("BEGIN").await.unwrap();
                    let token = acquire(&db, &key, "1 hour", None, "0").await.unwrap();
                    db.batch_execute("ROLLBACK").await.unwrap();
                    seen.lock().unwrap().tokens.extend(token);
                } else {
                    let token = acquire(&db, &key, "1 hour", None, "0")
                        .await
                        .unwrap()
                        .unwrap();
                    let mut seen = seen.lock().unwrap();
                    seen.tokens.push(token);
                    seen.acknowledged.push((key, token));
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }

    // A standby refuses grants, saying why.
    let on_standby = connect_to(STANDBY_PORT, "postgres").await;
    let (state, message) =
        expect_error(&on_standby, "SELECT fence.lock_acquire('failover:standby')").await;
    assert_eq!(state, "25006", "{message}");
    drop(on_standby);

    // The standby goes away. Grants in transactions that roll back never
    // wait at commit; each must still not hand out a token the standby
    // has not got: it waits for it, and a cancelled wait is an error.
    // A grant through a function whose SET clause lowers synchronous_commit
    // (restored when it returns, after lock_acquire raised it) still waits
    // for the standby at commit: with the standby gone, it does not return.
    primary
        .batch_execute(
            "CREATE FUNCTION grab_fast(k text) RETURNS bigint LANGUAGE sql SET synchronous_commit = off
                 AS $$ SELECT token FROM fence.lock_acquire(k, '1 hour') $$",
        )
        .await
        .unwrap();
    // Its token must be covered by sequence WAL the standby already has, so
    // that only the commit can wait: take tokens until the sequence has
    // values left before it logs again.
    for i in 0.. {
        acquire(
            &primary,
            &format!("failover:cover:{i}"),
            "1 hour",
            None,
            "0",
        )
        .await
        .unwrap();
        let left: i64 = primary
            .query_one("SELECT log_cnt FROM fence.token_seq", &[])
            .await
            .unwrap()
            .get(0);
        if left > 0 {
            break;
        }
    }
    side_cluster("stop", STANDBY, STANDBY_PORT);
    let fast = Arc::new(connect_to(PRIMARY_PORT, "postgres").await);
    fast.batch_execute("SET synchronous_commit = off")
        .await
        .unwrap();
    let fast_pid = backend_pid(&fast).await;
    let cancel = fast.cancel_token();
    let granting = {
        let fast = fast.clone();
        tokio::spawn(async move {
            fast.query_one("SELECT grab_fast('failover:fast')", &[])
                .await
        })
    };
    for _ in 0..500 {
        assert!(
            !granting.is_finished(),
            "a grant's commit returned without the synchronous standby"
        );
        let waiting: bool = primary
            .query_one(
                "SELECT coalesce(wait_event = 'SyncRep', false) FROM pg_stat_activity WHERE pid = $1",
                &[&fast_pid],
            )
            .await
            .unwrap()
            .get(0);
        if waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!granting.is_finished());
    cancel.cancel_query(NoTls).await.unwrap();
    let _ = granting.await.unwrap();
    drop(fast);
    let db = connect_to(PRIMARY_PORT, "postgres").await;
    db.batch_execute("SET statement_timeout = '200ms'")
        .await
        .unwrap();
    let mut refused = 0;
    for i in 0..40 {
        db.batch_execute("BEGIN").await.unwrap();
        match acquire(&db, &format!("failover:alone:{i}"), "1 hour", None, "0").await {
            Ok(token) => seen.lock().unwrap().tokens.extend(token),
            Err(error) => {
                assert_eq!(sqlstate(&error).as_deref(), Some("57014"), "{error}");
                refused += 1;
            }
        }
        db.batch_execute("ROLLBACK").await.unwrap();
    }
    assert!(refused > 0, "no grant needed the standby in 40 tokens");
    drop(db);
    drop(primary);

    // The primary dies; the standby is promoted.
    side_cluster("crash", PRIMARY, PRIMARY_PORT);
    side_cluster("start", STANDBY, STANDBY_PORT);
    as_postgres("pg_ctl", &["-D", &standby_data, "-w", "promote"]);
    let promoted = connect_to(STANDBY_PORT, "postgres").await;
    wait_until(&promoted, "SELECT NOT pg_is_in_recovery()").await;

    let (tokens, acknowledged) = {
        let seen = seen.lock().unwrap();
        (seen.tokens.clone(), seen.acknowledged.clone())
    };
    for (key, token) in &acknowledged {
        assert_eq!(
            live_token(&promoted, key).await,
            Some(*token),
            "acknowledged grant of {key} lost in the failover"
        );
    }
    let highest_seen = *tokens.iter().max().unwrap();
    for i in 0..40 {
        let token = acquire(
            &promoted,
            &format!("failover:after:{i}"),
            "1 hour",
            None,
            "0",
        )
        .await
        .unwrap()
        .unwrap();
        assert!(
            token > highest_seen,
            "token {token} issued again after promotion (a client saw up to {highest_seen})"
        );
    }
    drop(promoted);

    // synchronous_standby_names set where commits would not wait for a
    // standby (max_wal_senders = 0): neither does lock_acquire, and it does
    // not call that a cancelled wait.
    side_cluster("stop", STANDBY, STANDBY_PORT);
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("max_wal_senders = 0\nsynchronous_standby_names = 'nobody'\n");
    std::fs::write(&conf, text).unwrap();
    side_cluster("start", STANDBY, STANDBY_PORT);
    let alone = connect_to(STANDBY_PORT, "postgres").await;
    alone
        .batch_execute("SET statement_timeout = '2s'")
        .await
        .unwrap();
    for i in 0..40 {
        alone.batch_execute("BEGIN").await.unwrap();
        let token = acquire(
            &alone,
            &format!("failover:no-senders:{i}"),
            "1 hour",
            None,
            "0",
        )
        .await;
        alone.batch_execute("ROLLBACK").await.unwrap();
        assert!(token.unwrap().is_some(), "grant {i} without wal senders");
    }
    drop(alone);
    side_cluster("destroy", STANDBY, STANDBY_PORT);
    side_cluster("destroy", PRIMARY, PRIMARY_PORT);
}
