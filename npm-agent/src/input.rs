//! Files a user hands the agent: manifests of the file source (and its `.generation` marker),
//! conformance cases, the config file, status files. Every one of them is read with
//! [`read_file`], which neither blocks nor reads without bound, whatever the path turns out
//! to be:
//!
//! - the file is opened with `O_NONBLOCK`, so opening a FIFO (or a device) returns at once
//!   instead of waiting for a writer;
//! - what was opened is checked with `fstat` (not the path, which may have been swapped since
//!   it was listed or stat'ed): anything but a regular file is refused, naming its type;
//! - at most [`MAX_FILE_BYTES`] are read: a larger file is refused, whether its size says so
//!   or it grows while it is read.
//!
//! The objects in those files are deserialized with [`strict`]: a field the type does not
//! know is an error naming it, as with the API server's strict field validation (the
//! Kubernetes types of k8s-openapi skip unknown fields, so a misspelled `from:` would
//! otherwise vanish and leave a rule that admits everyone).

use std::fmt;
use std::fs::{File, FileType, OpenOptions};
use std::io::Read as _;
#[cfg(unix)]
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use crate::model::validate::FieldError;

/// The largest file read (64 MiB): far more than any manifest, case or config file needs,
/// small enough that a huge or endless file cannot exhaust the agent's memory.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// A file that could not be read, and why.
#[derive(Debug)]
pub struct ReadError {
    pub path: PathBuf,
    pub kind: ReadErrorKind,
}

#[derive(Debug)]
pub enum ReadErrorKind {
    /// Opening or reading failed.
    Io(std::io::Error),
    /// The path names something other than a regular file (its type).
    NotRegular(&'static str),
    /// The file holds more than the limit (the limit).
    TooLarge(u64),
    /// The file is not UTF-8 text.
    NotText,
}

impl ReadError {
    /// Whether the file does not exist.
    pub fn not_found(&self) -> bool {
        matches!(&self.kind, ReadErrorKind::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }

    /// Why, without the path.
    pub fn reason(&self) -> String {
        match &self.kind {
            ReadErrorKind::Io(e) => e.to_string(),
            ReadErrorKind::NotRegular(what) => {
                format!("not a regular file ({what}); only regular files are read")
            }
            ReadErrorKind::TooLarge(limit) if limit % (1 << 20) == 0 => {
                format!("larger than {} MiB; not read", limit >> 20)
            }
            ReadErrorKind::TooLarge(limit) => format!("larger than {limit} bytes; not read"),
            ReadErrorKind::NotText => "not UTF-8 text".to_string(),
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason())
    }
}

impl std::error::Error for ReadError {}

#[cfg(not(unix))]
fn describe(t: FileType) -> &'static str {
    if t.is_dir() { "a directory" } else { "not a file" }
}

#[cfg(unix)]
fn describe(t: FileType) -> &'static str {
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a file"
    }
}

/// Reads a regular file of at most [`MAX_FILE_BYTES`] as text. See the module documentation.
pub fn read_file(path: &Path) -> Result<String, ReadError> {
    read_file_limited(path, MAX_FILE_BYTES)
}

/// [`read_file`] with another limit.
pub fn read_file_limited(path: &Path, limit: u64) -> Result<String, ReadError> {
    let err = |kind| ReadError { path: path.to_path_buf(), kind };
    // O_NONBLOCK: opening a FIFO does not wait for a writer; O_NOCTTY: a terminal does not
    // become the agent's controlling terminal. Neither changes how a regular file reads.
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    let file: File = options.open(path).map_err(|e| err(ReadErrorKind::Io(e)))?;
    let meta = file.metadata().map_err(|e| err(ReadErrorKind::Io(e)))?;
    if !meta.file_type().is_file() {
        return Err(err(ReadErrorKind::NotRegular(describe(meta.file_type()))));
    }
    if meta.len() > limit {
        return Err(err(ReadErrorKind::TooLarge(limit)));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte more than the limit tells a file that grew past it since the fstat.
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| err(ReadErrorKind::Io(e)))?;
    if bytes.len() as u64 > limit {
        return Err(err(ReadErrorKind::TooLarge(limit)));
    }
    String::from_utf8(bytes).map_err(|_| err(ReadErrorKind::NotText))
}

/// Why an object read from a file was not deserialized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StrictError {
    /// A field that does not fit its type (the first one met).
    Invalid(FieldError),
    /// Fields the type does not know, every one of them (the object fit otherwise).
    Unknown(Vec<FieldError>),
}

impl StrictError {
    pub fn into_errors(self) -> Vec<FieldError> {
        match self {
            StrictError::Invalid(e) => vec![e],
            StrictError::Unknown(es) => es,
        }
    }
}

impl fmt::Display for StrictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = match self {
            StrictError::Invalid(e) => std::slice::from_ref(e),
            StrictError::Unknown(es) => es.as_slice(),
        };
        for (i, e) in errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The message of an unknown field, as the API server words it.
pub const UNKNOWN_FIELD: &str = "unknown field";

/// Deserializes `T`, rejecting every field `T` does not know, at any depth (see the module
/// documentation). Errors name the field as the API server prints it:
/// `spec.ingress[0].form: unknown field`.
pub fn strict<'de, D, T>(de: D) -> Result<T, StrictError>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let mut note = |path: serde_ignored::Path<'_>| {
        // Every API object has these two; types made by kube's `CustomResource` do not read
        // them (the caller checks them: the kind chose the type).
        let field = api_path(&path);
        if field != "apiVersion" && field != "kind" {
            unknown.push(field);
        }
    };
    let result = T::deserialize(serde_path_to_error::Deserializer::new(
        serde_ignored::Deserializer::new(de, &mut note),
        &mut track,
    ));
    match result {
        Err(e) => {
            let path = track.path().to_string();
            let field = if path == "." || path.is_empty() { "(object)".to_string() } else { path };
            // A YAML deserializer's own message may begin with the path (of the field's
            // parent): said once.
            let message = e.to_string();
            let message = match message.split_once(": ") {
                Some((prefix, rest))
                    if !prefix.is_empty() && !prefix.contains(' ') && field.starts_with(prefix) =>
                {
                    rest.to_string()
                }
                _ => message,
            };
            Err(StrictError::Invalid(FieldError { field, message }))
        }
        Ok(_) if !unknown.is_empty() => Err(StrictError::Unknown(
            unknown
                .into_iter()
                .map(|field| FieldError { field, message: UNKNOWN_FIELD.into() })
                .collect(),
        )),
        Ok(t) => Ok(t),
    }
}

/// `spec.ingress[0].form`, as the API server prints a field path.
fn api_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", api_path(parent)),
        Path::Map { parent, key } => match api_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => api_path(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("npm-input-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn regular_files_are_read() {
        let d = scratch("regular");
        std::fs::write(d.join("a.yaml"), "kind: Namespace\n").unwrap();
        assert_eq!(read_file(&d.join("a.yaml")).unwrap(), "kind: Namespace\n");
        let e = read_file(&d.join("missing.yaml")).unwrap_err();
        assert!(e.not_found(), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn fifos_devices_and_directories_are_refused_at_once() {
        let d = scratch("special");
        let fifo = d.join("f.yaml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_file(&fifo).unwrap_err();
        assert!(
            e.to_string().contains("f.yaml")
                && e.to_string().contains("not a regular file (a FIFO)"),
            "{e}"
        );
        let e = read_file(Path::new("/dev/zero")).unwrap_err();
        assert!(
            e.to_string().contains("/dev/zero: not a regular file (a character device)"),
            "{e}"
        );
        let e = read_file(&d).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn strict_names_every_unknown_field_and_the_first_bad_one() {
        use k8s_openapi::api::networking::v1::NetworkPolicy;
        let doc = |spec: &str| -> serde_yaml_ng::Value {
            serde_yaml_ng::from_str(&format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p}}\nspec:\n{spec}")).unwrap()
        };
        let e = strict::<_, NetworkPolicy>(doc("  podSelector: {matchLabel: {a: b}}\n  ingress:\n  - form: [{podSelector: {}}]\n    port: [{port: 80}]\n"))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.podSelector.matchLabel: unknown field; spec.ingress[0].form: unknown field; spec.ingress[0].port: unknown field"
        );
        let e = strict::<_, NetworkPolicy>(doc(
            "  podSelector: {}\n  ingress:\n  - ports: [{port: [1]}]\n",
        ))
        .unwrap_err();
        assert!(
            matches!(&e, StrictError::Invalid(f) if f.field == "spec.ingress[0].ports[0].port"),
            "{e}"
        );
        assert!(
            strict::<_, NetworkPolicy>(doc(
                "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {}}]\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn large_files_are_refused() {
        let d = scratch("large");
        let f = d.join("big.yaml");
        std::fs::write(&f, "0123456789").unwrap();
        assert!(read_file_limited(&f, 10).is_ok());
        let e = read_file_limited(&f, 9).unwrap_err();
        assert!(e.to_string().contains("big.yaml: larger than"), "{e}");
        // Sparse: the size alone refuses it, nothing is read.
        std::fs::File::create(&f).unwrap().set_len(MAX_FILE_BYTES + 1).unwrap();
        assert!(matches!(read_file(&f).unwrap_err().kind, ReadErrorKind::TooLarge(_)));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
