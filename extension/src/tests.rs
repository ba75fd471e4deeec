//! In-backend tests (`cargo pgrx test`): the logic one session can see. Races
//! between sessions, crashes and roles are tested from outside in `tests/`.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::args::interval_micros;
    use crate::errors::{make_sqlstate, FenceError};
    use crate::key::check_key;

    #[pg_test]
    fn sqlstates_encode_like_postgres() {
        assert_eq!(
            make_sqlstate(b"22023"),
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32
        );
        assert_eq!(
            make_sqlstate(b"22004"),
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED as i32
        );
        assert_eq!(
            make_sqlstate(b"42501"),
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32
        );
        assert_eq!(
            make_sqlstate(b"25000"),
            PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE as i32
        );
    }

    #[pg_test]
    fn intervals_order_like_postgres() {
        let micros = |text: &str| {
            let interval: pgrx::datum::Interval =
                Spi::get_one(&format!("SELECT '{text}'::interval"))
                    .unwrap()
                    .unwrap();
            interval_micros(&interval)
        };
        assert_eq!(micros("30 seconds"), 30_000_000);
        assert_eq!(micros("1 day -1 hour"), 23 * 3_600_000_000);
        assert_eq!(micros("1 mon"), 30 * 86_400_000_000);
        assert_eq!(micros("-5 ms"), -5_000);
        assert_eq!(micros("0"), 0);
    }

    #[pg_test]
    fn key_checks_name_the_argument() {
        let check_key = |value| check_key("f", value).map_err(|failure| failure.error);
        assert_eq!(check_key(Some("a")), Ok("a"));
        assert_eq!(
            check_key(None),
            Err(FenceError::NullArgument {
                function: "f",
                argument: "lock_key"
            })
        );
        let long = "k".repeat(1025);
        let error = check_key(Some(&long)).unwrap_err();
        assert_eq!(error.sqlstate(), "22023");
        assert!(
            error.message().contains("1025 bytes"),
            "{}",
            error.message()
        );
        assert_eq!(check_key(Some("")).unwrap_err().sqlstate(), "22023");
        let longest = "k".repeat(1024);
        assert_eq!(check_key(Some(&longest)), Ok(longest.as_str()));
    }

    #[pg_test]
    fn wait_events_are_stable_and_in_the_extension_class() {
        let event = crate::wait::wait_event_for("invoice:42");
        assert_eq!(event, crate::wait::wait_event_for("invoice:42"));
        assert_eq!(event & 0xFF00_0000, pg_sys::PG_WAIT_EXTENSION);
        assert_ne!(event, crate::wait::wait_event_for("invoice:43"));
    }

    #[pg_test]
    fn acquire_release_and_tokens_in_one_session() {
        let token = |sql: &str| Spi::get_one::<i64>(sql).unwrap();
        let first =
            token("SELECT token FROM fence.lock_acquire('t:a', '10 seconds', 'me')").unwrap();
        // Busy for anyone else.
        assert_eq!(
            Spi::get_one::<bool>("SELECT fence.lock_acquire('t:a', '10 seconds', 'you') IS NULL")
                .unwrap(),
            Some(true)
        );
        // G6: the same holder gets the same token back.
        assert_eq!(
            token("SELECT token FROM fence.lock_acquire('t:a', '20 seconds', 'me')"),
            Some(first)
        );
        // Tokens are global: another key gets a larger one.
        let other = token("SELECT token FROM fence.lock_acquire('t:b')").unwrap();
        assert!(other > first);
        assert_eq!(
            Spi::get_one::<bool>(&format!(
                "SELECT fence.lock_release('t:a', {})",
                first + 1000
            ))
            .unwrap(),
            Some(false)
        );
        assert_eq!(
            Spi::get_one::<bool>(&format!("SELECT fence.lock_release('t:a', {first})")).unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one::<bool>(&format!("SELECT fence.lock_release('t:a', {first})")).unwrap(),
            Some(false)
        );
        assert_eq!(token("SELECT fence.current_token('t:a')"), Some(first));
        let again =
            token("SELECT token FROM fence.lock_acquire('t:a', '10 seconds', 'you')").unwrap();
        assert!(again > other);
        assert_eq!(token("SELECT fence.current_token('t:a')"), Some(again));
        assert_eq!(token("SELECT fence.current_token('never-used')"), None);
    }

    #[pg_test]
    fn renew_extends_and_status_reports_the_live_lease() {
        let token = Spi::get_one::<i64>("SELECT token FROM fence.lock_acquire('t:r', '1 second')")
            .unwrap()
            .unwrap();
        let extended = Spi::get_one::<bool>(&format!(
            "SELECT fence.lock_renew('t:r', {token}, '1 hour') > clock_timestamp() + interval '59 minutes'"
        ))
        .unwrap();
        assert_eq!(extended, Some(true));
        assert_eq!(
            Spi::get_one::<i64>("SELECT (fence.lock_status('t:r')).token").unwrap(),
            Some(token)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM fence.locks WHERE lock_key = 't:r'").unwrap(),
            Some(1)
        );
        let wrong_token = format!("SELECT fence.lock_renew('t:r', {}) IS NULL", token + 1);
        assert_eq!(Spi::get_one::<bool>(&wrong_token).unwrap(), Some(true));
    }

    #[pg_test(error = "lock_acquire: invalid \"ttl\": must be greater than zero")]
    fn zero_ttl_is_rejected() {
        Spi::run("SELECT fence.lock_acquire('t:z', '0 seconds')").unwrap();
    }

    #[pg_test(error = "lock_acquire: argument \"lock_key\" must not be NULL")]
    fn null_key_is_rejected() {
        Spi::run("SELECT fence.lock_acquire(NULL)").unwrap();
    }

    #[pg_test]
    fn stale_token_messages_name_table_key_and_tokens() {
        use crate::fence::Stale;
        let error = FenceError::StaleToken {
            table: "payments".into(),
            lock_key: "payment:7".into(),
            presented: Some(41),
            why: Stale::WrongToken { live: 42 },
        };
        assert_eq!(error.sqlstate(), "FN001");
        let message = error.message();
        for part in ["payments", "payment:7", "41", "42"] {
            assert!(message.contains(part), "{message}");
        }
        let none = FenceError::StaleToken {
            table: "t".into(),
            lock_key: "k".into(),
            presented: Some(5),
            why: Stale::NoLiveLease,
        };
        assert!(
            none.message().contains("no live lease"),
            "{}",
            none.message()
        );
        assert_eq!(make_sqlstate(b"FN001"), make_sqlstate(b"FN001"));
        assert_ne!(
            make_sqlstate(b"FN001"),
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR as i32
        );
    }

    #[pg_test]
    fn fence_token_setting_parses_bigints_only() {
        Spi::run("SET LOCAL fence.token = ' 42 '").unwrap();
        assert_eq!(
            crate::settings::fence_token().map_err(|failure| failure.error),
            Ok(Some(42))
        );
        Spi::run("SET LOCAL fence.token = ''").unwrap();
        assert_eq!(
            crate::settings::fence_token().map_err(|failure| failure.error),
            Ok(None)
        );
        Spi::run("SET LOCAL fence.token = 'forty-two'").unwrap();
        assert_eq!(
            crate::settings::fence_token()
                .map_err(|failure| failure.error)
                .unwrap_err()
                .sqlstate(),
            "22023"
        );
    }
}
