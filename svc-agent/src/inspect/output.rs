//! How every `inspect` subcommand prints (`-o table|wide|json`): aligned columns with a count
//! line at the end, or JSON (one object per row, field names in camelCase as kubectl's).

use std::fmt::Write as _;

use serde::Serialize;

/// Output format of an `inspect` subcommand (`-o`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, the most useful ones, and a count line.
    #[default]
    Table,
    /// As `table`, with every column.
    Wide,
    /// A JSON array, one object per row (stable field names, camelCase); no count line.
    Json,
}

/// A table: column headers and rows of cells, printed with every column as wide as its widest
/// cell (two spaces between columns; the last column is not padded).
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    #[must_use]
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (as many cells as headers; an empty cell is shown as `-`).
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(
            cells
                .into_iter()
                .map(|c| if c.is_empty() { "-".to_owned() } else { c })
                .collect(),
        );
    }

    /// The aligned text, then `count` on a line of its own (when not empty).
    #[must_use]
    pub fn render(&self, count: &str) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
            let mut text = String::new();
            for (i, (cell, w)) in cells.zip(&widths).enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                let _ = write!(text, "{cell:<w$}");
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        if !self.rows.is_empty() {
            line(&mut out, &mut self.headers.iter().copied());
            for row in &self.rows {
                line(&mut out, &mut row.iter().map(String::as_str));
            }
        }
        if !count.is_empty() {
            out.push_str(count);
            out.push('\n');
        }
        out
    }
}

/// `rows` as pretty JSON (an array; one object per row) with a final newline.
///
/// # Errors
/// When a row cannot be serialized (never for the row types of `inspect`).
pub fn json<T: Serialize>(rows: &[T]) -> anyhow::Result<String> {
    let mut text = serde_json::to_string_pretty(rows)?;
    text.push('\n');
    Ok(text)
}

/// `n` and the noun, singular or plural (`1 frontend`, `3 frontends`).
#[must_use]
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_empty_cells_dashed_and_counted() {
        let mut t = Table::new(&["NAME", "PORT", "NOTE"]);
        t.row(vec!["default/web".into(), "80".into(), String::new()]);
        t.row(vec!["a/b".into(), "8080".into(), "x".into()]);
        assert_eq!(
            t.render("2 rows"),
            "NAME         PORT  NOTE\ndefault/web  80    -\na/b          8080  x\n2 rows\n"
        );
        assert_eq!(Table::new(&["NAME"]).render("0 rows"), "0 rows\n");
    }

    #[test]
    fn json_is_an_array_of_camel_case_objects() {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Row {
            port_name: &'static str,
        }
        let text = json(&[Row { port_name: "http" }]).unwrap();
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, serde_json::json!([{"portName": "http"}]));
        assert_eq!(count(1, "frontend", "frontends"), "1 frontend");
        assert_eq!(count(0, "frontend", "frontends"), "0 frontends");
    }
}
