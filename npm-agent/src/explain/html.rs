//! One self-contained HTML page of what policies allow: for each cluster state (a section),
//! the pods-by-pods matrix of each port and protocol, colored, every cell carrying its
//! explanation ([`explain`]) which the page shows beside the matrix when the cell is clicked
//! (or named in the address: `report.html#cell-12`); the policies listed with each section.
//! No external resource: the page opens from a file, offline.

use std::fmt::Write as _;
use std::net::IpAddr;

use serde::Serialize;

use crate::compile::explain::{Explainer, Explanation};
use crate::model::{ObjectKey, Protocol};
use crate::state::ClusterState;

/// One port and protocol probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub port: u16,
    pub protocol: Protocol,
}

/// One cluster state of the page, with the probes to draw.
pub struct Section<'a> {
    pub title: String,
    pub state: &'a ClusterState,
    pub probes: Vec<Probe>,
}

/// The most pods a matrix draws (a page of 200×200 cells per probe is already large).
pub const MAX_PODS: usize = 200;

/// One cell's data, as the page's script reads it.
#[derive(Serialize)]
struct Cell<'a> {
    from: String,
    to: String,
    probe: String,
    explanation: &'a Explanation,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The endpoint pods of a state with their addresses, by name (at most [`MAX_PODS`]).
fn pods(state: &ClusterState) -> (Vec<(ObjectKey, IpAddr)>, usize) {
    let all: Vec<(ObjectKey, IpAddr)> = state
        .pods
        .values()
        .filter(|p| p.is_endpoint())
        .filter_map(|p| Some((p.key.clone(), p.ip?)))
        .collect();
    let n = all.len();
    (all.into_iter().take(MAX_PODS).collect(), n)
}

fn policy_summary(state: &ClusterState, out: &mut String) {
    let _ = writeln!(out, "<h3>Policies</h3>");
    if state.policies.is_empty() {
        let _ =
            writeln!(out, "<p class=\"none\">No NetworkPolicy: every connection is allowed.</p>");
        return;
    }
    let _ = writeln!(out, "<ul class=\"policies\">");
    for p in state.policies.values() {
        let mut types = Vec::new();
        if let Some(r) = &p.ingress {
            types.push(format!(
                "Ingress ({} rule{})",
                r.len(),
                if r.len() == 1 { "" } else { "s" }
            ));
        }
        if let Some(r) = &p.egress {
            types.push(format!("Egress ({} rule{})", r.len(), if r.len() == 1 { "" } else { "s" }));
        }
        let _ = writeln!(
            out,
            "<li><b>{}</b>: selects <code>{}</code> in {}; {}</li>",
            escape(&p.key.to_string()),
            escape(&p.pod_selector.to_string()),
            escape(&p.key.namespace),
            escape(&types.join(", "))
        );
    }
    let _ = writeln!(out, "</ul>");
}

const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 1em; color: #222; }
#layout { display: flex; gap: 2em; align-items: flex-start; }
#sections { flex: 0 1 auto; }
#explanation { position: sticky; top: 1em; flex: 1 1 30em; max-width: 40em; border: 1px solid #ccc; border-radius: 6px; padding: 0.5em 1em; background: #fafafa; white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.85em; }
table.matrix { border-collapse: collapse; margin: 0.5em 0 1.5em; }
table.matrix th { font-weight: normal; font-size: 0.8em; padding: 2px 4px; }
table.matrix thead th { writing-mode: vertical-rl; transform: rotate(180deg); }
table.matrix td { width: 1.6em; height: 1.6em; text-align: center; cursor: pointer; border: 1px solid #fff; font-size: 0.8em; }
td.allow { background: #7bc67b; }
td.deny { background: #e06666; color: #fff; }
td.self { opacity: 0.5; }
td.selected { outline: 3px solid #1a4fd6; }
.legend span { display: inline-block; padding: 0 0.5em; margin-right: 0.5em; }
"#;

const SCRIPT: &str = r#"
function side(label, s) {
  let who = s.pod ? `${s.pod.namespace}/${s.pod.name} (${s.ip})` : s.ip;
  let t = `${label} of ${who}: ${s.allowed ? 'allowed' : 'DENIED'}` + (s.node ? `, judged on node ${s.node}` : '') + `\n  ${s.reason}\n`;
  if (s.policies.length) t += `  selected by: ${s.policies.map(p => p.namespace + '/' + p.name).join(', ')}\n`;
  if (s.cluster_policies && s.cluster_policies.length) t += `  ClusterNetworkPolicies: ${s.cluster_policies.join(', ')}\n`;
  for (const r of s.admitted_by) t += `  admitted by: ${r.policy.namespace}/${r.policy.name} ${r.peer}` + (r.port ? ` and ${r.port}` : '') + '\n';
  return t;
}
function show(id) {
  const c = CELLS[id];
  if (!c) return;
  document.querySelectorAll('td.selected').forEach(td => td.classList.remove('selected'));
  const td = document.querySelector(`td[data-id="${id}"]`);
  if (td) td.classList.add('selected');
  const e = c.explanation;
  const panel = document.getElementById('explanation');
  panel.dataset.cell = id;
  panel.textContent = `${c.from} -> ${c.to} ${c.probe}: ${e.allowed ? 'ALLOWED' : 'DENIED'}\n\n` + side('egress', e.egress) + '\n' + side('ingress', e.ingress);
}
document.querySelectorAll('td[data-id]').forEach(td => {
  td.addEventListener('click', () => { show(td.dataset.id); history.replaceState(null, '', '#cell-' + td.dataset.id); });
});
if (location.hash.startsWith('#cell-')) show(location.hash.slice(6));
"#;

/// The page.
pub fn render(title: &str, sections: &[Section]) -> String {
    let mut cells: Vec<Cell> = Vec::new();
    let mut explanations: Vec<Explanation> = Vec::new();
    let mut body = String::new();
    // Explanations first (the cells borrow them).
    struct Drawn {
        section: usize,
        probe: usize,
        pods: Vec<(ObjectKey, IpAddr)>,
        total: usize,
    }
    let mut drawn = Vec::new();
    for (si, s) in sections.iter().enumerate() {
        let (pods, total) = pods(s.state);
        let mut explainer = Explainer::new(s.state);
        for (pi, probe) in s.probes.iter().enumerate() {
            for (_, src) in &pods {
                for (_, dst) in &pods {
                    explanations.push(explainer.explain(*src, *dst, probe.protocol, probe.port));
                }
            }
            drawn.push(Drawn { section: si, probe: pi, pods: pods.clone(), total });
        }
    }
    let mut next = 0;
    let mut last_section = None;
    for d in &drawn {
        let s = &sections[d.section];
        if last_section != Some(d.section) {
            if let Some(last) = last_section {
                policy_summary(sections[last].state, &mut body);
                let _ = writeln!(body, "</section>");
            }
            let _ = writeln!(body, "<section><h2>{}</h2>", escape(&s.title));
            if d.total > d.pods.len() {
                let _ = writeln!(body, "<p>The first {} of {} pods.</p>", d.pods.len(), d.total);
            }
            last_section = Some(d.section);
        }
        let probe = s.probes[d.probe];
        let probe_name = format!("{}/{}", probe.protocol, probe.port);
        let _ = writeln!(body, "<h3>{probe_name}</h3>");
        let _ = writeln!(
            body,
            "<table class=\"matrix\" data-probe=\"{probe_name}\"><thead><tr><th>from \\ to</th>"
        );
        for (k, _) in &d.pods {
            let _ = write!(body, "<th>{}</th>", escape(&k.to_string()));
        }
        let _ = writeln!(body, "</tr></thead><tbody>");
        for (sk, src) in &d.pods {
            let _ = write!(body, "<tr><th>{}</th>", escape(&sk.to_string()));
            for (dk, dst) in &d.pods {
                let e = &explanations[next];
                let class = match (e.allowed, src == dst) {
                    (true, false) => "allow",
                    (true, true) => "allow self",
                    (false, _) => "deny",
                };
                let _ = write!(
                    body,
                    "<td class=\"{class}\" data-id=\"{next}\" data-from=\"{}\" data-to=\"{}\" data-probe=\"{probe_name}\" data-allowed=\"{}\" title=\"{} -> {} {probe_name}\">{}</td>",
                    escape(&sk.to_string()),
                    escape(&dk.to_string()),
                    e.allowed,
                    escape(&sk.to_string()),
                    escape(&dk.to_string()),
                    if e.allowed { "✓" } else { "✗" }
                );
                cells.push(Cell {
                    from: sk.to_string(),
                    to: dk.to_string(),
                    probe: probe_name.clone(),
                    explanation: e,
                });
                next += 1;
            }
            let _ = writeln!(body, "</tr>");
        }
        let _ = writeln!(body, "</tbody></table>");
    }
    if let Some(last) = last_section {
        policy_summary(sections[last].state, &mut body);
        let _ = writeln!(body, "</section>");
    }
    // `</` inside a script ends it: escaped in the data.
    let data = serde_json::to_string(&cells).expect("cells serialize").replace("</", "<\\/");
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>{STYLE}</style></head>\n<body>\n<h1>{t}</h1>\n<p class=\"legend\"><span class=\"allow\" style=\"background:#7bc67b\">✓ allowed</span><span style=\"background:#e06666;color:#fff\">✗ denied</span> Click a cell for why (the verdict of each side, the policies selecting each end, the rules admitting it).</p>\n<div id=\"layout\"><div id=\"sections\">\n{body}</div>\n<aside id=\"explanation\">Click a cell.</aside></div>\n<script>const CELLS = {data};\n{SCRIPT}</script>\n</body></html>\n",
        t = escape(title)
    )
}
