//! Meter definitions: validation, normalisation and compilation of their JSONPaths.
//! Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt;

use jsonpath_rust::parser::model::JpQuery;
use jsonpath_rust::parser::parse_json_path;
use serde::{Deserialize, Serialize};

use crate::error::FieldError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    UniqueCount,
    Latest,
}

impl Aggregation {
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw.to_ascii_lowercase().as_str() {
            "count" => Aggregation::Count,
            "sum" => Aggregation::Sum,
            "avg" => Aggregation::Avg,
            "min" => Aggregation::Min,
            "max" => Aggregation::Max,
            "unique_count" | "unique" => Aggregation::UniqueCount,
            "latest" => Aggregation::Latest,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Count => "count",
            Aggregation::Sum => "sum",
            Aggregation::Avg => "avg",
            Aggregation::Min => "min",
            Aggregation::Max => "max",
            Aggregation::UniqueCount => "unique_count",
            Aggregation::Latest => "latest",
        }
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    PartialOrd,
    Ord,
    schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum WindowSize {
    Minute,
    Hour,
    Day,
}

impl WindowSize {
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw.to_ascii_uppercase().as_str() {
            "MINUTE" => WindowSize::Minute,
            "HOUR" => WindowSize::Hour,
            "DAY" => WindowSize::Day,
            _ => return None,
        })
    }
    pub fn seconds(self) -> i64 {
        match self {
            WindowSize::Minute => 60,
            WindowSize::Hour => 3600,
            WindowSize::Day => 86_400,
        }
    }
    /// The coarser UTC windows kept for meters of this size.
    pub fn rollups(self) -> &'static [crate::domain::window::Rollup] {
        use crate::domain::window::Rollup;
        match self {
            WindowSize::Minute => &[Rollup::Hour, Rollup::Day, Rollup::Month],
            WindowSize::Hour => &[Rollup::Day, Rollup::Month],
            WindowSize::Day => &[Rollup::Month],
        }
    }

    /// Start (epoch seconds, UTC) of the window holding `epoch_seconds`.
    pub fn window_start(self, epoch_seconds: i64) -> i64 {
        epoch_seconds.div_euclid(self.seconds()) * self.seconds()
    }

    /// The finer parts the meter's own windows keep: quarters for HOUR meters (see
    /// [`crate::domain::fold::Reading::parts`]).
    pub fn split(self) -> Option<crate::domain::window::Split> {
        match self {
            WindowSize::Hour => Some(crate::domain::window::Split::Quarters),
            WindowSize::Minute | WindowSize::Day => None,
        }
    }

    /// The finer parts the `i`th window an event touches keeps, in
    /// [`crate::domain::fold::window_keys`] order: the meter's own window, then each
    /// rollup.
    pub fn split_at(self, i: usize) -> Option<crate::domain::window::Split> {
        match i {
            0 => self.split(),
            _ => self.rollups().get(i - 1)?.split(),
        }
    }

    /// Whether a day in `tz` starts on a boundary a meter of this size keeps (its windows;
    /// any quarter hour for HOUR meters), so that days and months there can be summed
    /// exactly: the zone's offset is checked twice a month from 1990 to 2060 (every
    /// offset in use since then is a whole number of quarter hours, and of minutes).
    pub fn answers_days_in(self, tz: chrono_tz::Tz) -> bool {
        use chrono::{Offset, TimeZone};
        let step = match self {
            _ if tz == chrono_tz::UTC => return true,
            WindowSize::Minute => return true,
            WindowSize::Hour => QUARTER,
            WindowSize::Day => 86_400,
        };
        (631_152_000..2_840_140_800i64)
            .step_by(15 * 86_400)
            .all(|t| {
                let at = chrono::DateTime::from_timestamp(t, 0).unwrap_or_default();
                let offset = tz.offset_from_utc_datetime(&at.naive_utc()).fix();
                i64::from(offset.local_minus_utc()).rem_euclid(step) == 0
            })
    }
}

/// Seconds in a quarter hour: every UTC offset in use is a whole number of them.
pub const QUARTER: i64 = 900;

/// A meter as users define it (API JSON and, later, the CR spec).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterDef {
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub event_type: String,
    pub aggregation: Aggregation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_property: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group_by: BTreeMap<String, String>,
    pub window_size: WindowSize,
    /// Conditions on the event's `data` that must all hold for the meter to count it
    /// (JSONPath → `{"<op>": operand}`, see [`crate::domain::filter`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub filter: BTreeMap<String, serde_json::Value>,
    /// Usage levels per subject and period that notify once each when reached
    /// ([`crate::domain::threshold`]). Not part of [`Self::semantic_hash`]: they change
    /// no reading.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thresholds: Vec<crate::domain::threshold::Threshold>,
    /// Usage exported as Prometheus metrics beyond the meter's total. Not part of
    /// [`Self::semantic_hash`]: it changes no reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<Export>,
    /// A suspended meter aggregates nothing until resumed; its events stay in the stream
    /// and are counted when it resumes. Not part of [`Self::semantic_hash`]: suspending
    /// and resuming never rebuild.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// Whose events the meter counts: not part of the definition as written, but given
    /// by the installation's TENANCY when the definition is read (part of
    /// [`Self::semantic_hash`] when it limits anything, so a change of TENANCY rebuilds).
    #[serde(skip)]
    #[schemars(skip)]
    pub scope: crate::domain::tenancy::Scope,
}

impl MeterDef {
    /// Fingerprint of everything that changes what the readings contain. A change of
    /// fingerprint rebuilds the meter; `description` is deliberately not part of it.
    pub fn semantic_hash(&self) -> String {
        let mut canon = serde_json::json!({
            "eventType": self.event_type,
            "aggregation": self.aggregation,
            "valueProperty": self.value_property,
            "groupBy": self.group_by,
            "windowSize": self.window_size,
        });
        // only when set: meters without a filter keep the fingerprint they had before
        // filters existed (a new fingerprint would rebuild every meter on upgrade)
        if !self.filter.is_empty() {
            canon["filter"] = serde_json::json!(self.filter);
        }
        if let Some(scope) = self.scope.fingerprint() {
            canon["scope"] = serde_json::json!(scope);
        }
        // meters with groupBy built before they kept per-group totals lack them: the new
        // fingerprint rebuilds them once (in the background)
        if !self.group_by.is_empty() {
            canon["groupTotals"] = serde_json::json!(true);
        }
        // HOUR meters built before their windows kept quarters lack them: the new
        // fingerprint rebuilds them once (in the background), so that days in zones
        // whose offset is not a whole hour are exact over the stream's whole history
        if self.window_size == WindowSize::Hour {
            canon["quarters"] = serde_json::json!(true);
        }
        format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(canon.to_string().as_bytes())
        )
    }
}

/// What a meter exports to `/metrics` beyond its total and events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Export {
    /// The subjects with the highest values, as `kloudmeter_subject_value` (1-100: the
    /// series a meter adds are bounded by it).
    #[schemars(range(min = 1, max = 100))]
    pub top_subjects: u32,
}

/// Most subjects a meter may export.
pub const MAX_EXPORTED_SUBJECTS: u32 = 100;

const MAX_ID: usize = 253;

/// Ids of meters created through the API in standalone mode: no `/`, which is reserved
/// for `<namespace>/<name>` ids of Meter custom resources.
pub fn validate_meter_id(id: &str, allow_namespaced: bool) -> Result<(), FieldError> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    let valid = id.len() <= MAX_ID
        && match id.split_once('/') {
            None => ok_part(id),
            Some((ns, name)) => allow_namespaced && ok_part(ns) && ok_part(name),
        };
    if valid {
        Ok(())
    } else {
        Err(FieldError::new(
            "id",
            format!("must be 1-{MAX_ID} characters of [A-Za-z0-9_.-]"),
        ))
    }
}

/// The fields of a meter definition (API JSON and CR `spec` alike); `id` first, since a
/// Meter resource's spec has all but it (`operator::crd::SPEC_FIELDS`).
pub const METER_FIELDS: &[&str] = &[
    "id",
    "description",
    "eventType",
    "aggregation",
    "valueProperty",
    "groupBy",
    "windowSize",
    "filter",
    "thresholds",
    "export",
    "suspend",
];

/// `<field>: unknown field`, with the known field it most likely misspells
/// (`groupby: unknown field; did you mean groupBy?`). A typo must not be accepted
/// silently: the meter would measure something else.
pub fn unknown_field(field: &str, known: &[&str]) -> FieldError {
    let squash = |s: &str| {
        s.chars()
            .filter(|c| !matches!(c, '_' | '-'))
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    // `spec.groupby` is matched on `groupby`
    let wanted = squash(field.rsplit('.').next().unwrap_or(field));
    let best = known
        .iter()
        .map(|k| (strsim::levenshtein(&wanted, &squash(k)), *k))
        .min();
    match best {
        Some((distance, k)) if distance <= 2 && distance < wanted.len() => {
            FieldError::new(field, format!("unknown field; did you mean {k}?"))
        }
        _ => FieldError::new(
            field,
            format!("unknown field (the fields are {})", known.join(", ")),
        ),
    }
}

/// Parse and validate a meter from API JSON. Every error names its field.
pub fn parse_meter_json(
    body: &serde_json::Value,
    id_override: Option<&str>,
) -> Result<MeterDef, FieldError> {
    let obj = body
        .as_object()
        .ok_or_else(|| FieldError::new("body", "must be a JSON object"))?;
    let get_str = |field: &str| -> Result<Option<String>, FieldError> {
        match obj.get(field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(FieldError::new(field, "must be a string")),
        }
    };
    if let Some(field) = obj.keys().find(|k| !METER_FIELDS.contains(&k.as_str())) {
        return Err(unknown_field(field, METER_FIELDS));
    }
    let id = match id_override {
        Some(id) => id.to_string(),
        None => get_str("id")?.ok_or_else(|| FieldError::new("id", "is required"))?,
    };
    validate_meter_id(&id, id_override.is_some())?;
    let group_by = parse_group_by(obj.get("groupBy"))?;
    let filter = match obj.get("filter") {
        None | Some(serde_json::Value::Null) => BTreeMap::new(),
        Some(serde_json::Value::Object(m)) => m.clone().into_iter().collect(),
        Some(_) => {
            return Err(FieldError::new(
                "filter",
                "must be an object of JSONPath to condition",
            ))
        }
    };
    let thresholds = parse_thresholds(obj.get("thresholds"))?;
    let export = parse_export(obj.get("export"))?;
    let aggregation_raw =
        get_str("aggregation")?.ok_or_else(|| FieldError::new("aggregation", "is required"))?;
    let aggregation = Aggregation::parse(&aggregation_raw).ok_or_else(|| {
        FieldError::new(
            "aggregation",
            format!("unknown aggregation {aggregation_raw:?} (count, sum, avg, min, max, unique_count, latest)"),
        )
    })?;
    let window_size = match get_str("windowSize")? {
        None => WindowSize::Hour,
        Some(w) => WindowSize::parse(&w).ok_or_else(|| {
            FieldError::new(
                "windowSize",
                format!("unknown window size {w:?} (MINUTE, HOUR, DAY)"),
            )
        })?,
    };
    let def = MeterDef {
        id,
        description: get_str("description")?.unwrap_or_default(),
        event_type: get_str("eventType")?
            .ok_or_else(|| FieldError::new("eventType", "is required"))?,
        aggregation,
        value_property: get_str("valueProperty")?.filter(|s| !s.is_empty()),
        group_by,
        window_size,
        filter,
        thresholds,
        export,
        suspend: match obj.get("suspend") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(_) => return Err(FieldError::new("suspend", "must be true or false")),
        },
        scope: Default::default(),
    };
    check_definition(&def)?;
    Ok(def)
}

/// What a definition must pass to be accepted (through the API or a Meter's spec): it
/// compiles, and each threshold's periods can be summed in its zone. Definitions already
/// stored are only compiled when loaded ([`CompiledMeter::compile`]), so that a rule
/// added later never stops a meter that is running.
pub fn check_definition(def: &MeterDef) -> Result<CompiledMeter, FieldError> {
    let compiled = CompiledMeter::compile(def)?;
    for (i, t) in compiled.thresholds.iter().enumerate() {
        if t.period != crate::domain::threshold::Period::All
            && !def.window_size.answers_days_in(t.tz)
        {
            let size = format!("{:?}", def.window_size).to_uppercase();
            return Err(FieldError::new(
                format!("thresholds[{i}].timeZone"),
                format!(
                    "days in {} do not start on the {size} windows this meter keeps; use a MINUTE or HOUR meter",
                    t.tz.name()
                ),
            ));
        }
    }
    Ok(compiled)
}

/// `groupBy`: name → JSONPath.
fn parse_group_by(raw: Option<&serde_json::Value>) -> Result<BTreeMap<String, String>, FieldError> {
    match raw {
        None | Some(serde_json::Value::Null) => Ok(BTreeMap::new()),
        Some(serde_json::Value::Object(m)) => {
            let mut out = BTreeMap::new();
            for (k, v) in m {
                let path = v
                    .as_str()
                    .ok_or_else(|| FieldError::new(format!("groupBy.{k}"), "must be a string"))?;
                out.insert(k.clone(), path.to_string());
            }
            Ok(out)
        }
        Some(_) => Err(FieldError::new(
            "groupBy",
            "must be an object of name to JSONPath",
        )),
    }
}

/// `thresholds`: a list, each item named by its index when it is refused.
fn parse_thresholds(
    raw: Option<&serde_json::Value>,
) -> Result<Vec<crate::domain::threshold::Threshold>, FieldError> {
    match raw {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, t)| {
                serde_json::from_value(t.clone())
                    .map_err(|e| FieldError::new(format!("thresholds[{i}]"), format!("{e}")))
            })
            .collect(),
        Some(_) => Err(FieldError::new("thresholds", "must be a list")),
    }
}

/// `export`: `{"topSubjects": N}`.
fn parse_export(raw: Option<&serde_json::Value>) -> Result<Option<Export>, FieldError> {
    match raw {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Object(m)) => {
            if let Some(k) = m.keys().find(|k| *k != "topSubjects") {
                return Err(unknown_field(&format!("export.{k}"), &["topSubjects"]));
            }
            let n = m.get("topSubjects").and_then(serde_json::Value::as_u64);
            match n.and_then(|n| u32::try_from(n).ok()) {
                Some(top_subjects) => Ok(Some(Export { top_subjects })),
                None => Err(FieldError::new(
                    "export.topSubjects",
                    format!("must be a whole number 1-{MAX_EXPORTED_SUBJECTS}"),
                )),
            }
        }
        Some(_) => Err(FieldError::new("export", "must be an object")),
    }
}

/// A meter ready for the fold: JSONPaths parsed once, not per event.
#[derive(Clone, Debug)]
pub struct CompiledMeter {
    pub def: MeterDef,
    /// `def.id`, shared by every reading key of the meter.
    pub id: std::sync::Arc<str>,
    pub hash: String,
    pub value_path: Option<Path>,
    /// In name order (as `def.group_by`).
    pub group_paths: Vec<(String, Path)>,
    pub filter: crate::domain::filter::Filter,
    pub thresholds: Vec<crate::domain::threshold::CompiledThreshold>,
}

/// A compiled JSONPath. `$.a.b` style paths (the common case) are kept as the field
/// names to walk; anything else goes through the JSONPath engine.
#[derive(Clone, Debug)]
pub enum Path {
    Fields(Vec<String>),
    Query(JpQuery),
}

pub(crate) fn compile_path(field: &str, path: &str) -> Result<Path, FieldError> {
    if !path.starts_with('$') {
        return Err(FieldError::new(field, "JSONPath must start with '$'"));
    }
    let query = parse_json_path(path)
        .map_err(|e| FieldError::new(field, format!("invalid JSONPath: {e}")))?;
    let plain = |f: &str| {
        f.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    match path.strip_prefix("$.") {
        Some(rest) if rest.split('.').all(plain) => {
            Ok(Path::Fields(rest.split('.').map(str::to_string).collect()))
        }
        _ => Ok(Path::Query(query)),
    }
}

/// Dimensions a meter may group by (each multiplies the readings kept; the CRD's
/// `maxProperties` too).
pub const MAX_GROUP_BY: usize = 32;

impl CompiledMeter {
    /// Validate a definition completely (the same rules for API meters and CRs).
    pub fn compile(def: &MeterDef) -> Result<Self, FieldError> {
        if def.event_type.is_empty() || def.event_type.chars().count() > 256 {
            return Err(FieldError::new("eventType", "must be 1-256 characters"));
        }
        if def.event_type.chars().any(char::is_control) {
            return Err(FieldError::new(
                "eventType",
                "must not contain control characters",
            ));
        }
        if def.description.chars().count() > 1024 {
            return Err(FieldError::new(
                "description",
                "must be at most 1024 characters",
            ));
        }
        let value_path = match (&def.value_property, def.aggregation) {
            (None, Aggregation::Count) => None,
            (None, agg) => {
                return Err(FieldError::new(
                    "valueProperty",
                    format!("is required for aggregation {agg}"),
                ))
            }
            (Some(p), _) => Some(compile_path("valueProperty", p)?),
        };
        if def.group_by.len() > MAX_GROUP_BY {
            return Err(FieldError::new(
                "groupBy",
                format!("at most {MAX_GROUP_BY} group names"),
            ));
        }
        let mut group_paths = Vec::with_capacity(def.group_by.len());
        for (name, path) in &def.group_by {
            let field = format!("groupBy.{name}");
            if name.is_empty()
                || name.len() > 63
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(FieldError::new(
                    field,
                    "group name must be 1-63 characters of [A-Za-z0-9_-]",
                ));
            }
            group_paths.push((name.clone(), compile_path(&field, path)?));
        }
        let filter = crate::domain::filter::Filter::compile(&def.filter)?;
        if def.thresholds.len() > crate::domain::threshold::MAX_THRESHOLDS {
            return Err(FieldError::new(
                "thresholds",
                format!("at most {}", crate::domain::threshold::MAX_THRESHOLDS),
            ));
        }
        let thresholds = def
            .thresholds
            .iter()
            .enumerate()
            .map(|(i, t)| crate::domain::threshold::CompiledThreshold::compile(i, t))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(e) = &def.export {
            if !(1..=MAX_EXPORTED_SUBJECTS).contains(&e.top_subjects) {
                return Err(FieldError::new(
                    "export.topSubjects",
                    format!("must be a whole number 1-{MAX_EXPORTED_SUBJECTS}"),
                ));
            }
        }
        Ok(CompiledMeter {
            filter,
            thresholds,
            id: def.id.as_str().into(),
            hash: def.semantic_hash(),
            def: def.clone(),
            value_path,
            group_paths,
        })
    }
}

#[cfg(test)]
mod tests;
