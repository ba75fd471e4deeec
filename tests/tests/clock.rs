//! G5, one clock: a ttl is an exact duration, judged by the server's clock,
//! whatever the session's TimeZone.

use pg_fence_tests::*;

/// A POSIX time zone in which a DST change (one hour forward) happens two
/// hours from now on the server's clock, so that calendar arithmetic on
/// `now + '1 day'` gives 23 hours. None in the last hours of the year.
async fn zone_with_a_dst_change_ahead(db: &Client) -> Option<String> {
    let row = db
        .query_one(
            "SELECT extract(doy FROM now() AT TIME ZONE 'UTC')::int - 1,
                    extract(hour FROM now() AT TIME ZONE 'UTC')::int",
            &[],
        )
        .await
        .unwrap();
    let (day, hour): (i32, i32) = (row.get(0), row.get(1));
    let start_hour = hour + 2;
    let start_day = day + start_hour / 24;
    let end_day = start_day + 3;
    (end_day <= 364).then(|| format!("AAA0BBB,{start_day}/{},{end_day}/0", start_hour % 24))
}

#[tokio::test]
async fn a_day_is_24_hours_across_a_dst_change_in_the_sessions_time_zone() {
    let db = connect().await;
    let Some(zone) = zone_with_a_dst_change_ahead(&db).await else {
        eprintln!("skipped: too close to the end of the year for the time zone rule");
        return;
    };
    db.batch_execute(&format!("SET TimeZone = '{zone}'"))
        .await
        .unwrap();
    // The zone really does make calendar arithmetic lose an hour.
    let calendar: f64 = db
        .query_one(
            "SELECT extract(epoch FROM (now() + interval '1 day') - now())::float8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(calendar, 82_800.0, "{zone}");

    let key = unique_key("dst");
    let seconds = |sql: &'static str| {
        let db = &db;
        let key = key.clone();
        async move { db.query_one(sql, &[&key]).await.unwrap().get::<_, f64>(0) }
    };
    db.execute("SELECT fence.lock_acquire($1, '1 day')", &[&key])
        .await
        .unwrap();
    let lease = seconds(
        "SELECT extract(epoch FROM expires_at - acquired_at)::float8 FROM fence.locks WHERE lock_key = $1",
    )
    .await;
    assert_eq!(lease, 86_400.0);
    let token = live_token(&db, &key).await.unwrap();
    // Renewed with the lease's own ttl, and with an explicit one.
    for renew in [
        "SELECT fence.lock_renew($1, $2)",
        "SELECT fence.lock_renew($1, $2, '1 day')",
    ] {
        let before: f64 = db
            .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
            .await
            .unwrap()
            .get(0);
        let expires: f64 = db
            .query_one(
                &format!("SELECT extract(epoch FROM ({renew}))::float8"),
                &[&key, &token],
            )
            .await
            .unwrap()
            .get(0);
        let length = expires - before;
        assert!(
            (86_400.0..86_401.0).contains(&length),
            "{renew}: {length} seconds"
        );
    }
}

#[tokio::test]
async fn a_ttl_with_months_is_refused_so_it_cannot_pass_the_max_as_less() {
    let db = connect().await;
    let key = unique_key("months");
    // 1000 months - 29999 days "is" one day by the 30-day month, and 437
    // days by the calendar.
    for ttl in ["1000 months -29999 days", "1 mon", "1 year -364 days"] {
        let (state, message) =
            expect_error(&db, &format!("SELECT fence.lock_acquire('{key}', '{ttl}')")).await;
        assert_eq!(state, "22023", "{ttl}: {message}");
        assert!(message.contains("months"), "{message}");
    }
    let token = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let (state, _) = expect_error(
        &db,
        &format!("SELECT fence.lock_renew('{key}', {token}, '1000 months -29999 days')"),
    )
    .await;
    assert_eq!(state, "22023");
    // Days and hours that add up to a valid duration are fine.
    let expires_in: f64 = db
        .query_one(
            "SELECT extract(epoch FROM fence.lock_renew($1, $2, '1 day -23 hours') - clock_timestamp())::float8",
            &[&key, &token],
        )
        .await
        .unwrap()
        .get(0);
    assert!((3_599.0..=3_600.0).contains(&expires_in), "{expires_in}");
}
