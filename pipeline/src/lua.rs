//! Loads the Lua scripts in `scripts/` once per process: each with the
//! statuses' tables and `lib.lua`'s helpers in front (and, for the test
//! suite, `track_keys.lua` first). Runs none of them: each script's one
//! typed call in `scripts/` does, through [`Scripts`]' fields, which are
//! not public outside this crate.

use redis::Script;

const LIB: &str = include_str!("scripts/lib.lua");
const TRACK_KEYS: &str = include_str!("scripts/track_keys.lua");

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

/// Every script, loaded once per process. Only the typed calls in
/// `scripts/` run them (the fields are not public).
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
            submit: s(include_str!("scripts/submit.lua")),
            finish: s(include_str!("scripts/finish.lua")),
            retry: s(include_str!("scripts/retry.lua")),
            dead: s(include_str!("scripts/dead.lua")),
            promote: s(include_str!("scripts/promote.lua")),
            trim: s(include_str!("scripts/trim.lua")),
            cancel: s(include_str!("scripts/cancel.lua")),
            reap_consumers: s(include_str!("scripts/reap_consumers.lua")),
            dispatch: s(include_str!("scripts/dispatch.lua")),
            rate_limit: s(include_str!("scripts/rate_limit.lua")),
            replay: s(include_str!("scripts/replay.lua")),
            quota: s(include_str!("scripts/quota.lua")),
            promote_webhooks: s(include_str!("scripts/promote_webhooks.lua")),
            settle_webhook: s(include_str!("scripts/settle_webhook.lua")),
            reconcile_admitted: s(include_str!("scripts/reconcile_admitted.lua")),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}
