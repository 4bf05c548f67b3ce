//! The HCN calls on Windows (compiled only there): [`WindowsHcn`] implements [`Hcn`] with
//! `computenetwork.dll`'s functions through the `windows` crate, on the pod network found by
//! name (Azure CNI's `azure`). Strings HCN returns are freed with `CoTaskMemFree`; its error
//! records become the error's message. Not run on this project's CI (no Windows host): it
//! is compiled and linted for `x86_64-pc-windows-gnu`, and the logic above it runs against
//! the host model.

use std::ffi::c_void;

use windows::Win32::System::Com::CoTaskMemFree;
use windows::Win32::System::HostComputeNetwork as hcn;
use windows::core::{GUID, HSTRING, PCWSTR, PWSTR};

use super::hcn::{Hcn, HcnError, parse};

/// Takes a string HCN allocated (and frees it).
fn take(p: PWSTR) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: HCN returns NUL-terminated UTF-16 strings allocated with CoTaskMemAlloc.
    let s = unsafe { p.to_string() }.ok();
    unsafe { CoTaskMemFree(Some(p.0 as *const c_void)) };
    s
}

/// A call's failure, with HCN's error record when it gave one.
fn failure(call: &'static str, e: windows::core::Error, record: PWSTR) -> HcnError {
    let detail = take(record).unwrap_or_default();
    HcnError::new(call, format!("{e} {detail}").trim().to_string())
}

fn guid(call: &'static str, id: &str) -> Result<GUID, HcnError> {
    GUID::try_from(id.trim_matches(|c| c == '{' || c == '}'))
        .map_err(|e| HcnError::new(call, format!("bad ID {id:?}: {e}")))
}

/// HCN's query documents (schema 2.0).
const QUERY_ALL: &str = r#"{"SchemaVersion":{"Major":2,"Minor":0},"Flags":0}"#;

fn query_by(filter: &serde_json::Value) -> String {
    serde_json::json!({"SchemaVersion": {"Major": 2, "Minor": 0}, "Flags": 0, "Filter": filter.to_string()})
        .to_string()
}

/// An open HCN network handle.
struct Network(*mut c_void);

impl Drop for Network {
    fn drop(&mut self) {
        // SAFETY: the handle came from HcnOpenNetwork and is closed once.
        let _ = unsafe { hcn::HcnCloseNetwork(self.0) };
    }
}

// SAFETY: HCN handles may be used from any thread.
unsafe impl Send for Network {}

/// HCN on Windows, on one network.
pub struct WindowsHcn {
    network: Network,
    network_id: String,
}

impl WindowsHcn {
    /// Opens the network named `name` (Azure CNI's is `azure`).
    pub fn open(name: &str) -> Result<Self, HcnError> {
        const CALL: &str = "HcnEnumerateNetworks";
        let query = HSTRING::from(query_by(&serde_json::json!({"Name": name})));
        let mut out = PWSTR::null();
        let mut record = PWSTR::null();
        // SAFETY: valid query string and out pointers.
        unsafe { hcn::HcnEnumerateNetworks(PCWSTR(query.as_ptr()), &mut out, Some(&mut record)) }
            .map_err(|e| failure(CALL, e, record))?;
        let ids: Vec<String> = parse(CALL, &take(out).unwrap_or_else(|| "[]".into()))?;
        let id = ids
            .into_iter()
            .next()
            .ok_or_else(|| HcnError::new(CALL, format!("no HCN network named {name:?}")))?;
        const OPEN: &str = "HcnOpenNetwork";
        let g = guid(OPEN, &id)?;
        let mut handle: *mut c_void = std::ptr::null_mut();
        let mut record = PWSTR::null();
        // SAFETY: a valid GUID and out pointers.
        unsafe { hcn::HcnOpenNetwork(&g, &mut handle, Some(&mut record)) }
            .map_err(|e| failure(OPEN, e, record))?;
        Ok(Self { network: Network(handle), network_id: id })
    }

    fn with_endpoint<T>(
        &self,
        id: &str,
        f: impl FnOnce(*mut c_void) -> Result<T, HcnError>,
    ) -> Result<T, HcnError> {
        const OPEN: &str = "HcnOpenEndpoint";
        let g = guid(OPEN, id)?;
        let mut handle: *mut c_void = std::ptr::null_mut();
        let mut record = PWSTR::null();
        // SAFETY: a valid GUID and out pointers.
        unsafe { hcn::HcnOpenEndpoint(&g, &mut handle, Some(&mut record)) }
            .map_err(|e| failure(OPEN, e, record))?;
        let r = f(handle);
        // SAFETY: the handle came from HcnOpenEndpoint and is closed once.
        let _ = unsafe { hcn::HcnCloseEndpoint(handle) };
        r
    }
}

impl Hcn for WindowsHcn {
    fn query_network(&mut self) -> Result<String, HcnError> {
        const CALL: &str = "HcnQueryNetworkProperties";
        let query = HSTRING::from(QUERY_ALL);
        let mut out = PWSTR::null();
        let mut record = PWSTR::null();
        // SAFETY: an open handle, a valid query and out pointers.
        unsafe {
            hcn::HcnQueryNetworkProperties(
                self.network.0,
                PCWSTR(query.as_ptr()),
                &mut out,
                Some(&mut record),
            )
        }
        .map_err(|e| failure(CALL, e, record))?;
        take(out).ok_or_else(|| HcnError::new(CALL, "no properties"))
    }

    fn modify_network(&mut self, request: &str) -> Result<(), HcnError> {
        const CALL: &str = "HcnModifyNetwork";
        let settings = HSTRING::from(request);
        let mut record = PWSTR::null();
        // SAFETY: an open handle and a valid settings string.
        unsafe {
            hcn::HcnModifyNetwork(self.network.0, PCWSTR(settings.as_ptr()), Some(&mut record))
        }
        .map_err(|e| failure(CALL, e, record))
    }

    fn endpoint_ids(&mut self) -> Result<Vec<String>, HcnError> {
        const CALL: &str = "HcnEnumerateEndpoints";
        let query =
            HSTRING::from(query_by(&serde_json::json!({"VirtualNetwork": self.network_id})));
        let mut out = PWSTR::null();
        let mut record = PWSTR::null();
        // SAFETY: a valid query and out pointers.
        unsafe { hcn::HcnEnumerateEndpoints(PCWSTR(query.as_ptr()), &mut out, Some(&mut record)) }
            .map_err(|e| failure(CALL, e, record))?;
        parse(CALL, &take(out).unwrap_or_else(|| "[]".into()))
    }

    fn query_endpoint(&mut self, id: &str) -> Result<String, HcnError> {
        const CALL: &str = "HcnQueryEndpointProperties";
        self.with_endpoint(id, |handle| {
            let query = HSTRING::from(QUERY_ALL);
            let mut out = PWSTR::null();
            let mut record = PWSTR::null();
            // SAFETY: an open handle, a valid query and out pointers.
            unsafe {
                hcn::HcnQueryEndpointProperties(
                    handle,
                    PCWSTR(query.as_ptr()),
                    &mut out,
                    Some(&mut record),
                )
            }
            .map_err(|e| failure(CALL, e, record))?;
            take(out).ok_or_else(|| HcnError::new(CALL, "no properties"))
        })
    }

    fn modify_endpoint(&mut self, id: &str, request: &str) -> Result<(), HcnError> {
        const CALL: &str = "HcnModifyEndpoint";
        self.with_endpoint(id, |handle| {
            let settings = HSTRING::from(request);
            let mut record = PWSTR::null();
            // SAFETY: an open handle and a valid settings string.
            unsafe { hcn::HcnModifyEndpoint(handle, PCWSTR(settings.as_ptr()), Some(&mut record)) }
                .map_err(|e| failure(CALL, e, record))
        })
    }
}
