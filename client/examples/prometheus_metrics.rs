//! The client's metrics (feature `metrics`) exported to Prometheus by
//! `metrics-exporter-prometheus`, checked against a known workload: the
//! example serves `/metrics` on a local port, runs three leases to the end,
//! one busy acquire and one lease that an admin forces away, then scrapes
//! its own endpoint and asserts the series. `make test` runs it.
//!
//!     cargo run -p pg_fence_client --features deadpool-postgres,metrics --example prometheus_metrics

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use pg_fence_client::{Lease, LeaseOptions, LossReason};

mod common;

/// GET /metrics from the exporter's listener, as Prometheus would.
fn scrape(address: SocketAddr) -> String {
    let mut stream = TcpStream::connect(address).expect("connect to the exporter");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.contains(" 200 "), "{head}");
    body.to_owned()
}

/// The value of one series (`name{labels}` exactly as exposed), if present.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address: SocketAddr = "127.0.0.1:28899".parse()?;
    // Histograms as Prometheus histograms (buckets), not summaries.
    PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets_for_metric(
            Matcher::Prefix("pg_fence_client_".into()),
            &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0],
        )?
        .install()?;

    let pool = common::pool();
    let run = uuid_like();
    let options = LeaseOptions::new(Duration::from_secs(3));

    // Three leases, acquired and released.
    for i in 0..3 {
        let lease = Lease::try_acquire(&pool, &format!("metrics-{run}:{i}"), &options)
            .await?
            .expect("a free key");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(lease.release().await?);
    }
    // One busy acquire: the key is held by the lease below.
    let key = format!("metrics-{run}:forced");
    let held = Lease::try_acquire(
        &pool,
        &key,
        &options.clone().renew_every(Duration::from_millis(200)),
    )
    .await?
    .expect("a free key");
    assert!(Lease::try_acquire(&pool, &key, &options).await?.is_none());
    // Forced away by an admin: the next renewal finds it not live.
    let admin = pool.get().await?;
    admin
        .execute("SELECT fence.lock_force_release($1)", &[&key])
        .await?;
    let reason = tokio::time::timeout(Duration::from_secs(5), held.lost()).await?;
    assert_eq!(reason, LossReason::NotLive);
    drop(held);

    let body = scrape(address);
    let expect = |series: &str, expected: f64| {
        let found = value(&body, series);
        assert_eq!(found, Some(expected), "{series} in:\n{body}");
    };
    expect(
        "pg_fence_client_acquire_seconds_count{outcome=\"granted\"}",
        4.0,
    );
    expect(
        "pg_fence_client_acquire_seconds_count{outcome=\"busy\"}",
        1.0,
    );
    expect("pg_fence_client_renewals_total{outcome=\"not_live\"}", 1.0);
    expect(
        "pg_fence_client_leases_lost_total{reason=\"not_live\"}",
        1.0,
    );
    expect("pg_fence_client_leases_held", 0.0);
    expect("pg_fence_client_hold_seconds_count", 4.0);
    let held_for = value(&body, "pg_fence_client_hold_seconds_sum").unwrap_or_default();
    assert!(
        held_for >= 0.06,
        "three leases held 20 ms each at least: {held_for}"
    );

    for line in body
        .lines()
        .filter(|line| line.starts_with("pg_fence_client_") && !line.contains("_bucket"))
    {
        println!("{line}");
    }
    println!("prometheus_metrics: the scraped series match the workload");
    Ok(())
}

/// A per-run suffix, so runs do not share keys.
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}")
}
