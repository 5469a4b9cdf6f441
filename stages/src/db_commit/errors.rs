//! db-commit's error classes: what a database error means for the events
//! of a batch (an outage, data the database refuses, a passing conflict),
//! and how it is worded for vendors. Runs no statement.

/// What a failed write means for the events in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The database cannot be reached: no event's fault, every one waits
    /// the outage out.
    Outage,
    /// The database judged the data itself invalid (SQLSTATE classes 22
    /// and 23, MySQL's data errors, SQLite's constraints): some row of the
    /// write is at fault, and writing it again would fail the same way.
    InvalidData,
    /// Anything else (a deadlock, a serialization conflict, a lock wait
    /// timeout, a missing table): the same write may succeed later.
    Transient,
}

/// MySQL/MariaDB errors about a value, whatever SQLSTATE they carry (many
/// say HY000): not null (1048), duplicate (1062), truncated or out of range
/// (1263-1265, 1690), incorrect value (1292, 1366, 1367, 1411), invalid
/// character string (1300), no default (1364), too long (1406), foreign
/// keys (1216, 1217, 1451, 1452), check constraints (3819, 4025).
const MYSQL_DATA_ERRORS: [u16; 20] = [
    1048, 1062, 1169, 1216, 1217, 1263, 1264, 1265, 1292, 1300, 1364, 1366, 1367, 1406, 1411, 1451, 1452, 1690, 3819,
    4025,
];

/// Sorts a failed write into its [`Refusal`].
pub fn classify(e: &sqlx::Error) -> Refusal {
    if is_unreachable(e) {
        return Refusal::Outage;
    }
    let sqlx::Error::Database(d) = e else {
        return Refusal::Transient;
    };
    use sqlx::error::ErrorKind;
    if matches!(
        d.kind(),
        ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation
    ) {
        return Refusal::InvalidData;
    }
    if let Some(my) = d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        if MYSQL_DATA_ERRORS.contains(&my.number()) {
            return Refusal::InvalidData;
        }
    }
    if d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // SQLITE_MISMATCH (20), SQLITE_TOOBIG (18): the value itself.
        return match d.code().as_deref() {
            Some("18" | "20") => Refusal::InvalidData,
            _ => Refusal::Transient,
        };
    }
    // PostgreSQL's and MySQL's SQLSTATE: 22 data exception, 23 integrity
    // constraint violation.
    match d.code().as_deref().map(|c| c.get(..2)) {
        Some(Some("22" | "23")) => Refusal::InvalidData,
        _ => Refusal::Transient,
    }
}

/// The connection went away under the statement.
pub(super) fn is_connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(d) => {
            // 2006 "server has gone away", 2013 "lost connection".
            d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .is_some_and(|my| matches!(my.number(), 2006 | 2013))
        }
        _ => false,
    }
}

/// The database cannot be reached at all (down, restarting, refusing
/// connections), as opposed to refusing this write.
pub(super) fn is_unreachable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
    ) || is_connection_lost(e)
}

/// A database error as vendors may see it: its kind, without connection
/// details.
pub(super) fn short(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => format!("the database refused the write ({})", d.code().unwrap_or_default()),
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            "the database is unreachable".into()
        }
        _ => "the write failed".into(),
    }
}

/// Most characters of the database's own reason shown to a vendor.
const MAX_REASON_CHARS: usize = 300;

/// Why the database refused an event's data, as its vendor sees it: the
/// error's code and the database's own words (which name the value's
/// fault, e.g. `invalid byte sequence for encoding "UTF8": 0x00` or `Data
/// too long for column 'record_id'`), never connection details.
pub(super) fn invalid_data(e: &sqlx::Error) -> String {
    let sqlx::Error::Database(d) = e else {
        return short(e);
    };
    let code = match d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        Some(my) => format!("{}, {}", my.number(), d.code().unwrap_or_default()),
        None => d.code().unwrap_or_default().into_owned(),
    };
    let reason: String = d
        .message()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON_CHARS)
        .collect();
    format!("the database refused this image's data ({code}): {reason}")
}
