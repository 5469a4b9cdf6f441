//! The events that travel the pipeline, one per image.
//!
//! Each stream entry carries one [`ImageEvent`] as compact JSON in a single
//! field. Its `kind` is the fact that put it on the stream (`ImageSubmitted`
//! on rate-check's stream, `BackgroundRemoved` on face-crop's, ...). The
//! schema is versioned by `v`; new fields are only ever added, with serde
//! defaults, so an old worker and a new one can share a stream during a
//! rolling upgrade. Image bytes never travel here: events carry blob keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The current event schema version.
pub const EVENT_VERSION: u16 = 1;

/// The stages of the pipeline, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum StageName {
    RateCheck,
    BgRemoval,
    FaceCrop,
    Resize,
    Upload,
    DbCommit,
}

impl StageName {
    pub const ALL: [StageName; 6] = [
        StageName::RateCheck,
        StageName::BgRemoval,
        StageName::FaceCrop,
        StageName::Resize,
        StageName::Upload,
        StageName::DbCommit,
    ];

    /// The stages after rate-check: an image admitted there holds an
    /// admission slot while it is in any of them.
    pub const ADMITTED: [StageName; 5] = [
        StageName::BgRemoval,
        StageName::FaceCrop,
        StageName::Resize,
        StageName::Upload,
        StageName::DbCommit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StageName::RateCheck => "rate-check",
            StageName::BgRemoval => "bg-removal",
            StageName::FaceCrop => "face-crop",
            StageName::Resize => "resize",
            StageName::Upload => "upload",
            StageName::DbCommit => "db-commit",
        }
    }

    pub fn parse(s: &str) -> Option<StageName> {
        StageName::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The operation a stage performs, for the stages a job may skip.
    pub fn operation(self) -> Option<Operation> {
        match self {
            StageName::BgRemoval => Some(Operation::BgRemoval),
            StageName::FaceCrop => Some(Operation::FaceCrop),
            StageName::Resize => Some(Operation::Resize),
            _ => None,
        }
    }

    /// The stage an image goes to after this one, skipping the operations
    /// its job did not ask for; `None` after the last stage.
    pub fn next(self, ops: &[Operation]) -> Option<StageName> {
        let pos = StageName::ALL.iter().position(|s| *s == self)?;
        StageName::ALL[pos + 1..]
            .iter()
            .copied()
            .find(|s| s.operation().is_none_or(|op| ops.contains(&op)))
    }

    /// The fact an image's event states once this stage is done with it.
    pub fn done_kind(self) -> EventKind {
        match self {
            StageName::RateCheck => EventKind::ImageAdmitted,
            StageName::BgRemoval => EventKind::BackgroundRemoved,
            StageName::FaceCrop => EventKind::FaceCropped,
            StageName::Resize => EventKind::ImageResized,
            StageName::Upload => EventKind::ImageUploaded,
            StageName::DbCommit => EventKind::ResultCommitted,
        }
    }
}

impl std::fmt::Display for StageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operation a vendor can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    BgRemoval,
    FaceCrop,
    Resize,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::BgRemoval => "bg-removal",
            Operation::FaceCrop => "face-crop",
            Operation::Resize => "resize",
        }
    }

    pub fn parse(s: &str) -> Option<Operation> {
        match s.trim() {
            "bg-removal" => Some(Operation::BgRemoval),
            "face-crop" => Some(Operation::FaceCrop),
            "resize" => Some(Operation::Resize),
            _ => None,
        }
    }
}

/// The past-tense fact an event states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    ImageSubmitted,
    ImageAdmitted,
    BackgroundRemoved,
    FaceCropped,
    ImageResized,
    ImageUploaded,
    ResultCommitted,
}

/// Where an image's original bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A vendor URL, fetched by the pipeline (never by the API handler).
    Url(String),
    /// A blob the API stored from an upload.
    Blob(String),
}

/// One produced output of an image: first a blob, then (after upload) a URL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub content_type: String,
    #[serde(default)]
    pub width: u32,
    #[serde(default)]
    pub height: u32,
    #[serde(default)]
    pub bytes: u64,
}

/// One image on its way through the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageEvent {
    pub v: u16,
    pub kind: EventKind,
    pub job: String,
    pub vendor: String,
    /// The image's index within its job.
    pub image: u32,
    pub record_id: String,
    pub ops: Vec<Operation>,
    pub source: Source,
    /// The blob holding the image as the last stage left it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working: Option<String>,
    /// Variants produced so far, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, OutputRef>,
    /// Facts stages record about the image (e.g. `face_found`, `bg_engine`).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub notes: serde_json::Map<String, serde_json::Value>,
    /// Whether the image holds one of the admission window's slots (it was
    /// dispatched by the fair scheduler); its end frees the slot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub slot: bool,
    /// Failed attempts at the current stage so far.
    #[serde(default)]
    pub attempt: u32,
    pub submitted_ms: u64,
    /// W3C trace context, so one job is one trace across stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The stream entry's field an event travels in (the scripts write it as
/// `'e'`: one letter, since it is stored with every entry).
pub const EVENT_FIELD: &str = "e";

impl ImageEvent {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events always serialize")
    }

    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admitted_stages_are_every_stage_after_rate_check() {
        let after: Vec<StageName> = StageName::ALL[1..].to_vec();
        assert_eq!(StageName::ALL[0], StageName::RateCheck);
        assert_eq!(StageName::ADMITTED.to_vec(), after);
    }

    #[test]
    fn next_skips_unrequested_operations() {
        let ops = [Operation::Resize];
        assert_eq!(StageName::RateCheck.next(&ops), Some(StageName::Resize));
        assert_eq!(StageName::Resize.next(&ops), Some(StageName::Upload));
        assert_eq!(StageName::Upload.next(&ops), Some(StageName::DbCommit));
        assert_eq!(StageName::DbCommit.next(&ops), None);
        let all = [Operation::BgRemoval, Operation::FaceCrop, Operation::Resize];
        assert_eq!(StageName::RateCheck.next(&all), Some(StageName::BgRemoval));
        assert_eq!(StageName::BgRemoval.next(&all), Some(StageName::FaceCrop));
    }

    #[test]
    fn events_accept_unknown_fields_from_newer_writers() {
        let json = r#"{"v":2,"kind":"ImageSubmitted","job":"j","vendor":"v","image":0,
            "record_id":"r","ops":["resize"],"source":{"url":"https://x/a.jpg"},
            "submitted_ms":1,"a_field_from_the_future":true}"#;
        let ev = ImageEvent::from_json(json).unwrap();
        assert_eq!(ev.attempt, 0);
        assert_eq!(ev.source, Source::Url("https://x/a.jpg".into()));
    }
}
