//! The import rules of docs/ARCHITECTURE.md ("What may import what"), checked on the
//! sources: every `crate::` and `super::` path of every module of `npm-agent/src` (in `use`
//! items, grouped or not, and inline), comments left out.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A module and what it imports (crate-rooted paths, as segments).
struct Module {
    path: Vec<String>,
    imports: BTreeSet<Vec<String>>,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` → `a::b`, `src/a/mod.rs` → `a`, `src/lib.rs` → the root.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut segs: Vec<String> =
        rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if segs.last().is_some_and(|s| s == "mod" || s == "lib" || s == "main") {
        segs.pop();
    }
    segs
}

/// The code without comments (line comments, doc comments; a `//` inside a string literal
/// such as a URL is kept when it follows a `:`).
fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let mut in_block = false;
    for line in text.lines() {
        let mut l = line;
        if in_block {
            match l.find("*/") {
                Some(i) => {
                    l = &l[i + 2..];
                    in_block = false;
                }
                None => continue,
            }
        }
        if let Some(i) = l.find("/*") {
            in_block = !l[i..].contains("*/");
            l = &l[..i];
        }
        let cut = l.match_indices("//").find(|(i, _)| *i == 0 || &l[i - 1..*i] != ":");
        if let Some((i, _)) = cut {
            l = &l[..i];
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands the path starting at `s` (after a `crate::` or `super::` prefix already in
/// `prefix`): `a::b`, `a::{b, c::{d, e}}`, `{a, b}`.
fn expand(prefix: Vec<String>, s: &str, out: &mut Vec<Vec<String>>) {
    let s = s.trim_start();
    if let Some(rest) = s.strip_prefix('{') {
        // The group up to its matching brace, split at top-level commas.
        let mut depth = 1;
        let mut start = 0;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        expand(prefix.clone(), &rest[start..i], out);
                        return;
                    }
                }
                ',' if depth == 1 => {
                    expand(prefix.clone(), &rest[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let end = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
    let seg = &s[..end];
    if seg.is_empty() || seg == "self" {
        out.push(prefix);
        return;
    }
    let mut p = prefix;
    p.push(seg.to_string());
    match s[end..].strip_prefix("::") {
        Some(rest) => expand(p, rest, out),
        None => out.push(p),
    }
}

/// Every crate-rooted path `code` names, `super::` resolved against `module` (the file's
/// module: `super` of `a::b` is `a`, whether `b` is `a/b.rs` or `a/b/mod.rs`).
fn imports(code: &str, module: &[String]) -> BTreeSet<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for (i, _) in code.match_indices("crate::").chain(code.match_indices("super::")) {
        if i > 0 && is_ident(bytes[i - 1] as char) {
            continue;
        }
        if i >= 2 && &code[i - 2..i] == "::" && code[..i].ends_with("super::") {
            // (The second `super` of `super::super::` is taken with the first.)
            continue;
        }
        let mut rest = &code[i..];
        let base: Vec<String> = if rest.starts_with("crate::") {
            rest = &rest["crate::".len()..];
            Vec::new()
        } else {
            let mut b = module.to_vec();
            while let Some(r) = rest.strip_prefix("super::") {
                b.pop();
                rest = r;
            }
            b
        };
        expand(base, rest, &mut out);
    }
    out.into_iter().filter(|p| !p.is_empty()).collect()
}

fn modules() -> Vec<Module> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    files
        .iter()
        .map(|f| {
            let path = module_path(&src, f);
            let code = strip_comments(&std::fs::read_to_string(f).expect("read"));
            let imports = imports(&code, &path);
            Module { path, imports }
        })
        .collect()
}

fn starts(p: &[String], prefix: &str) -> bool {
    let pre: Vec<&str> = prefix.split("::").collect();
    p.len() >= pre.len() && p.iter().zip(&pre).all(|(a, b)| a == b)
}

/// The dataplane a path belongs to (`dataplane::<name>`, not the shared parts).
fn dataplane_of(p: &[String]) -> Option<&str> {
    const SHARED: [&str; 3] = ["azure", "iface", "observe"];
    (p.len() >= 2 && p[0] == "dataplane" && !SHARED.contains(&p[1].as_str()))
        .then(|| p[1].as_str())
        .filter(|d| ["ebpf", "iptables", "hns"].contains(d))
}

/// Every violation of the rules, as "module imports path: rule".
fn violations(mods: &[Module]) -> Vec<String> {
    let mut v = Vec::new();
    for m in mods {
        let me = &m.path;
        let mut dataplanes: BTreeSet<&str> = BTreeSet::new();
        for imp in &m.imports {
            let mut deny = |rule: &str| {
                v.push(format!("{} imports {}: {rule}", me.join("::"), imp.join("::")))
            };
            let outside = |top: &str| starts(imp, top) && !starts(me, top);
            if starts(me, "model") && !starts(imp, "model") {
                deny("the model imports nothing of the crate");
            }
            if starts(me, "plan") && !(starts(imp, "plan") || starts(imp, "model")) {
                deny("the plan is the dataplanes' vocabulary: it imports only the model");
            }
            if starts(me, "compile")
                && !["compile", "model", "state", "plan"].iter().any(|t| starts(imp, t))
            {
                deny("the compiler imports only the model, the state and the plan");
            }
            if starts(me, "reference") && !["model", "state"].iter().any(|t| starts(imp, t)) {
                deny("the reference evaluator shares only the model and the state with the rest");
            }
            if starts(me, "dataplane")
                && ["compile", "source", "agent", "metrics", "simulate", "lab", "reference"]
                    .iter()
                    .any(|t| starts(imp, t))
            {
                deny("a dataplane renders the plan: no compiler, source, agent or metrics");
            }
            if let (Some(mine), Some(theirs)) = (dataplane_of(me), dataplane_of(imp))
                && mine != theirs
            {
                deny("dataplanes share only dataplane::{azure, iface, observe} and the trait");
            }
            if starts(me, "metrics")
                && (["plan", "compile"].iter().any(|t| starts(imp, t))
                    || dataplane_of(imp).is_some())
            {
                deny("metrics format the dataplanes' figures (dataplane::observe), not plans");
            }
            if starts(me, "source::kube") && outside("source::files")
                || starts(me, "source::files") && outside("source::kube")
            {
                deny("sources do not import each other (shared parts: source, source::object)");
            }
            if ["source", "state", "input"].iter().any(|t| starts(me, t))
                && ["dataplane", "compile", "plan", "agent", "metrics"]
                    .iter()
                    .any(|t| starts(imp, t))
            {
                deny("what feeds the compiler knows nothing of what follows it");
            }
            if let Some(d) = dataplane_of(imp) {
                dataplanes.insert(d);
            }
        }
        // (`debug` reads a node in whichever mode it runs, as `agent` cleans up after either.)
        if dataplanes.len() > 1
            && !starts(me, "agent")
            && !starts(me, "debug")
            && !starts(me, "dataplane")
        {
            v.push(format!(
                "{} names the dataplanes {dataplanes:?}: only the agent (and the debug tool, which reads either) picks between them",
                me.join("::")
            ));
        }
    }
    v
}

#[test]
fn the_sources_keep_the_import_rules() {
    let mods = modules();
    assert!(mods.len() > 40, "found only {} modules", mods.len());
    // (The scan sees the real imports: the engine's of the plan, iptables' of Azure's names.)
    let of = |m: &str| mods.iter().find(|x| x.path.join("::") == m).expect("module");
    assert!(of("compile::engine").imports.iter().any(|p| starts(p, "plan")));
    assert!(
        of("dataplane::iptables::translate").imports.iter().any(|p| starts(p, "dataplane::azure"))
    );
    let v = violations(&mods);
    assert!(v.is_empty(), "import rules broken:\n{}", v.join("\n"));
}

/// The checker finds what it is meant to find: grouped, nested, inline and `super` paths.
#[test]
fn the_checker_sees_every_kind_of_path() {
    let code = strip_comments(
        "use crate::{plan::{Plan, layout::SetDef}, compile};\n\
         // use crate::agent::x;\n\
         fn f() { crate::dataplane::azure::hash(1); super::super::metrics::x(); }\n\
         let url = \"http://x\"; use super::kernel;",
    );
    let got = imports(&code, &["dataplane".into(), "ebpf".into(), "model".into()]);
    let s: BTreeSet<String> = got.iter().map(|p| p.join("::")).collect();
    let want: BTreeSet<String> = [
        "plan::Plan",
        "plan::layout::SetDef",
        "compile",
        "dataplane::azure::hash",
        "dataplane::metrics::x",
        "dataplane::ebpf::kernel",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(s, want);
    // A planted violation is reported.
    let m = Module {
        path: vec!["dataplane".into(), "iptables".into(), "translate".into()],
        imports: [vec!["compile".to_string(), "rule_terms".to_string()]].into_iter().collect(),
    };
    let v = violations(&[m]);
    assert_eq!(v.len(), 1, "{v:?}");
}
