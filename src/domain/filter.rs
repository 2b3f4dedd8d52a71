//! A meter's `filter`: conditions on an event's `data` that must all hold for the meter
//! to count the event. One event type split into several meters by its data (`region`
//! `eu` here, `us` or `ca` there). An event that does not match is not counted and is
//! not invalid: it is simply not the meter's.
//!
//! `filter` maps a JSONPath into `data` to one condition, written `{"<op>": operand}`:
//! `eq` / `ne` (any JSON value; numbers compare by exact decimal value, so `1` equals
//! `1.0` and `"1"` does not), `in` / `nin` (a list of such values), `gt` / `gte` / `lt`
//! / `lte` (a number, compared exactly with a number or numeric string in the event;
//! anything else does not match) and `exists` (`true`: the path selects a value other
//! than null). A path the event lacks matches `ne`, `nin` and `exists: false` only.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde_json::Value;

use crate::domain::fold::parse_number;
use crate::domain::meter::{compile_path, Path};
use crate::error::FieldError;

/// The longest list `in` / `nin` take, and the most conditions a filter has.
const MAX_ITEMS: usize = 100;

#[derive(Clone, Debug)]
enum Condition {
    Eq(Value),
    Ne(Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Compare(Ordering, bool, Decimal),
    Exists(bool),
}

/// A filter compiled once per meter: each path parsed, each operand checked.
#[derive(Clone, Debug, Default)]
pub struct Filter(Vec<(Path, Condition)>);

impl Filter {
    /// Check and compile a meter's `filter` (path → `{"<op>": operand}`). Errors name
    /// the entry: `filter["$.region"].in: must be a list`.
    pub fn compile(filter: &BTreeMap<String, Value>) -> Result<Filter, FieldError> {
        if filter.len() > MAX_ITEMS {
            return Err(FieldError::new(
                "filter",
                format!("at most {MAX_ITEMS} conditions"),
            ));
        }
        let mut out = Vec::with_capacity(filter.len());
        for (path, condition) in filter {
            let field = format!("filter[{path:?}]");
            let compiled = compile_path(&field, path)?;
            let ops = condition.as_object().filter(|o| o.len() == 1).ok_or_else(|| {
                FieldError::new(
                    &field,
                    "must be one condition: {\"eq\"|\"ne\"|\"in\"|\"nin\"|\"gt\"|\"gte\"|\"lt\"|\"lte\"|\"exists\": operand}",
                )
            })?;
            let (op, operand) = ops.iter().next().expect("one entry");
            let at = format!("{field}.{op}");
            let list = || -> Result<Vec<Value>, FieldError> {
                let items = operand
                    .as_array()
                    .ok_or_else(|| FieldError::new(&at, "must be a list"))?;
                if items.is_empty() || items.len() > MAX_ITEMS {
                    return Err(FieldError::new(
                        &at,
                        format!("must have 1-{MAX_ITEMS} values"),
                    ));
                }
                items.iter().map(|v| scalar(&at, v)).collect()
            };
            let number = || {
                match operand {
                    Value::Number(_) => parse_number(operand).ok(),
                    _ => None,
                }
                .ok_or_else(|| FieldError::new(&at, "must be a number"))
            };
            let condition = match op.as_str() {
                "eq" => Condition::Eq(scalar(&at, operand)?),
                "ne" => Condition::Ne(scalar(&at, operand)?),
                "in" => Condition::In(list()?),
                "nin" => Condition::Nin(list()?),
                "gt" => Condition::Compare(Ordering::Greater, false, number()?),
                "gte" => Condition::Compare(Ordering::Greater, true, number()?),
                "lt" => Condition::Compare(Ordering::Less, false, number()?),
                "lte" => Condition::Compare(Ordering::Less, true, number()?),
                "exists" => Condition::Exists(
                    operand
                        .as_bool()
                        .ok_or_else(|| FieldError::new(&at, "must be true or false"))?,
                ),
                other => {
                    return Err(FieldError::new(
                        &field,
                        format!(
                        "unknown condition {other:?} (eq, ne, in, nin, gt, gte, lt, lte, exists)"
                    ),
                    ))
                }
            };
            out.push((compiled, condition));
        }
        Ok(Filter(out))
    }

    /// Whether every condition holds for an event's data.
    pub fn matches(&self, data: &Value) -> bool {
        self.0.iter().all(|(path, condition)| {
            let found = crate::domain::fold::first_match(path, data).filter(|v| !v.is_null());
            match (condition, found) {
                (Condition::Exists(want), found) => *want == found.is_some(),
                (Condition::Ne(_) | Condition::Nin(_), None) => true,
                (_, None) => false,
                (Condition::Eq(v), Some(f)) => same(v, f),
                (Condition::Ne(v), Some(f)) => !same(v, f),
                (Condition::In(vs), Some(f)) => vs.iter().any(|v| same(v, f)),
                (Condition::Nin(vs), Some(f)) => !vs.iter().any(|v| same(v, f)),
                (Condition::Compare(side, or_equal, bound), Some(f)) => match parse_number(f) {
                    Ok(n) => {
                        let order = n.cmp(bound);
                        order == *side || (*or_equal && order == Ordering::Equal)
                    }
                    Err(_) => false,
                },
            }
        })
    }
}

/// An operand of `eq`, `ne`, `in`, `nin`: a string, number or boolean.
fn scalar(at: &str, v: &Value) -> Result<Value, FieldError> {
    match v {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(v.clone()),
        _ => Err(FieldError::new(
            at,
            "values must be strings, numbers or booleans",
        )),
    }
}

/// Equality of an operand and an event's value: numbers by exact decimal value, the
/// rest as JSON (a string is never equal to a number).
fn same(operand: &Value, found: &Value) -> bool {
    match (operand, found) {
        (Value::Number(_), Value::Number(_)) => {
            matches!((parse_number(operand), parse_number(found)), (Ok(a), Ok(b)) if a == b)
        }
        _ => operand == found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(v: Value) -> Result<Filter, FieldError> {
        let map: BTreeMap<String, Value> = serde_json::from_value(v).unwrap();
        Filter::compile(&map)
    }

    #[test]
    fn every_condition_decides_as_documented() {
        let cases = [
            (
                json!({"$.region": {"eq": "eu"}}),
                json!({"region": "eu"}),
                true,
            ),
            (
                json!({"$.region": {"eq": "eu"}}),
                json!({"region": "us"}),
                false,
            ),
            (json!({"$.region": {"eq": "eu"}}), json!({}), false),
            (json!({"$.n": {"eq": 1}}), json!({"n": 1.0}), true),
            (json!({"$.n": {"eq": 1}}), json!({"n": "1"}), false),
            (
                json!({"$.region": {"ne": "eu"}}),
                json!({"region": "us"}),
                true,
            ),
            (json!({"$.region": {"ne": "eu"}}), json!({}), true),
            (
                json!({"$.region": {"in": ["us", "ca"]}}),
                json!({"region": "ca"}),
                true,
            ),
            (
                json!({"$.region": {"in": ["us", "ca"]}}),
                json!({"region": "eu"}),
                false,
            ),
            (
                json!({"$.region": {"nin": ["us", "ca"]}}),
                json!({"region": "eu"}),
                true,
            ),
            (
                json!({"$.region": {"nin": ["us", "ca"]}}),
                json!({"region": null}),
                true,
            ),
            (
                json!({"$.n": {"gt": 10}}),
                json!({"n": "10.000000000000000001"}),
                true,
            ),
            (json!({"$.n": {"gt": 10}}), json!({"n": 10}), false),
            (json!({"$.n": {"gte": 10}}), json!({"n": 10}), true),
            (json!({"$.n": {"lt": 0.3}}), json!({"n": 0.1}), true),
            (json!({"$.n": {"lte": 0.3}}), json!({"n": "0.30"}), true),
            (json!({"$.n": {"lt": 5}}), json!({"n": "five"}), false),
            (json!({"$.n": {"lt": 5}}), json!({}), false),
            (
                json!({"$.a.b": {"exists": true}}),
                json!({"a": {"b": 0}}),
                true,
            ),
            (
                json!({"$.a.b": {"exists": true}}),
                json!({"a": {"b": null}}),
                false,
            ),
            (json!({"$.a.b": {"exists": false}}), json!({"a": 1}), true),
            (
                json!({"$.items[0].sku": {"eq": "x"}}),
                json!({"items": [{"sku": "x"}]}),
                true,
            ),
            (
                json!({"$.region": {"eq": "eu"}, "$.tier": {"in": ["pro"]}}),
                json!({"region": "eu", "tier": "free"}),
                false,
            ),
        ];
        for (f, data, want) in cases {
            assert_eq!(
                filter(f.clone()).unwrap().matches(&data),
                want,
                "{f} on {data}"
            );
        }
    }

    #[test]
    fn errors_name_the_entry() {
        let cases = [
            (
                json!({"$.region": {"in": "eu"}}),
                "filter[\"$.region\"].in",
                "must be a list",
            ),
            (
                json!({"$.region": {"in": []}}),
                "filter[\"$.region\"].in",
                "must have 1-100 values",
            ),
            (
                json!({"$.n": {"gt": "5"}}),
                "filter[\"$.n\"].gt",
                "must be a number",
            ),
            (
                json!({"$.n": {"exists": 1}}),
                "filter[\"$.n\"].exists",
                "must be true or false",
            ),
            (
                json!({"$.n": {"eq": {"a": 1}}}),
                "filter[\"$.n\"].eq",
                "must be strings",
            ),
            (
                json!({"$.n": {"like": "x"}}),
                "filter[\"$.n\"]",
                "unknown condition \"like\"",
            ),
            (
                json!({"$.n": {"eq": 1, "ne": 2}}),
                "filter[\"$.n\"]",
                "must be one condition",
            ),
            (
                json!({"$.n": "eu"}),
                "filter[\"$.n\"]",
                "must be one condition",
            ),
            (
                json!({"region": {"eq": "eu"}}),
                "filter[\"region\"]",
                "must start with '$'",
            ),
        ];
        for (f, field, message) in cases {
            let e = filter(f.clone()).unwrap_err();
            assert_eq!(e.field, field, "{f}");
            assert!(e.message.contains(message), "{f}: {}", e.message);
        }
    }
}
