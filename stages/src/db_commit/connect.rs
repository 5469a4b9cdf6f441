//! db-commit's connection: the database's dialect, the pool and the
//! migrations in `migrations/`. Knows nothing of batches or results.

use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

/// A database URL whose scheme names no database db-commit speaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported database URL scheme {scheme:?}: use mysql://, postgres:// or sqlite://")]
pub struct UnsupportedDatabase {
    pub scheme: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    MySql,
    Postgres,
    Sqlite,
}

impl Dialect {
    pub fn of_url(url: &str) -> Result<Dialect, UnsupportedDatabase> {
        let scheme = url.split(':').next().unwrap_or("");
        match scheme {
            "mysql" | "mariadb" => Ok(Dialect::MySql),
            "postgres" | "postgresql" => Ok(Dialect::Postgres),
            "sqlite" => Ok(Dialect::Sqlite),
            // Only the scheme: the rest of the URL may hold a password.
            other => Err(UnsupportedDatabase {
                scheme: other.to_string(),
            }),
        }
    }

    /// Most bind parameters one statement may carry.
    pub(super) fn max_params(self) -> usize {
        match self {
            Dialect::MySql | Dialect::Postgres => 65_535,
            Dialect::Sqlite => 32_766,
        }
    }
}

/// Connects, applying the migrations in `migrations/`.
pub async fn connect(url: &str, max_connections: u32) -> Result<(AnyPool, Dialect), sqlx::Error> {
    connect_with(url, max_connections, Duration::from_secs(10)).await
}

pub(super) async fn connect_with(
    url: &str,
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<(AnyPool, Dialect), sqlx::Error> {
    sqlx::any::install_default_drivers();
    let dialect = Dialect::of_url(url).map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
    let url = if dialect == Dialect::MySql && url.starts_with("mariadb:") {
        url.replacen("mariadb:", "mysql:", 1)
    } else {
        url.to_string()
    };
    let pool = AnyPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(acquire_timeout)
        // A connection that died with the server (or was dropped after a
        // packet error) must not be handed out again.
        .test_before_acquire(true)
        .connect(&url)
        .await?;
    migrate(&pool).await?;
    Ok((pool, dialect))
}

pub async fn migrate(pool: &AnyPool) -> Result<(), sqlx::Error> {
    sqlx::migrate!("../migrations")
        .run(pool)
        .await
        .map_err(|e| sqlx::Error::Migrate(Box::new(e)))
}
