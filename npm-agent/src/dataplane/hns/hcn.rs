//! The Host Compute Network (HCN) service as the HNS dataplane calls it: the five calls it
//! needs, taking and returning the JSON documents HCN takes and returns. [`Hcn`] is the seam:
//! [`super::windows::WindowsHcn`] makes the calls on Windows (`computenetwork.dll`), and
//! [`super::host::HostHcn`] models them on any host, so that the dataplane's logic (what to
//! send, in which order) runs in the golden and differential tests here.
//!
//! The documents (HCN schema 2, as hcsshim's `hcn` package writes them):
//! - a network: `{"ID": "…", "Name": "azure", "Policies": [{"Type": "SetPolicy", "Settings":
//!   {"Id", "Name", "Type": "IPSET" | "NESTEDIPSET", "Values": "a,b,…"}}, …]}`;
//! - an endpoint: `{"ID": "…", "IpConfigurations": [{"IpAddress": "10.0.0.5"}], "Policies":
//!   [{"Type": "ACL", "Settings": {…}}, {"Type": "OutBoundNAT", …}, …]}`;
//! - a change: `{"ResourceType": "Policy", "RequestType": "Add" | "Update" | "Remove",
//!   "Settings": {"Policies": […]}}` (hcsshim's `ModifyNetworkSettingRequest` and
//!   `ModifyEndpointSettingRequest`). On an endpoint, `Update` replaces its whole policy list.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A failed HCN call: which, and what HCN said (its error record, or the HRESULT).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{call}: {message}")]
pub struct HcnError {
    pub call: &'static str,
    pub message: String,
}

impl HcnError {
    pub fn new(call: &'static str, message: impl Into<String>) -> Self {
        Self { call, message: message.into() }
    }
}

/// The calls the HNS dataplane makes, on the pod network the implementation was opened on.
pub trait Hcn {
    /// `HcnQueryNetworkProperties`: the network document.
    fn query_network(&mut self) -> Result<String, HcnError>;
    /// `HcnModifyNetwork` with a change document.
    fn modify_network(&mut self, request: &str) -> Result<(), HcnError>;
    /// `HcnEnumerateEndpoints` (filtered to the network): the endpoints' IDs.
    fn endpoint_ids(&mut self) -> Result<Vec<String>, HcnError>;
    /// `HcnQueryEndpointProperties`: an endpoint document.
    fn query_endpoint(&mut self, id: &str) -> Result<String, HcnError>;
    /// `HcnModifyEndpoint` with a change document.
    fn modify_endpoint(&mut self, id: &str, request: &str) -> Result<(), HcnError>;
}

/// `RequestType` of a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestType {
    Add,
    Update,
    Remove,
}

/// A change document (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModifyRequest {
    #[serde(rename = "ResourceType")]
    pub resource_type: String,
    #[serde(rename = "RequestType")]
    pub request_type: RequestType,
    #[serde(rename = "Settings")]
    pub settings: PolicyList,
}

/// `{"Policies": […]}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyList {
    #[serde(rename = "Policies", default)]
    pub policies: Vec<Value>,
}

impl ModifyRequest {
    /// A change of policies (the only resource the dataplane changes).
    pub fn policies(request_type: RequestType, policies: Vec<Value>) -> Self {
        Self { resource_type: "Policy".into(), request_type, settings: PolicyList { policies } }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a change document serializes")
    }
}

/// The parts of a network document the dataplane reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct NetworkDoc {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Policies", default)]
    pub policies: Vec<Value>,
}

/// One `IpConfigurations` entry.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct IpConfiguration {
    #[serde(rename = "IpAddress")]
    pub ip_address: String,
}

/// The parts of an endpoint document the dataplane reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct EndpointDoc {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "IpConfigurations", default)]
    pub ip_configurations: Vec<IpConfiguration>,
    #[serde(rename = "Policies", default)]
    pub policies: Vec<Value>,
}

impl EndpointDoc {
    /// The endpoint's addresses (unparsable ones skipped).
    pub fn ips(&self) -> Vec<IpAddr> {
        self.ip_configurations.iter().filter_map(|c| c.ip_address.parse().ok()).collect()
    }
}

/// Parses a document HCN returned, naming the call on failure.
pub fn parse<T: serde::de::DeserializeOwned>(
    call: &'static str,
    json: &str,
) -> Result<T, HcnError> {
    serde_json::from_str(json).map_err(|e| HcnError::new(call, format!("unreadable reply: {e}")))
}

/// A policy's `Type`.
pub fn policy_type(p: &Value) -> &str {
    p.get("Type").and_then(Value::as_str).unwrap_or_default()
}

/// A policy's `Settings.Id`.
pub fn policy_id(p: &Value) -> &str {
    p.get("Settings").and_then(|s| s.get("Id")).and_then(Value::as_str).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_read_as_hcn_writes_them() {
        let ep: EndpointDoc = parse(
            "HcnQueryEndpointProperties",
            r#"{"ID":"6e1d","Name":"pod","HostComputeNetwork":"9a1f","SchemaVersion":{"Major":2,"Minor":0},
               "IpConfigurations":[{"IpAddress":"10.240.0.7","PrefixLength":16}],
               "Policies":[{"Type":"OutBoundNAT","Settings":{"Exceptions":["10.0.0.0/8"]}},
                           {"Type":"ACL","Settings":{"Id":"azure-acl-x","Action":"Allow","Direction":"In","Priority":222}}]}"#,
        )
        .unwrap();
        assert_eq!(ep.id, "6e1d");
        assert_eq!(ep.ips(), vec!["10.240.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(ep.policies.iter().map(policy_type).collect::<Vec<_>>(), ["OutBoundNAT", "ACL"]);
        assert_eq!(policy_id(&ep.policies[1]), "azure-acl-x");
        let r = ModifyRequest::policies(RequestType::Update, vec![]).to_json();
        assert_eq!(
            r,
            r#"{"ResourceType":"Policy","RequestType":"Update","Settings":{"Policies":[]}}"#
        );
        assert!(parse::<NetworkDoc>("HcnQueryNetworkProperties", "{").is_err());
    }
}
