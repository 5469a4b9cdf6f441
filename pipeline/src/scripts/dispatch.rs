//! `dispatch.lua`'s one typed call: moves waiting images downstream in
//! weighted round-robin while the admission window has room. The only Rust
//! code that knows that script's KEYS and ARGV order; every key comes from
//! `keys.rs`.
//!
//! The script runs twice per pass, so that it is given every key it
//! touches: [`Dispatch::plan`] reads which jobs the head vendors' images
//! belong to, and [`Dispatch::commit`] moves exactly those images.

use std::collections::BTreeSet;

use crate::context::Pipeline;
use crate::event::StageName;
use crate::now_ms;

/// A dispatch over `head`, the head of the vendor ring as the caller read
/// it, with at most `window` images in flight downstream.
pub struct Dispatch<'a> {
    pub head: &'a [String],
    pub window: u64,
}

/// What a plan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// The ring's head changed since the caller read it: read again.
    Raced,
    /// Nothing to move (no room, or empty queues).
    Nothing { vendors_waiting: u64 },
    /// Images to move: the head vendors it reached, their queues' lengths,
    /// and the jobs of the images they give.
    Plan(Plan),
}

/// A plan for [`Dispatch::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub vendors_waiting: u64,
    budget: i64,
    /// Per head vendor reached, in ring order: its queue's length.
    queue_lengths: Vec<i64>,
    jobs: BTreeSet<String>,
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The state changed since the plan: read again.
    Raced,
    Moved {
        moved: u64,
        vendors_waiting: u64,
    },
}

impl Dispatch<'_> {
    /// Reads what a dispatch would move; writes nothing.
    pub async fn plan(&self, p: &Pipeline) -> redis::RedisResult<Planned> {
        let reply: Vec<redis::Value> = self
            .invocation(p, "plan", self.head)
            .invoke_async(&mut p.conn.clone())
            .await?;
        let int = |v: &redis::Value| redis::from_redis_value_ref::<i64>(v);
        let status = reply.first().map(int).transpose()?.unwrap_or(-1);
        if status < 0 {
            return Ok(Planned::Raced);
        }
        let vendors_waiting = reply.get(1).map(int).transpose()?.unwrap_or(0).max(0) as u64;
        if reply.len() == 2 {
            return Ok(Planned::Nothing { vendors_waiting });
        }
        let budget = int(&reply[2])?;
        // Per head vendor: its queue's length, the n images it gives, and
        // the jobs of those n.
        let mut queue_lengths = Vec::new();
        let mut jobs = BTreeSet::new();
        let mut rest = reply[3..].iter();
        while let (Some(len), Some(n)) = (rest.next(), rest.next()) {
            queue_lengths.push(int(len)?);
            for _ in 0..int(n)? {
                let id: String = redis::from_redis_value_ref(rest.next().unwrap_or(&redis::Value::Nil))?;
                jobs.insert(id);
            }
        }
        if jobs.is_empty() {
            return Ok(Planned::Nothing { vendors_waiting });
        }
        Ok(Planned::Plan(Plan {
            vendors_waiting,
            budget,
            queue_lengths,
            jobs,
        }))
    }

    /// Moves the images `plan` read, or fewer (another dispatcher took
    /// some first).
    pub async fn commit(&self, p: &Pipeline, plan: &Plan) -> redis::RedisResult<Committed> {
        // The commit covers the vendors the plan reached, no others: a
        // vendor it had not read would look empty to it.
        let reached = &self.head[..plan.queue_lengths.len().min(self.head.len())];
        let mut call = self.invocation(p, "commit", reached);
        for job in &plan.jobs {
            call.key(p.keys.job(job));
        }
        call.arg(plan.budget).arg(&plan.queue_lengths[..]);
        let (moved, waiting): (i64, i64) = call.invoke_async(&mut p.conn.clone()).await?;
        Ok(match u64::try_from(moved) {
            Err(_) => Committed::Raced,
            Ok(moved) => Committed::Moved {
                moved,
                vendors_waiting: waiting.max(0) as u64,
            },
        })
    }

    fn invocation<'s>(&self, p: &'s Pipeline, mode: &str, head: &[String]) -> redis::ScriptInvocation<'s> {
        let keys = &p.keys;
        let mut call = p.scripts.dispatch.prepare_invoke();
        call.key(keys.vendor_ring())
            .key(keys.admitted())
            .key(keys.vendor_weights())
            .key(keys.vendor_round());
        for v in head {
            call.key(keys.vendor_queue(v));
        }
        for s in StageName::ADMITTED {
            call.key(keys.stream(s));
        }
        call.arg(mode)
            .arg(self.window)
            .arg(now_ms())
            .arg(keys.progress_channel());
        call.arg(head.len()).arg(head);
        call.arg(StageName::ADMITTED.len());
        for s in StageName::ADMITTED {
            call.arg(s.as_str());
        }
        call
    }
}
