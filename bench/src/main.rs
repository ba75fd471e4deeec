//! The Rust half of `make bench` (the shell scripts in this directory drive
//! it and write BENCHMARKS.md). Each subcommand runs one variant for a fixed
//! time with N concurrent clients and prints one line of `name=value` pairs:
//!
//! - `cycle <variant>`: acquire + release cycles on random keys. Variants:
//!   `redis` (SET NX PX, then a Lua compare-and-delete, the Redis docs'
//!   single-instance lock) and, through the same harness for comparison,
//!   `tokio-postgres` (`fence.lock_acquire` + `fence.lock_release`).
//! - `client <variant>`: the same cycle through the pg_fence client (`lease-sqlx`,
//!   `lease-deadpool`) and through the same SQL on the bare drivers and pools
//!   (`sqlx`, `deadpool`, and `tokio-postgres` with a connection per client).

//! - `hot-key <variant>`: every client wants one key, blocking until it gets
//!   it, and releases at once: `pg_fence` (`lock_acquire(..., wait)`) or
//!   `advisory` (`pg_advisory_lock`). Reports grants per second, how many
//!   went to another client (handoffs) and the wake-up latency of each
//!   handoff: from the moment the holder sent its release to the moment the
//!   next holder had its grant; also how long each grant's acquire call took
//!   (the wait), acquires that timed out, and the fewest and most grants any
//!   one client got. Writes the handoff latencies (µs), one per line, to
//!   `--samples FILE`.

//!
//! Connection: `PGFENCE_PORT` (default 28815) on 127.0.0.1, user postgres,
//! database pg_fence; Redis on `--redis-port`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_fence_client::{sql, Lease, LeaseOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

type AnyError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
struct Args {
    command: String,
    variant: String,
    clients: usize,
    seconds: u64,
    keys: u64,
    redis_port: u16,
    samples: Option<String>,
}

fn parse_args() -> Result<Args, AnyError> {
    let mut raw = std::env::args().skip(1);
    let command = raw.next().ok_or("usage: pg_fence_bench <cycle|client|hot-key> <variant> [--clients N] [--seconds S] [--keys K] [--redis-port P] [--samples FILE]")?;
    let variant = raw.next().ok_or("missing variant")?;
    let mut args = Args {
        command,
        variant,
        clients: 8,
        seconds: 10,
        keys: 1_000_000,
        redis_port: 28816,
        samples: None,
    };
    while let Some(flag) = raw.next() {
        let value = raw.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--clients" => args.clients = value.parse()?,
            "--seconds" => args.seconds = value.parse()?,
            "--keys" => args.keys = value.parse()?,
            "--redis-port" => args.redis_port = value.parse()?,
            "--samples" => args.samples = Some(value),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(args)
}

fn pg_config() -> String {
    let port = std::env::var("PGFENCE_PORT").unwrap_or_else(|_| "28815".into());
    format!(
        "host=127.0.0.1 port={port} user=postgres dbname=pg_fence application_name=pg_fence_bench"
    )
}

fn pg_url() -> String {
    let port = std::env::var("PGFENCE_PORT").unwrap_or_else(|_| "28815".into());
    format!("postgres://postgres@127.0.0.1:{port}/pg_fence?application_name=pg_fence_bench")
}

/// xorshift64*: a fast, dependency-free source of random keys per client.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), AnyError> {
    let args = parse_args()?;
    match args.command.as_str() {
        "cycle" | "client" => cycles(&args).await,
        "hot-key" => hot_key(&args).await,
        other => Err(format!("unknown command {other}").into()),
    }
}

// ---------------------------------------------------------------------------
// Acquire + release cycles.
// ---------------------------------------------------------------------------

/// One client's connection for a cycle variant.
enum Cycler {
    Redis(Redis, String),
    TokioPostgres(
        tokio_postgres::Client,
        tokio_postgres::Statement,
        tokio_postgres::Statement,
    ),
    Sqlx(sqlx::PgPool),
    LeaseSqlx(sqlx::PgPool),
    Deadpool(deadpool_postgres::Pool),
    LeaseDeadpool(deadpool_postgres::Pool),
}

impl Cycler {
    /// One acquire + release on `key`; false if the key was busy.
    async fn cycle(&mut self, key: &str) -> Result<bool, AnyError> {
        let options = LeaseOptions::new(Duration::from_secs(30));
        match self {
            Cycler::Redis(redis, script) => {
                let value = uuid::Uuid::new_v4().to_string();
                let set = redis
                    .command(&[
                        b"SET",
                        key.as_bytes(),
                        value.as_bytes(),
                        b"NX",
                        b"PX",
                        b"30000",
                    ])
                    .await?;
                if set == Reply::Nil {
                    return Ok(false);
                }
                let deleted = redis
                    .command(&[
                        b"EVALSHA",
                        script.as_bytes(),
                        b"1",
                        key.as_bytes(),
                        value.as_bytes(),
                    ])
                    .await?;
                Ok(deleted == Reply::Integer(1))
            }
            Cycler::TokioPostgres(client, acquire, release) => {
                let holder = uuid::Uuid::new_v4().to_string();
                let row = client
                    .query_one(&*acquire, &[&key, &30_000_f64, &holder, &0_f64])
                    .await?;
                let Some(token) = row.get::<_, Option<i64>>(0) else {
                    return Ok(false);
                };
                let released: bool = client.query_one(&*release, &[&key, &token]).await?.get(0);
                Ok(released)
            }
            Cycler::Sqlx(pool) => {
                let holder = uuid::Uuid::new_v4().to_string();
                let (token,): (Option<i64>,) = sqlx::query_as(sql::ACQUIRE)
                    .bind(key)
                    .bind(30_000_f64)
                    .bind(&holder)
                    .bind(0_f64)
                    .fetch_one(&*pool)
                    .await?;
                let Some(token) = token else {
                    return Ok(false);
                };
                let (released,): (bool,) = sqlx::query_as(sql::RELEASE)
                    .bind(key)
                    .bind(token)
                    .fetch_one(&*pool)
                    .await?;
                Ok(released)
            }
            Cycler::Deadpool(pool) => {
                let holder = uuid::Uuid::new_v4().to_string();
                let client = pool.get().await?;
                let acquire = client.prepare_cached(sql::ACQUIRE).await?;
                let row = client
                    .query_one(&acquire, &[&key, &30_000_f64, &holder, &0_f64])
                    .await?;
                drop(client);
                let Some(token) = row.get::<_, Option<i64>>(0) else {
                    return Ok(false);
                };
                let client = pool.get().await?;
                let release = client.prepare_cached(sql::RELEASE).await?;
                let released: bool = client.query_one(&release, &[&key, &token]).await?.get(0);
                Ok(released)
            }
            Cycler::LeaseSqlx(pool) => match Lease::try_acquire(&*pool, key, &options).await? {
                Some(lease) => Ok(lease.release().await?),
                None => Ok(false),
            },
            Cycler::LeaseDeadpool(pool) => match Lease::try_acquire(&*pool, key, &options).await? {
                Some(lease) => Ok(lease.release().await?),
                None => Ok(false),
            },
        }
    }
}

async fn connect_pg() -> Result<tokio_postgres::Client, AnyError> {
    let (client, connection) = tokio_postgres::connect(&pg_config(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn cyclers(args: &Args) -> Result<Vec<Cycler>, AnyError> {
    let n = args.clients;
    let pool_sqlx = || async {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(n as u32)
            .min_connections(n as u32)
            .connect(&pg_url())
            .await
    };
    let mut all = Vec::with_capacity(n);
    match (args.command.as_str(), args.variant.as_str()) {
        ("cycle", "redis") => {
            for _ in 0..n {
                let mut redis = Redis::connect(args.redis_port).await?;
                let Reply::Bulk(sha) = redis
                    .command(&[b"SCRIPT", b"LOAD", REDIS_RELEASE.as_bytes()])
                    .await?
                else {
                    return Err("SCRIPT LOAD failed".into());
                };
                all.push(Cycler::Redis(redis, String::from_utf8(sha)?));
            }
        }
        ("cycle" | "client", "tokio-postgres") => {
            for _ in 0..n {
                let client = connect_pg().await?;
                let acquire = client.prepare(sql::ACQUIRE).await?;
                let release = client.prepare(sql::RELEASE).await?;
                all.push(Cycler::TokioPostgres(client, acquire, release));
            }
        }
        ("client", "sqlx") => {
            let pool = pool_sqlx().await?;
            all.extend((0..n).map(|_| Cycler::Sqlx(pool.clone())));
        }
        ("client", "lease-sqlx") => {
            let pool = pool_sqlx().await?;
            all.extend((0..n).map(|_| Cycler::LeaseSqlx(pool.clone())));
        }
        ("client", variant @ ("deadpool" | "lease-deadpool")) => {
            let config: tokio_postgres::Config = pg_config().parse()?;
            let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
            let pool = deadpool_postgres::Pool::builder(manager)
                .max_size(n)
                .build()?;
            // Open every connection before the clock starts.
            let mut warm = Vec::with_capacity(n);
            for _ in 0..n {
                warm.push(pool.get().await?);
            }
            drop(warm);
            let lease = variant == "lease-deadpool";
            all.extend((0..n).map(|_| {
                if lease {
                    Cycler::LeaseDeadpool(pool.clone())
                } else {
                    Cycler::Deadpool(pool.clone())
                }
            }));
        }
        (command, variant) => return Err(format!("unknown variant {command} {variant}").into()),
    }
    Ok(all)
}

async fn cycles(args: &Args) -> Result<(), AnyError> {
    let all = cyclers(args).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(AtomicU64::new(0));
    let cpu_before = process_cpu_micros()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut cycler) in all.into_iter().enumerate() {
        let (stop, done, busy, keys) = (stop.clone(), done.clone(), busy.clone(), args.keys);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(i as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                let key = format!("cycle:{}", rng.below(keys) + 1);
                if cycler.cycle(&key).await? {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    busy.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, AnyError>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = process_cpu_micros()? - cpu_before;
    let done = done.load(Ordering::Relaxed);
    println!(
        "variant={} clients={} seconds={:.1} cycles={} busy={} cycles_per_s={:.0} client_cpu_us_per_cycle={:.1}",
        args.variant,
        args.clients,
        elapsed,
        done,
        busy.load(Ordering::Relaxed),
        done as f64 / elapsed,
        cpu as f64 / done.max(1) as f64
    );
    Ok(())
}

/// CPU time (user + system) this process has used, in microseconds, from
/// /proc/self/stat (clock ticks of 10 ms: enough over a run of seconds).
fn process_cpu_micros() -> Result<u64, AnyError> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').ok_or("malformed /proc/self/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).ok_or("no utime")?.parse::<u64>()?
        + fields.get(12).ok_or("no stime")?.parse::<u64>()?;
    Ok(ticks * 10_000)
}

// ---------------------------------------------------------------------------
// One hot key.
// ---------------------------------------------------------------------------

/// Who sent the last release, and when: the next grant to anyone else is a
/// handoff, and its wake-up latency runs from that moment.
struct LastRelease {
    by: usize,
    at: Instant,
}

async fn hot_key(args: &Args) -> Result<(), AnyError> {
    const KEY: &str = "bench:hot";
    let pg_fence = match args.variant.as_str() {
        "pg_fence" => true,
        "advisory" => false,
        other => return Err(format!("unknown hot-key variant {other}").into()),
    };
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let client = connect_pg().await?;
        let (acquire, release) = if pg_fence {
            (
                client
                    .prepare(
                        "SELECT (fence.lock_acquire($1, '30 seconds', $2, '10 seconds')).token",
                    )
                    .await?,
                client.prepare("SELECT fence.lock_release($1, $2)").await?,
            )
        } else {
            (
                client
                    .prepare("SELECT pg_advisory_lock(hashtext($1)::bigint)::text, $2::text")
                    .await?,
                client
                    .prepare("SELECT pg_advisory_unlock(hashtext($1)::bigint), $2::bigint")
                    .await?,
            )
        };
        clients.push((client, acquire, release));
    }
    let last: Arc<Mutex<Option<LastRelease>>> = Arc::new(Mutex::new(None));
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let grants = Arc::new(AtomicU64::new(0));
    let timeouts = Arc::new(AtomicU64::new(0));
    let waits: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let per_client: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.clients).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (me, (client, acquire, release)) in clients.into_iter().enumerate() {
        let (last, latencies, grants, stop) = (
            last.clone(),
            latencies.clone(),
            grants.clone(),
            stop.clone(),
        );
        let (timeouts, waits, per_client) = (timeouts.clone(), waits.clone(), per_client.clone());
        tasks.push(tokio::spawn(async move {
            let holder = format!("bench-{me}");
            while !stop.load(Ordering::Relaxed) {
                let asked_at = Instant::now();
                let row = client.query_one(&acquire, &[&KEY, &holder]).await?;
                let granted_at = Instant::now();
                let token: Option<i64> = if pg_fence { row.get(0) } else { Some(0) };
                let Some(token) = token else {
                    timeouts.fetch_add(1, Ordering::Relaxed);
                    continue; // waited 10 s without a grant: try again
                };
                grants.fetch_add(1, Ordering::Relaxed);
                per_client[me].fetch_add(1, Ordering::Relaxed);
                let waited = granted_at.duration_since(asked_at).as_micros() as u64;
                waits.lock().expect("not poisoned").push(waited);
                {
                    let mut last = last.lock().expect("not poisoned");
                    if let Some(previous) = last.take() {
                        if previous.by != me {
                            let micros = granted_at.duration_since(previous.at).as_micros() as u64;
                            latencies.lock().expect("not poisoned").push(micros);
                        }
                    }
                    *last = Some(LastRelease {
                        by: me,
                        at: Instant::now(),
                    });
                }
                if pg_fence {
                    let released: bool = client.query_one(&release, &[&KEY, &token]).await?.get(0);
                    if !released {
                        return Err::<(), AnyError>("release found the lease not live".into());
                    }
                } else {
                    let released: bool = client.query_one(&release, &[&KEY, &token]).await?.get(0);
                    if !released {
                        return Err("advisory unlock found no lock".into());
                    }
                }
            }
            Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut samples = std::mem::take(&mut *latencies.lock().expect("not poisoned"));
    samples.sort_unstable();
    let pct = |p: f64| -> u64 { percentile(&samples, p) };
    let grants = grants.load(Ordering::Relaxed);
    let mut waits = std::mem::take(&mut *waits.lock().expect("not poisoned"));
    waits.sort_unstable();
    let shares: Vec<u64> = per_client
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    println!(
        "variant={} wait_p50_us={} wait_p99_us={} timeouts={} fewest_grants={} most_grants={}",
        args.variant,
        percentile(&waits, 50.0),
        percentile(&waits, 99.0),
        timeouts.load(Ordering::Relaxed),
        shares.iter().min().copied().unwrap_or(0),
        shares.iter().max().copied().unwrap_or(0),
    );
    println!(
        "variant={} clients={} seconds={:.1} grants={} grants_per_s={:.0} handoffs={} handoffs_per_s={:.0} p50_us={} p90_us={} p99_us={} max_us={}",
        args.variant,
        args.clients,
        elapsed,
        grants,
        grants as f64 / elapsed,
        samples.len(),
        samples.len() as f64 / elapsed,
        pct(50.0),
        pct(90.0),
        pct(99.0),
        samples.last().copied().unwrap_or(0)
    );
    if let Some(path) = &args.samples {
        let text: String = samples.iter().map(|s| format!("{s}\n")).collect();
        std::fs::write(path, text)?;
    }
    Ok(())
}

/// Nearest-rank percentile `p` (0-100) of sorted samples; 0 if there are none.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------
// A minimal Redis (RESP2) client: enough for SET, EVALSHA and SCRIPT LOAD.
// ---------------------------------------------------------------------------

/// The compare-and-delete release from the Redis documentation.
const REDIS_RELEASE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Integer(i64),
    Bulk(Vec<u8>),
    Nil,
}

struct Redis {
    stream: BufReader<TcpStream>,
    buffer: Vec<u8>,
}

impl Redis {
    async fn connect(port: u16) -> Result<Redis, AnyError> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        Ok(Redis {
            stream: BufReader::new(stream),
            buffer: Vec::with_capacity(256),
        })
    }

    async fn command(&mut self, parts: &[&[u8]]) -> Result<Reply, AnyError> {
        self.buffer.clear();
        self.buffer
            .extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
        for part in parts {
            self.buffer
                .extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
            self.buffer.extend_from_slice(part);
            self.buffer.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&self.buffer).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let line = line.trim_end();
        let (kind, rest) = line.split_at(1.min(line.len()));
        match kind {
            "+" => Ok(Reply::Simple(rest.to_owned())),
            "-" => Err(format!("redis: {rest}").into()),
            ":" => Ok(Reply::Integer(rest.parse()?)),
            "$" => {
                let len: i64 = rest.parse()?;
                if len < 0 {
                    return Ok(Reply::Nil);
                }
                let mut data = vec![0; len as usize + 2];
                self.stream.read_exact(&mut data).await?;
                data.truncate(len as usize);
                Ok(Reply::Bulk(data))
            }
            _ => Err(format!("redis: unexpected reply {line:?}").into()),
        }
    }
}
