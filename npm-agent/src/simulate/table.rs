//! Connectivity tables: parsing the expected ones, rendering observed ones, comparing.

use serde::Serialize;

/// One cell: the connection succeeds (`.`), fails (`X`), or is not checked (`?`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Cell {
    #[serde(rename = ".")]
    Allowed,
    #[serde(rename = "X")]
    Blocked,
    #[serde(rename = "?")]
    Unchecked,
}

impl Cell {
    pub fn symbol(self) -> char {
        match self {
            Cell::Allowed => '.',
            Cell::Blocked => 'X',
            Cell::Unchecked => '?',
        }
    }

    pub fn from_allowed(allowed: bool) -> Cell {
        if allowed { Cell::Allowed } else { Cell::Blocked }
    }
}

/// A square table: rows are clients, columns servers, both named `ns/pod`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<(String, Vec<Cell>)>,
}

impl Table {
    pub fn parse(text: &str) -> Result<Table, String> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let header = lines.next().ok_or("empty table")?;
        let columns: Vec<String> = header.split_whitespace().skip(1).map(String::from).collect();
        let mut rows = Vec::new();
        for line in lines {
            let mut words = line.split_whitespace();
            let name = words.next().expect("non-empty line").to_string();
            let cells = words
                .map(|w| match w {
                    "." => Ok(Cell::Allowed),
                    "X" | "x" => Ok(Cell::Blocked),
                    "?" => Ok(Cell::Unchecked),
                    other => Err(format!("row {name}: bad cell {other:?} (expected . X or ?)")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if cells.len() != columns.len() {
                return Err(format!(
                    "row {name}: {} cells for {} columns",
                    cells.len(),
                    columns.len()
                ));
            }
            rows.push((name, cells));
        }
        Ok(Table { columns, rows })
    }

    pub fn get(&self, from: &str, to: &str) -> Option<Cell> {
        let c = self.columns.iter().position(|x| x == to)?;
        self.rows.iter().find(|(r, _)| r == from).map(|(_, cells)| cells[c])
    }

    /// Renders the table with aligned columns, `indent` before each line.
    pub fn render(&self, indent: &str) -> String {
        let width = self
            .columns
            .iter()
            .chain(self.rows.iter().map(|(r, _)| r))
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(7);
        let mut lines = Vec::new();
        let mut header = format!("{indent}{:<width$}", "from\\to");
        for c in &self.columns {
            header.push_str(&format!(" {c:<w$}", w = c.len().max(1)));
        }
        lines.push(header);
        for (name, cells) in &self.rows {
            let mut line = format!("{indent}{name:<width$}");
            for (c, cell) in self.columns.iter().zip(cells) {
                line.push_str(&format!(" {:<w$}", cell.symbol(), w = c.len().max(1)));
            }
            lines.push(line);
        }
        lines.iter().map(|l| format!("{}\n", l.trim_end())).collect()
    }
}

/// A cell where observation and expectation differ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CellDiff {
    pub from: String,
    pub to: String,
    pub expected: Cell,
    pub observed: Cell,
}

/// Checks that the expected table names exactly the present pods, then compares cells.
pub fn compare(expected: &Table, observed: &Table) -> Result<Vec<CellDiff>, String> {
    fn names(t: &Table) -> Vec<&String> {
        let mut v: Vec<&String> = t.columns.iter().collect();
        v.sort();
        v
    }
    fn rows(t: &Table) -> Vec<&String> {
        let mut v: Vec<&String> = t.rows.iter().map(|(r, _)| r).collect();
        v.sort();
        v
    }
    if names(expected) != names(observed) || rows(expected) != rows(observed) {
        return Err(format!(
            "the table must list exactly the pods present: expected table has columns [{}] and rows [{}], the cluster has [{}]",
            expected.columns.join(" "),
            expected.rows.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>().join(" "),
            observed.columns.join(" "),
        ));
    }
    let mut diffs = Vec::new();
    for (from, cells) in &expected.rows {
        for (to, want) in expected.columns.iter().zip(cells) {
            let got = observed.get(from, to).expect("same names");
            if *want != Cell::Unchecked && *want != got {
                diffs.push(CellDiff {
                    from: from.clone(),
                    to: to.clone(),
                    expected: *want,
                    observed: got,
                });
            }
        }
    }
    Ok(diffs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_render_compare() {
        let t = Table::parse("from\\to x/a x/b\nx/a . X\nx/b ? .\n").unwrap();
        assert_eq!(t.get("x/a", "x/b"), Some(Cell::Blocked));
        let observed = Table::parse(&t.render("")).unwrap();
        assert_eq!(observed.columns, t.columns);
        let obs = Table::parse("from\\to x/a x/b\nx/a . .\nx/b X .\n").unwrap();
        let d = compare(&t, &obs).unwrap();
        assert_eq!(
            d,
            vec![CellDiff {
                from: "x/a".into(),
                to: "x/b".into(),
                expected: Cell::Blocked,
                observed: Cell::Allowed
            }]
        );
        assert!(Table::parse("from\\to x/a\nx/a . .\n").is_err());
        let missing = Table::parse("from\\to x/a\nx/a .\n").unwrap();
        assert!(compare(&missing, &obs).is_err());
    }
}
