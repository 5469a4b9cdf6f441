//! The Lua scripts that make each pipeline step atomic, one file each.
//!
//! Every script is loaded with `lib.lua`'s helpers in front of it, and run
//! by `EVALSHA` (falling back to `EVAL` after a Redis restart empties the
//! script cache). All of their keys share one hash tag (see `keys.rs`),
//! and every key a script touches is one its caller passed in KEYS: no
//! script builds a key. The test suite runs them with `track_keys.lua` in
//! front, which fails a call that names any other key.

pub use crate::lua::{tracking_keys, with_lib, Scripts};

pub mod cancel;
pub mod dead;
pub mod dispatch;
pub mod finish;
pub mod promote;
pub mod promote_webhooks;
pub mod quota;
pub mod rate_limit;
pub mod reap_consumers;
pub mod reconcile_admitted;
pub mod replay;
pub mod retry;
pub mod settle_webhook;
pub mod submit;
pub mod trim;

pub use cancel::{CancelJob, Cancelled};
pub use dead::{DeadLetter, DeadLettered};
pub use dispatch::{Committed, Dispatch, Plan, Planned};
pub use finish::{Finish, FinishBatch, Finished};
pub use promote::{PromoteRetries, Promoted};
pub use promote_webhooks::PromoteWebhooks;
pub use quota::{ChargeQuotas, Charged};
pub use rate_limit::SpendRateLimits;
pub use reap_consumers::ReapConsumers;
pub use reconcile_admitted::{ReconcileAdmitted, Reconciled};
pub use replay::{ReplayDeadLetter, ReplayOutcome};
pub use retry::{ScheduleRetry, Scheduled, Waiting};
pub use settle_webhook::SettleWebhook;
pub use submit::{RecordJob, Recorded};
pub use trim::TrimAcknowledged;

/// A yes/no argument as the scripts read it ('1' or '0').
pub(crate) fn flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}
