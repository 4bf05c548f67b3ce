//! Applying on Windows (compiled only there). Not implemented yet: [`HnsDataplane`] keeps the
//! plan and builds the requests of [`super::translate`], and says at run time that the HNS
//! calls are missing. What the calls will be (as Azure NPM makes them through hcsshim):
//! - `HcnModifyNetwork` on the pod network with a `PolicyNetworkRequest` of SetPolicies
//!   (request types Add, Update, Remove; IPSETs before the NESTEDIPSETs naming them, removed in
//!   the reverse order);
//! - for each endpoint whose ACLs changed, `HcnOpenEndpoint` (its ID found by
//!   `HcnEnumerateEndpoints` and the endpoint's IP) and `HcnModifyEndpoint` with request type
//!   Update and the endpoint's whole ACL list (other policy types kept first), as Azure NPM's
//!   `removePolicyByEndpointID` does;
//! - ACLs before the sets they stop using are removed, sets after.

use crate::dataplane::{Dataplane, DataplaneError};
use crate::plan::{Plan, PlanDiff};

use super::translate::{HnsPolicies, translate};

/// The HNS dataplane: the plan and its translation; no HNS calls yet.
#[derive(Default)]
pub struct HnsDataplane {
    plan: Plan,
}

impl HnsDataplane {
    /// What HNS would receive now.
    pub fn requests(&self) -> HnsPolicies {
        translate(&self.plan)
    }
}

impl Dataplane for HnsDataplane {
    fn name(&self) -> &'static str {
        "hns"
    }

    fn apply(&mut self, diff: &PlanDiff) -> Result<(), DataplaneError> {
        self.plan.apply(diff).map_err(|message| DataplaneError::Apply {
            dataplane: "hns",
            operation: "apply".into(),
            message,
        })?;
        Err(DataplaneError::Unsupported {
            dataplane: "hns",
            reason: "the HNS calls (HcnModifyNetwork, HcnModifyEndpoint) are not implemented yet"
                .into(),
        })
    }

    fn reconcile(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        self.plan = plan.clone();
        Err(DataplaneError::Unsupported {
            dataplane: "hns",
            reason: "the HNS calls (HcnModifyNetwork, HcnModifyEndpoint) are not implemented yet"
                .into(),
        })
    }
}
