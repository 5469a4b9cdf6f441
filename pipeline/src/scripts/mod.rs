//! The Lua scripts that make each pipeline step atomic, one file each.
//!
//! Every script is loaded with `lib.lua`'s helpers in front of it, and run
//! by `EVALSHA` (falling back to `EVAL` after a Redis restart empties the
//! script cache). All of their keys share one hash tag (see `keys.rs`),
//! and every key a script touches is one its caller passed in KEYS: no
//! script builds a key. The test suite runs them with `track_keys.lua` in
//! front, which fails a call that names any other key.

use redis::Script;

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

const LIB: &str = include_str!("lib.lua");
const TRACK_KEYS: &str = include_str!("track_keys.lua");

/// A yes/no argument as the scripts read it ('1' or '0').
pub(crate) fn flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

/// A script with `lib.lua` in front, the statuses' tables before that
/// (`status::lua_tables`), and `prelude` first.
pub fn with_lib(prelude: &str, body: &str) -> Script {
    let statuses = crate::status::lua_tables();
    Script::new(&format!("{prelude}\n{statuses}\n{LIB}\n{body}"))
}

/// `body` run so that naming a key not passed in KEYS is an error
/// (`track_keys.lua`), for tests.
pub fn tracking_keys(body: &str) -> Script {
    with_lib(TRACK_KEYS, body)
}

/// Every script, loaded once per process. Only the typed calls beside
/// this module run them (the fields are not public).
pub struct Scripts {
    pub(crate) submit: Script,
    pub(crate) finish: Script,
    pub(crate) retry: Script,
    pub(crate) dead: Script,
    pub(crate) promote: Script,
    pub(crate) trim: Script,
    pub(crate) cancel: Script,
    pub(crate) reap_consumers: Script,
    pub(crate) dispatch: Script,
    pub(crate) rate_limit: Script,
    pub(crate) replay: Script,
    pub(crate) quota: Script,
    pub(crate) promote_webhooks: Script,
    pub(crate) settle_webhook: Script,
    pub(crate) reconcile_admitted: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self::with_prelude("")
    }

    /// The scripts with key tracking in front (`track_keys.lua`): the test
    /// suite runs them, so a script that derives a key fails its tests.
    pub fn tracking_keys() -> Self {
        Self::with_prelude(TRACK_KEYS)
    }

    fn with_prelude(prelude: &str) -> Self {
        let s = |body: &str| with_lib(prelude, body);
        Scripts {
            submit: s(include_str!("submit.lua")),
            finish: s(include_str!("finish.lua")),
            retry: s(include_str!("retry.lua")),
            dead: s(include_str!("dead.lua")),
            promote: s(include_str!("promote.lua")),
            trim: s(include_str!("trim.lua")),
            cancel: s(include_str!("cancel.lua")),
            reap_consumers: s(include_str!("reap_consumers.lua")),
            dispatch: s(include_str!("dispatch.lua")),
            rate_limit: s(include_str!("rate_limit.lua")),
            replay: s(include_str!("replay.lua")),
            quota: s(include_str!("quota.lua")),
            promote_webhooks: s(include_str!("promote_webhooks.lua")),
            settle_webhook: s(include_str!("settle_webhook.lua")),
            reconcile_admitted: s(include_str!("reconcile_admitted.lua")),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}
