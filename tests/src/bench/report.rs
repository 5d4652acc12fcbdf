//! The results file: a JSON document (every number) and a Markdown table
//! (the ratios against the targets of DESIGN §14).

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub case: String,
    pub measured: String,
    pub target: String,
    /// `None` when the row has no target.
    pub met: Option<bool>,
}

impl Row {
    pub fn new(case: &str, measured: String, target: &str, met: Option<bool>) -> Self {
        Self { case: case.into(), measured, target: target.into(), met }
    }
}

/// Renders the Markdown table.
pub fn markdown(title: &str, context: &str, rows: &[Row]) -> String {
    let mut out = format!("# {title}\n\n{context}\n\n| case | measured | target | met |\n|---|---|---|---|\n");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        let _ = writeln!(out, "| {} | {} | {} | {met} |", r.case, r.measured, r.target);
    }
    out
}

/// Every row must carry a measured value; used by the smoke mode.
pub fn all_measured(json: &Value) -> Result<(), String> {
    fn walk(v: &Value, path: &str) -> Result<(), String> {
        match v {
            Value::Null => Err(format!("{path} has no value")),
            Value::Number(n) if n.as_f64().is_some_and(|f| !f.is_finite()) => Err(format!("{path} is not finite")),
            Value::Object(m) => m.iter().try_for_each(|(k, v)| walk(v, &format!("{path}.{k}"))),
            Value::Array(a) if a.is_empty() => Err(format!("{path} is empty")),
            Value::Array(a) => a.iter().enumerate().try_for_each(|(i, v)| walk(v, &format!("{path}[{i}]"))),
            _ => Ok(()),
        }
    }
    walk(json, "results")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_and_checks() {
        let md = markdown("t", "c", &[Row::new("a", "1.0×".into(), "≥ 0.9×", Some(true)), Row::new("b", "2".into(), "", None)]);
        assert!(md.contains("| a | 1.0× | ≥ 0.9× | yes |"));
        assert!(all_measured(&json!({"a": 1, "b": {"c": [1.5]}})).is_ok());
        assert!(all_measured(&json!({"a": null})).unwrap_err().contains("results.a"));
        assert!(all_measured(&json!({"a": []})).is_err());
    }
}
