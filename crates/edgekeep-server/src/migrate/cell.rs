//! SQLite values converted to the type of the PostgreSQL column they go
//! into: SQLite keeps booleans and times as INTEGER and the project ids of a
//! token as a JSON array in TEXT, where PostgreSQL has BOOLEAN, BIGINT and
//! BIGINT[].

use bytes::BytesMut;
use rusqlite::types::ValueRef;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// Conversion of a SQLite value into one PostgreSQL column type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Conversion {
    Bool,
    Int2,
    Int4,
    Int8,
    Float8,
    Text,
    Int8Array,
}

impl Conversion {
    /// Returns the conversion into `ty`, or `None` for a type that no
    /// edgekeep table uses.
    pub(super) fn for_type(ty: &Type) -> Option<Conversion> {
        let conversion = match *ty {
            Type::BOOL => Conversion::Bool,
            Type::INT2 => Conversion::Int2,
            Type::INT4 => Conversion::Int4,
            Type::INT8 => Conversion::Int8,
            Type::FLOAT8 => Conversion::Float8,
            Type::TEXT | Type::VARCHAR => Conversion::Text,
            Type::INT8_ARRAY => Conversion::Int8Array,
            _ => return None,
        };
        Some(conversion)
    }

    /// Converts one SQLite value. The error describes the value and the
    /// reason it does not fit, and the caller adds the table, row and column.
    pub(super) fn convert(self, value: ValueRef<'_>) -> Result<Cell, String> {
        let mismatch = || {
            format!(
                "holds {}, which is not {}",
                describe(value),
                self.expected()
            )
        };
        let cell = match (self, value) {
            (_, ValueRef::Null) => Cell::Null,
            (Conversion::Bool, ValueRef::Integer(0)) => Cell::Bool(false),
            (Conversion::Bool, ValueRef::Integer(1)) => Cell::Bool(true),
            (Conversion::Int2, ValueRef::Integer(v)) => {
                Cell::Int2(i16::try_from(v).map_err(|_| mismatch())?)
            }
            (Conversion::Int4, ValueRef::Integer(v)) => {
                Cell::Int4(i32::try_from(v).map_err(|_| mismatch())?)
            }
            (Conversion::Int8, ValueRef::Integer(v)) => Cell::Int8(v),
            (Conversion::Float8, ValueRef::Real(v)) => Cell::Float8(v),
            // Integers up to 2^53 convert to f64 exactly.
            (Conversion::Float8, ValueRef::Integer(v)) if v.unsigned_abs() <= 1 << 53 => {
                Cell::Float8(v as f64)
            }
            (Conversion::Text, ValueRef::Text(bytes)) => {
                let text = std::str::from_utf8(bytes).map_err(|_| mismatch())?;
                Cell::Text(text.to_string())
            }
            (Conversion::Int8Array, ValueRef::Text(bytes)) => {
                Cell::Int8Array(serde_json::from_slice(bytes).map_err(|_| mismatch())?)
            }
            _ => return Err(mismatch()),
        };
        Ok(cell)
    }

    fn expected(self) -> &'static str {
        match self {
            Conversion::Bool => "a boolean (0 or 1)",
            Conversion::Int2 => "a 16-bit integer",
            Conversion::Int4 => "a 32-bit integer",
            Conversion::Int8 => "a 64-bit integer",
            Conversion::Float8 => "a number",
            Conversion::Text => "UTF-8 text",
            Conversion::Int8Array => "a JSON array of integers",
        }
    }
}

/// Describes a SQLite value for an error, without its content for text and
/// blobs, which may be long.
fn describe(value: ValueRef<'_>) -> String {
    match value {
        ValueRef::Null => "NULL".to_string(),
        ValueRef::Integer(v) => format!("the integer {v}"),
        ValueRef::Real(v) => format!("the real {v}"),
        ValueRef::Text(bytes) => format!("a text of {} bytes", bytes.len()),
        ValueRef::Blob(bytes) => format!("a blob of {} bytes", bytes.len()),
    }
}

/// One converted value, ready for a binary `COPY`.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cell {
    Null,
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float8(f64),
    Text(String),
    Int8Array(Vec<i64>),
}

impl ToSql for Cell {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // Each variant comes from `Conversion::for_type` of this column's
        // type, so the inner value always matches `ty`.
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Bool(value) => value.to_sql(ty, out),
            Cell::Int2(value) => value.to_sql(ty, out),
            Cell::Int4(value) => value.to_sql(ty, out),
            Cell::Int8(value) => value.to_sql(ty, out),
            Cell::Float8(value) => value.to_sql(ty, out),
            Cell::Text(value) => value.to_sql(ty, out),
            Cell::Int8Array(value) => value.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        Conversion::for_type(ty).is_some()
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_become_booleans() {
        let bool = Conversion::Bool;
        assert_eq!(bool.convert(ValueRef::Integer(1)), Ok(Cell::Bool(true)));
        assert_eq!(bool.convert(ValueRef::Integer(0)), Ok(Cell::Bool(false)));
        let error = bool.convert(ValueRef::Integer(2)).unwrap_err();
        assert_eq!(
            error,
            "holds the integer 2, which is not a boolean (0 or 1)"
        );
    }

    #[test]
    fn json_text_becomes_bigint_array() {
        let array = Conversion::Int8Array;
        assert_eq!(
            array.convert(ValueRef::Text(b"[3,17]")),
            Ok(Cell::Int8Array(vec![3, 17]))
        );
        let error = array.convert(ValueRef::Text(b"3,17")).unwrap_err();
        assert_eq!(
            error,
            "holds a text of 4 bytes, which is not a JSON array of integers"
        );
    }

    #[test]
    fn null_stays_null_for_every_type() {
        for conversion in [
            Conversion::Bool,
            Conversion::Int8,
            Conversion::Float8,
            Conversion::Text,
            Conversion::Int8Array,
        ] {
            assert_eq!(conversion.convert(ValueRef::Null), Ok(Cell::Null));
        }
    }

    #[test]
    fn out_of_range_integers_rejected() {
        let error = Conversion::Int4
            .convert(ValueRef::Integer(1 << 40))
            .unwrap_err();
        assert!(error.contains("32-bit"), "{error}");
        assert_eq!(
            Conversion::Float8.convert(ValueRef::Integer(5)),
            Ok(Cell::Float8(5.0))
        );
        assert!(
            Conversion::Float8
                .convert(ValueRef::Integer(i64::MAX))
                .is_err()
        );
    }

    #[test]
    fn blobs_rejected_with_size() {
        let error = Conversion::Text
            .convert(ValueRef::Blob(&[1, 2, 3]))
            .unwrap_err();
        assert_eq!(error, "holds a blob of 3 bytes, which is not UTF-8 text");
    }

    #[test]
    fn unknown_types_have_no_conversion() {
        assert_eq!(Conversion::for_type(&Type::TIMESTAMPTZ), None);
    }
}
