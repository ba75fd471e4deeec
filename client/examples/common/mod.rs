// Shared by the examples: a pool on the cluster `make demo`/`make test`
// start (PGFENCE_PORT, default 28815).
pub fn pool() -> deadpool_postgres::Pool {
    let mut config = deadpool_postgres::Config::new();
    config.host = Some("127.0.0.1".into());
    config.port = Some(
        std::env::var("PGFENCE_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(28815),
    );
    config.user = Some("postgres".into());
    config.dbname = Some("pg_fence".into());
    config
        .create_pool(
            Some(deadpool_postgres::Runtime::Tokio1),
            tokio_postgres::NoTls,
        )
        .expect("pool")
}
