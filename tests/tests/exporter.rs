//! Prometheus for the database side: Debian's prometheus-postgres-exporter
//! (installed by scripts/setup.sh) runs with monitoring/
//! postgres_exporter_queries.yaml against two databases of the test cluster
//! (the same key class in both) after a known workload, and every pg_fence
//! series it serves matches the views it was read from.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pg_fence_tests::*;

const DB: &str = "pg_fence_exporter";
const OTHER_DB: &str = "pg_fence_exporter_b";
const EXPORTER_PORT: u16 = 28897;

struct Exporter(Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_exporter() -> Exporter {
    let queries = repository_root().join("monitoring/postgres_exporter_queries.yaml");
    let child = Command::new("/usr/bin/prometheus-postgres-exporter")
        .arg(format!("--extend.query-path={}", queries.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{EXPORTER_PORT}"))
        .args(["--disable-default-metrics", "--disable-settings-metrics"])
        // Two databases of one server: the exporter's own server-wide
        // collectors would serve their series twice (and fail the scrape).
        .args(["--no-collector.database", "--no-collector.bgwriter"])
        .env(
            "DATA_SOURCE_NAME",
            [DB, OTHER_DB]
                .map(|db| {
                    format!(
                        "postgresql://postgres@127.0.0.1:{}/{db}?sslmode=disable",
                        port()
                    )
                })
                .join(","),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus-postgres-exporter (scripts/setup.sh installs it)");
    Exporter(child)
}

/// GET /metrics; None while the exporter is not listening yet.
fn scrape() -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", EXPORTER_PORT)).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response.split_once("\r\n\r\n")?.1.to_owned())
}

/// The pg_fence series: `name{labels without server}` → value.
fn series(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|line| line.starts_with("pg_fence_"))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            let name = name
                .replace(&format!(",server=\"127.0.0.1:{}\"", port()), "")
                .replace(&format!("server=\"127.0.0.1:{}\",", port()), "")
                .replace(&format!("{{server=\"127.0.0.1:{}\"}}", port()), "");
            Some((name, value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_exporter_serves_the_views() {
    let other = fresh_database(OTHER_DB).await;
    other
        .batch_execute("CREATE EXTENSION pg_fence")
        .await
        .unwrap();
    // The same class in the other database: its series must not collide.
    for _ in 0..2 {
        acquire(&other, "order:1", "1 minute", Some("b"), "0")
            .await
            .unwrap()
            .unwrap();
    }
    let db = fresh_database(DB).await;
    db.batch_execute(
        "CREATE EXTENSION pg_fence;
         CREATE TABLE orders (id int PRIMARY KEY, fence_token bigint);
         SELECT fence.protect('orders', key_column => 'id', key_prefix => 'order:', token_column => 'fence_token');",
    )
    .await
    .unwrap();
    // The workload: three grants and releases, one busy call, one lease
    // left live, two refused writes, one session waiting.
    for i in 0..3 {
        let token = acquire(&db, &format!("order:{i}"), "1 minute", None, "0")
            .await
            .unwrap()
            .unwrap();
        assert!(release(&db, &format!("order:{i}"), token).await.unwrap());
    }
    let token = acquire(&db, "order:9", "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        acquire(&db, "order:9", "1 minute", None, "0")
            .await
            .unwrap(),
        None
    );
    for stale in [token - 1, token + 1] {
        let (state, _) =
            expect_error(&db, &format!("INSERT INTO orders VALUES (9, {stale})")).await;
        assert_eq!(state, "FN001");
    }
    let waiter = connect_to_database(port(), "postgres", DB).await;
    let pid = backend_pid(&waiter).await;
    let waiting =
        tokio::spawn(
            async move { acquire(&waiter, "order:9", "1 minute", None, "20 seconds").await },
        );
    until_waiting(&db, pid).await;
    for _ in 0..200 {
        if count(&db, "SELECT count(*) FROM fence.waiters").await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let _exporter = start_exporter();
    let mut found = HashMap::new();
    for _ in 0..100 {
        if let Some(body) = scrape() {
            found = series(&body);
            if found.contains_key(
                "pg_fence_lock_acquires{datname=\"pg_fence_exporter\",key_class=\"order\"}",
            ) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let get = |name: &str| {
        *found
            .get(name)
            .unwrap_or_else(|| panic!("{name} not served; got {found:#?}"))
    };

    // Every counter of fence.lock_stats, as the view has it now.
    let row = db
        .query_one(
            "SELECT * FROM fence.lock_stats WHERE key_class = 'order'",
            &[],
        )
        .await
        .unwrap();
    for column in [
        "acquires",
        "grants",
        "regrants",
        "contended",
        "busy",
        "timeouts",
        "renewals",
        "renewals_lost",
        "releases",
        "releases_lost",
        "forced",
        "expirations",
        "stale_writes",
    ] {
        let value: i64 = row.get(column);
        assert_eq!(
            get(&format!(
                "pg_fence_lock_{column}{{datname=\"pg_fence_exporter\",key_class=\"order\"}}"
            )),
            value as f64,
            "{column}"
        );
    }
    assert_eq!(
        get("pg_fence_lock_acquires{datname=\"pg_fence_exporter\",key_class=\"order\"}"),
        5.0
    );
    assert_eq!(
        get("pg_fence_lock_stale_writes{datname=\"pg_fence_exporter\",key_class=\"order\"}"),
        2.0
    );
    // The histogram: each bucket as the view counts it, and the total.
    for bucket in db
        .query(
            "SELECT le::text, count FROM fence.lock_wait_histogram WHERE key_class = 'order' AND le < 'Infinity'",
            &[],
        )
        .await
        .unwrap()
    {
        let (le, count): (String, i64) = (bucket.get(0), bucket.get(1));
        let name = format!("pg_fence_lock_wait_seconds_bucket{{datname=\"pg_fence_exporter\",key_class=\"order\",le=\"{le}\"}}");
        assert_eq!(get(&name), count as f64, "{name}");
    }
    assert_eq!(
        get("pg_fence_lock_wait_seconds_bucket{datname=\"pg_fence_exporter\",key_class=\"order\",le=\"+Inf\"}"),
        5.0
    );
    assert_eq!(
        get("pg_fence_lock_wait_seconds_count{datname=\"pg_fence_exporter\",key_class=\"order\"}"),
        5.0
    );
    assert_eq!(
        get("pg_fence_leases_live{datname=\"pg_fence_exporter\",key_class=\"order\"}"),
        1.0
    );
    assert_eq!(
        get("pg_fence_waiters_waiting{datname=\"pg_fence_exporter\",key_class=\"order\"}"),
        1.0
    );
    assert_eq!(
        get(
            "pg_fence_protected_table_refused_writes{datname=\"pg_fence_exporter\",tbl=\"orders\"}"
        ),
        2.0
    );
    assert_eq!(
        get("pg_fence_protected_table_enforced{datname=\"pg_fence_exporter\",tbl=\"orders\"}"),
        1.0
    );
    let other_acquires =
        "pg_fence_lock_acquires{datname=\"pg_fence_exporter_b\",key_class=\"order\"}";
    assert_eq!(get(other_acquires), 2.0, "the other database's own count");
    assert_eq!(
        get("pg_fence_lock_regrants{datname=\"pg_fence_exporter_b\",key_class=\"order\"}"),
        1.0
    );
    assert!(get("pg_fence_stats_classes_used{datname=\"pg_fence_exporter\"}") >= 1.0);

    assert!(release(&db, "order:9", token).await.unwrap());
    assert!(waiting.await.unwrap().unwrap().is_some());
}
