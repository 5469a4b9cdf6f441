//! `reconcile_admitted.lua`'s one typed call: corrects the admission
//! counter from the true count of images in flight downstream of
//! rate-check. The only Rust code that knows that script's KEYS and ARGV
//! order; every key comes from `keys.rs`.

use crate::context::Pipeline;
use crate::event::StageName;

/// Count the images in flight in every stage after rate-check and set the
/// admission counter to that count if it had drifted.
pub struct ReconcileAdmitted;

/// What a reconciliation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// The counter was right.
    Agreed { in_flight: u64 },
    /// The counter had drifted and now holds `in_flight`.
    Repaired { in_flight: u64, counter_was: i64 },
    /// A stream's backlog could not be counted cheaply; nothing changed.
    Unknown,
}

impl ReconcileAdmitted {
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<Reconciled> {
        let keys = &p.keys;
        let mut call = p.scripts.reconcile_admitted.prepare_invoke();
        call.key(keys.admitted());
        for stage in StageName::ADMITTED {
            call.key(keys.stream(stage))
                .key(keys.retries(stage))
                .arg(keys.group(stage));
        }
        let (in_flight, before): (i64, i64) = call.invoke_async(&mut p.conn.clone()).await?;
        Ok(match u64::try_from(in_flight) {
            Err(_) => Reconciled::Unknown,
            Ok(n) if n as i64 == before => Reconciled::Agreed { in_flight: n },
            Ok(n) => Reconciled::Repaired {
                in_flight: n,
                counter_was: before,
            },
        })
    }
}
