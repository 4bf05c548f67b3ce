//! A parser of the Prometheus text exposition format (version 0.0.4), enough to check what
//! the agent serves: families with their help and type, samples with labels and values.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample's name (a summary's `_sum` and `_count` included).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// A metric family: its `# HELP`, `# TYPE` and samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Family {
    pub name: String,
    pub help: String,
    /// `counter`, `gauge`, `summary`, `histogram` or `untyped`.
    pub kind: String,
    pub samples: Vec<Sample>,
}

impl Family {
    /// The label names of its samples (the `quantile` of summaries included), each sample's
    /// set; all samples of a well-formed family have the same.
    pub fn label_names(&self) -> std::collections::BTreeSet<Vec<String>> {
        self.samples.iter().map(|s| s.labels.keys().cloned().collect()).collect()
    }
}

/// A whole exposition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.get(name)
    }

    /// Every sample named `name` whose labels include all of `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families
            .values()
            .flat_map(|f| f.samples.iter())
            .filter(move |s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
    }

    /// The value of the one sample named `name` with (at least) `labels`; `None` when there
    /// is none or more than one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.samples(name, labels);
        let first = it.next()?;
        if it.next().is_some() { None } else { Some(first.value) }
    }

    /// The sum of every sample named `name` with `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).map(|s| s.value).sum()
    }
}

/// The family a sample belongs to: its own name, or for `_sum`, `_count` and `_bucket`
/// the summary's or histogram's.
fn family_of(name: &str, families: &BTreeMap<String, Family>) -> String {
    if families.contains_key(name) {
        return name.to_string();
    }
    for suffix in ["_sum", "_count", "_bucket"] {
        if let Some(base) = name.strip_suffix(suffix)
            && families.get(base).is_some_and(|f| f.kind == "summary" || f.kind == "histogram")
        {
            return base.to_string();
        }
    }
    name.to_string()
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => s.parse().map_err(|_| format!("bad value {s:?}")),
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses `{a="x",b="y"}`; returns the labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or_else(|| format!("expected = in {rest:?}"))?;
        let name = rest[..eq].trim().to_string();
        let after = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name}: expected a quoted value"))?;
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end.ok_or_else(|| format!("label {name}: unterminated value"))?;
        if labels.insert(name.clone(), unescape(&after[..end])).is_some() {
            return Err(format!("label {name} repeated"));
        }
        rest = after[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parses an exposition; an error names the line.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let err = |e: String| format!("line {}: {e}: {line:?}", i + 1);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), help) => {
                    families
                        .entry(name.into())
                        .or_insert_with(|| Family { name: name.into(), ..Family::default() })
                        .help = help.unwrap_or_default().replace("\\n", "\n").replace("\\\\", "\\");
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    families
                        .entry(name.into())
                        .or_insert_with(|| Family { name: name.into(), ..Family::default() })
                        .kind = kind.trim().to_string();
                }
                _ => {}
            }
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let value = rest.split_whitespace().next().ok_or_else(|| err("no value".into()))?;
        let value = parse_value(value).map_err(err)?;
        let fam = family_of(name, &families);
        families
            .entry(fam.clone())
            .or_insert_with(|| Family { name: fam, kind: "untyped".into(), ..Family::default() })
            .samples
            .push(Sample { name: name.to_string(), labels, value });
    }
    Ok(Exposition { families })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_summaries_gauges_and_escapes() {
        let text = "\
# HELP s A summary
# TYPE s summary
s{a=\"x\",quantile=\"0.5\"} 1.5
s{a=\"x\",quantile=\"0.9\"} NaN
s_sum{a=\"x\"} 3
s_count{a=\"x\"} 2
# HELP g A gauge
# TYPE g gauge
g{n=\"q\\\"uote\\\\\"} 7
";
        let e = parse(text).unwrap();
        let s = e.family("s").unwrap();
        assert_eq!(
            (s.kind.as_str(), s.help.as_str(), s.samples.len()),
            ("summary", "A summary", 4)
        );
        assert_eq!(e.value("s_count", &[("a", "x")]), Some(2.0));
        assert!(e.value("s", &[("quantile", "0.9")]).unwrap().is_nan());
        assert_eq!(e.value("g", &[("n", "q\"uote\\")]), Some(7.0));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("x{a=\"1} 2").is_err());
        assert!(parse("x{a=\"1\"} two").is_err());
    }
}
