//! W3C trace context (`traceparent`) for jobs: one job is one trace.
//!
//! The API takes a caller's `traceparent` header when it is valid and makes
//! one otherwise; every image event of the job carries it from stage to
//! stage, and the runner's spans record its trace id, so a job's log lines
//! across every worker can be found by one id (and exported to a tracing
//! backend later without changing the events).

/// A fresh `traceparent`: version 00, random trace and parent ids, sampled.
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let parent: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{parent:016x}-01")
}

/// The trace id of a valid `traceparent`, or `None`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    // Version ff is invalid; a future version may append fields, 00 may not.
    let ok = hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && hex(trace, 32)
        && nonzero(trace)
        && hex(parent, 16)
        && nonzero(parent)
        && hex(flags, 2);
    ok.then_some(trace)
}

/// The caller's `traceparent` if valid, else a new one.
pub fn accept_or_new(given: Option<&str>) -> String {
    match given.map(str::trim) {
        Some(t) if trace_id(t).is_some() => t.to_string(),
        _ => new_traceparent(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_traceparents_are_kept_and_others_replaced() {
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(given), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(accept_or_new(Some(given)), given);
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
            let made = accept_or_new(Some(bad));
            assert!(trace_id(&made).is_some(), "{made}");
        }
        assert_ne!(new_traceparent(), new_traceparent());
    }
}
