//! Job and image statuses, spelled once. Rust code names them with
//! `JobStatus` and `ImageStatus`; every script gets the same spellings as
//! Lua tables (`lua_tables`, put in front of `lib.lua`), so no script
//! writes a status by hand.

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Queued,
    Processing,
    Completed,
    Failed,
    PartiallyFailed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Processing,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::PartiallyFailed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Processing => "processing",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::PartiallyFailed => "partially_failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|j| j.as_str() == s)
    }

    /// Whether the job has ended: nothing more happens to it.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::PartiallyFailed | JobStatus::Cancelled
        )
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one image of a job stands (the job record's `<i>:status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageStatus {
    /// Submitted, not yet admitted.
    Queued,
    /// Parked in its vendor's queue, waiting for the dispatcher.
    Waiting,
    /// In a stage (or on its way to one).
    Processing,
    /// Waiting to be tried again after a failure or an outage.
    Retrying,
    /// Waiting for its vendor's processing quota to refill.
    Throttled,
    Completed,
    Failed,
    Cancelled,
}

impl ImageStatus {
    pub const ALL: [ImageStatus; 8] = [
        ImageStatus::Queued,
        ImageStatus::Waiting,
        ImageStatus::Processing,
        ImageStatus::Retrying,
        ImageStatus::Throttled,
        ImageStatus::Completed,
        ImageStatus::Failed,
        ImageStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ImageStatus::Queued => "queued",
            ImageStatus::Waiting => "waiting",
            ImageStatus::Processing => "processing",
            ImageStatus::Retrying => "retrying",
            ImageStatus::Throttled => "throttled",
            ImageStatus::Completed => "completed",
            ImageStatus::Failed => "failed",
            ImageStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<ImageStatus> {
        ImageStatus::ALL.into_iter().find(|i| i.as_str() == s)
    }
}

impl std::fmt::Display for ImageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `JOB` (each status by its Rust name in snake case, e.g.
/// `JOB.partially_failed`), `JOB_ENDED` (the terminal ones, as a set) and
/// `IMAGE` (each image status, e.g. `IMAGE.throttled`), for the scripts.
pub fn lua_tables() -> String {
    let images: Vec<String> = ImageStatus::ALL
        .iter()
        .map(|s| format!("{0} = '{0}'", s.as_str()))
        .collect();
    let all: Vec<String> = JobStatus::ALL
        .iter()
        .map(|s| format!("{0} = '{0}'", s.as_str()))
        .collect();
    let ended: Vec<String> = JobStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| format!("{} = true", s.as_str()))
        .collect();
    format!(
        "local JOB = {{{}}}\nlocal JOB_ENDED = {{{}}}\nlocal IMAGE = {{{}}}\n",
        all.join(", "),
        ended.join(", "),
        images.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_reads_back_and_the_lua_tables_name_them_all() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
        for s in ImageStatus::ALL {
            assert_eq!(ImageStatus::parse(s.as_str()), Some(s));
        }
        let lua = lua_tables();
        assert!(lua.contains("partially_failed = 'partially_failed'"), "{lua}");
        assert!(
            lua.contains("JOB_ENDED = {completed = true, failed = true, partially_failed = true, cancelled = true}"),
            "{lua}"
        );
        assert!(lua.contains("IMAGE = {queued = 'queued', waiting = 'waiting'"), "{lua}");
    }
}
