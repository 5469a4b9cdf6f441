//! `rate_limit.lua`'s one typed call: checks one request against several
//! sliding-window limits and records it in all or none. The only Rust code
//! that knows that script's KEYS and ARGV order; every key comes from
//! `keys.rs`.

use crate::context::Pipeline;

/// One limit a request is checked against.
#[derive(Debug, Clone)]
pub struct Spend<'a> {
    /// The limit's name and who it counts (a vendor, an address).
    pub name: &'a str,
    pub subject: &'a str,
    /// Units allowed per window.
    pub max: u64,
    pub window_ms: u64,
    /// Units this request uses; 0 only reads what is left.
    pub cost: u64,
}

/// What the limits said: whether the request was admitted (and recorded),
/// which limit refused it (index into the spends) and in how many ms it
/// could pass, and per limit the units left and the ms until its oldest
/// unit leaves the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    pub refused_by: Option<usize>,
    pub retry_after_ms: u64,
    pub left: Vec<(u64, u64)>,
}

/// Check (and, when every limit admits it, record) a request that spends
/// `spends`.
pub struct SpendRateLimits<'a> {
    pub spends: &'a [Spend<'a>],
}

impl SpendRateLimits<'_> {
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<Verdict> {
        let mut call = p.scripts.rate_limit.prepare_invoke();
        // A unique member per request, so equal timestamps do not collide.
        call.arg(hex::encode(rand::random::<[u8; 16]>()));
        for s in self.spends {
            call.key(p.keys.rate_limit(s.name, s.subject))
                .arg(s.max)
                .arg(s.window_ms)
                .arg(s.cost);
        }
        let out: Vec<i64> = call.invoke_async(&mut p.conn.clone()).await?;
        let n = self.spends.len();
        if out.len() != 3 + 2 * n {
            return Err(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "rate_limit.lua answered an unexpected shape",
                format!("{out:?}"),
            )));
        }
        let admitted = out[0] == 1;
        Ok(Verdict {
            admitted,
            refused_by: (!admitted).then(|| (out[1].max(1) as usize - 1).min(n.saturating_sub(1))),
            retry_after_ms: out[2].max(0) as u64,
            left: (0..n)
                .map(|i| (out[3 + 2 * i].max(0) as u64, out[4 + 2 * i].max(0) as u64))
                .collect(),
        })
    }
}
