//! The Lua scripts that make each pipeline step atomic, one file each.
//!
//! Every script is loaded with `lib.lua`'s helpers in front of it, and run
//! by `EVALSHA` (falling back to `EVAL` after a Redis restart empties the
//! script cache). All of their keys share one hash tag (see `keys.rs`).

use redis::Script;

const LIB: &str = include_str!("lib.lua");

fn with_lib(body: &str) -> Script {
    Script::new(&format!("{LIB}\n{body}"))
}

pub struct Scripts {
    pub submit: Script,
    pub finish: Script,
    pub retry: Script,
    pub dead: Script,
    pub promote: Script,
    pub trim: Script,
    pub cancel: Script,
    pub reap_consumers: Script,
    pub dispatch: Script,
    pub rate_limit: Script,
    pub replay: Script,
    pub quota: Script,
    pub promote_webhooks: Script,
    pub settle_webhook: Script,
    pub reconcile_admitted: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Scripts {
            submit: with_lib(include_str!("submit.lua")),
            finish: with_lib(include_str!("finish.lua")),
            retry: with_lib(include_str!("retry.lua")),
            dead: with_lib(include_str!("dead.lua")),
            promote: with_lib(include_str!("promote.lua")),
            trim: with_lib(include_str!("trim.lua")),
            cancel: with_lib(include_str!("cancel.lua")),
            reap_consumers: with_lib(include_str!("reap_consumers.lua")),
            dispatch: with_lib(include_str!("dispatch.lua")),
            rate_limit: with_lib(include_str!("rate_limit.lua")),
            replay: with_lib(include_str!("replay.lua")),
            quota: with_lib(include_str!("quota.lua")),
            promote_webhooks: with_lib(include_str!("promote_webhooks.lua")),
            settle_webhook: with_lib(include_str!("settle_webhook.lua")),
            reconcile_admitted: with_lib(include_str!("reconcile_admitted.lua")),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}
