//! rate-check: the pipeline's admission point.
//!
//! Every image passes here first, and this handler admits every image. The
//! stage's own work, which speaks Redis (per-vendor quotas, parking each
//! image in its vendor's queue, weighted fair dispatch), is the pipeline's
//! `admission` module, run by rate-check's runner.

use async_trait::async_trait;
use image_queue_pipeline::{ImageEvent, Outcome, Stage, StageError, StageName};
use serde::{Deserialize, Serialize};

use crate::StageContext;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateCheckConfig {}

impl RateCheckConfig {
    pub fn build(&self, _ctx: StageContext) -> Result<RateCheckStage, std::convert::Infallible> {
        Ok(RateCheckStage {})
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
