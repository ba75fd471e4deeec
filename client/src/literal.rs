//! Statements with their values written in as literals, for the sqlx
//! backend: sent with the simple query protocol, one message and one round
//! trip, they hold no prepared statement, named or unnamed, across a
//! `Sync`. So they work through a transaction pooler (PgBouncer in
//! transaction mode, whatever its version and settings), which may give
//! each of a connection's transactions to another server connection: a
//! statement prepared in one is missing in the next, or (sqlx's names are
//! the same in every connection) already there.
//!
//! Only values the client itself produces are written in: keys, holder
//! ids, tokens, durations, flags. Text goes in as an escape string
//! (`E'...'`, backslashes and quotes doubled), which reads the same
//! whatever `standard_conforming_strings` says; every value carries its
//! type, as a bound parameter would.

use crate::Error;

/// A value for one `$n` of a statement.
pub(crate) enum Literal<'a> {
    Text(&'a str),
    Int8(i64),
    OptionalInt8(Option<i64>),
    Int4(i32),
    Float8(f64),
    Bool(bool),
    TextArray(&'a [String]),
}

impl Literal<'_> {
    fn write(&self, out: &mut String) -> Result<(), Error> {
        match self {
            Literal::Text(text) => {
                text_literal(text, out)?;
                out.push_str("::text");
            }
            Literal::Int8(value) => out.push_str(&format!("'{value}'::int8")),
            Literal::OptionalInt8(Some(value)) => out.push_str(&format!("'{value}'::int8")),
            Literal::OptionalInt8(None) => out.push_str("NULL::int8"),
            Literal::Int4(value) => out.push_str(&format!("'{value}'::int4")),
            Literal::Float8(value) => out.push_str(&format!("'{value}'::float8")),
            Literal::Bool(value) => out.push_str(if *value { "true" } else { "false" }),
            Literal::TextArray(values) => {
                out.push_str("ARRAY[");
                for (i, value) in values.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    text_literal(value, out)?;
                }
                out.push_str("]::text[]");
            }
        }
        Ok(())
    }
}

/// `text` as an escape string constant. PostgreSQL text cannot hold a NUL
/// character, and the simple protocol ends a statement at one: refused.
fn text_literal(text: &str, out: &mut String) -> Result<(), Error> {
    if text.contains('\0') {
        return Err(Error::Usage(format!(
            "{text:?} contains a NUL character, which PostgreSQL text cannot hold"
        )));
    }
    out.push_str("E'");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("''"),
            c => out.push(c),
        }
    }
    out.push('\'');
    Ok(())
}

/// `template` with each `$n` replaced by `values[n - 1]` written as a
/// literal. The templates are the client's own (sql.rs), with no `$` in
/// them but placeholders.
pub(crate) fn inline(template: &str, values: &[Literal<'_>]) -> Result<String, Error> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        let number: usize = rest[at + 1..at + 1 + digits]
            .parse()
            .map_err(|_| Error::Usage(format!("a bare $ in statement {template:?}")))?;
        let value = number
            .checked_sub(1)
            .and_then(|i| values.get(i))
            .ok_or_else(|| Error::Usage(format!("no value for ${number} in {template:?}")))?;
        value.write(&mut out)?;
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{inline, Literal};

    #[test]
    fn values_are_written_as_typed_literals() {
        let keys = vec!["a".to_owned(), "it's".to_owned()];
        let text = inline(
            "SELECT f($1, $2, $3, $4, $5, $6, $7, $10)",
            &[
                Literal::Text("o'k\\x"),
                Literal::Int8(i64::MIN),
                Literal::OptionalInt8(None),
                Literal::Int4(3),
                Literal::Float8(1500.5),
                Literal::Bool(false),
                Literal::TextArray(&keys),
                Literal::Int8(0),
                Literal::Int8(0),
                Literal::Text("tenth"),
            ],
        )
        .unwrap();
        assert_eq!(
            text,
            "SELECT f(E'o''k\\\\x'::text, '-9223372036854775808'::int8, NULL::int8, '3'::int4, \
             '1500.5'::float8, false, ARRAY[E'a', E'it''s']::text[], E'tenth'::text)"
        );
    }

    #[test]
    fn a_nul_character_or_a_missing_value_is_refused() {
        assert!(inline("SELECT $1", &[Literal::Text("a\0b")]).is_err());
        assert!(inline("SELECT $2", &[Literal::Int8(1)]).is_err());
        assert!(inline("SELECT $", &[]).is_err());
    }
}
