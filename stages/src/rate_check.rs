//! rate-check: the pipeline's admission point.
//!
//! Every image passes here first. For now it admits every image; per-vendor
//! quotas (deferring, never failing, an image whose vendor is over quota)
//! and weighted fair dispatch build on this stage.

use async_trait::async_trait;
use image_queue_pipeline::{ImageEvent, Outcome, Stage, StageError, StageName};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateCheckConfig {}

impl RateCheckConfig {
    pub fn build(&self) -> RateCheckStage {
        RateCheckStage {}
    }
}

pub struct RateCheckStage {}

#[async_trait]
impl Stage for RateCheckStage {
    fn name(&self) -> StageName {
        StageName::RateCheck
    }

    async fn handle(&self, event: ImageEvent) -> Result<Outcome, StageError> {
        Ok(Outcome::Done(event))
    }
}
