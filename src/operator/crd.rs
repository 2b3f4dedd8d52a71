//! The `Meter` custom resource (group kloudmeter.io, version v1alpha1). The doc
//! comments below become the schema descriptions `kubectl explain` shows.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::meter::{Aggregation, MeterDef, WindowSize};
use crate::error::FieldError;

/// A meter: which events to aggregate, how, and at what granularity. KloudMeter folds
/// every matching event into exact readings per subject, group and time window, and
/// writes the totals into this resource's status.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kloudmeter.io",
    version = "v1alpha1",
    kind = "Meter",
    plural = "meters",
    shortname = "mtr",
    category = "kloudmeter",
    namespaced,
    status = "MeterStatus",
    printcolumn = r#"{"name":"EVENT TYPE","type":"string","jsonPath":".spec.eventType"}"#,
    printcolumn = r#"{"name":"AGGREGATION","type":"string","jsonPath":".spec.aggregation"}"#,
    printcolumn = r#"{"name":"VALUE","type":"string","jsonPath":".status.value"}"#,
    printcolumn = r#"{"name":"EVENTS","type":"integer","jsonPath":".status.events"}"#,
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "A Meter declares usage to measure: which events to aggregate, how, and at what granularity. KloudMeter writes the readings into its status."
)]
#[serde(rename_all = "camelCase")]
// CEL rules: what the controller checks that a schema can say, so that an API server
// from 1.25 on refuses such a Meter at `kubectl apply`. 1.20 drops them; the controller's
// own checks (`to_def`) stay the second line, with the same words.
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": VALUE_PROPERTY_RULE,
    "message": "valueProperty is required for every aggregation except count",
    "fieldPath": ".valueProperty",
    "reason": "FieldValueRequired"
}]))]
pub struct MeterSpec {
    /// What the meter measures, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// The eventType (CloudEvents `type`) of the events this meter aggregates, e.g. `api.request`.
    #[schemars(length(min = 1, max = 256))]
    pub event_type: String,
    /// How values are combined: count, sum, avg, min, max, unique_count (alias unique), or
    /// latest (the value of the event with the greatest time). Case-insensitive.
    #[schemars(schema_with = "aggregation_schema")]
    pub aggregation: String,
    /// JSONPath (starting with `$`) into the event's `data` selecting the value, e.g.
    /// `$.tokens`. Required for every aggregation except count. The value must be a JSON
    /// number or a numeric string; other events are counted as invalid for this meter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "value_property_schema")]
    pub value_property: Option<String>,
    /// Dimensions that partition the readings: name to JSONPath into `data`, e.g.
    /// `model: $.model`. An event without the value is grouped under null.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "group_by_schema")]
    pub group_by: BTreeMap<String, String>,
    /// The finest time window kept, in UTC: MINUTE, HOUR (default) or DAY. Queries can
    /// ask for this window size or coarser ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "window_schema")]
    pub window_size: Option<String>,
    /// Count only events whose `data` meets every condition: JSONPath to one condition,
    /// `{eq: v}`, `{ne: v}`, `{in: [..]}`, `{nin: [..]}`, `{gt|gte|lt|lte: number}` or
    /// `{exists: bool}`, e.g. `$.region: {in: [us, ca]}`. Other events are not the meter's
    /// (not invalid). Changing it rebuilds the meter.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "filter_schema")]
    pub filter: BTreeMap<String, serde_json::Value>,
    /// Usage levels that notify once per subject and period when reached:
    /// `{value: "100", period: MONTH, timeZone: Europe/Berlin, every: "100"}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub thresholds: Vec<crate::domain::threshold::Threshold>,
    /// Export usage beyond the total to `/metrics`: `topSubjects: N` (1-100) publishes the N
    /// subjects with the highest values as `kloudmeter_subject_value{meter,subject}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<crate::domain::meter::Export>,
    /// Stop aggregating (Ready=False, reason Suspended) until set back to false: events
    /// keep arriving in the stream and count once when the meter resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
}

/// The fields of [`MeterSpec`] as they are spelt in a manifest: a meter definition's
/// fields but the first, its id (the resource's name).
pub const SPEC_FIELDS: &[&str] = crate::domain::meter::METER_FIELDS.split_at(1).1;

/// Fields of `spec` that the user's last `kubectl apply` sent but the schema does not
/// know. The API server prunes them without a word (1.20 has no field validation), so
/// the manifest kubectl records is the only place they still show.
pub fn pruned_spec_fields(meter: &Meter) -> Vec<crate::error::FieldError> {
    let applied = meter
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("kubectl.kubernetes.io/last-applied-configuration"))
        .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw).ok());
    let Some(spec) = applied
        .as_ref()
        .and_then(|m| m.get("spec"))
        .and_then(|s| s.as_object())
    else {
        return Vec::new();
    };
    spec.keys()
        .filter(|k| !SPEC_FIELDS.contains(&k.as_str()))
        .map(|k| crate::domain::meter::unknown_field(&format!("spec.{k}"), SPEC_FIELDS))
        .collect()
}

fn aggregation_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut names: Vec<String> = [
        "count",
        "sum",
        "avg",
        "min",
        "max",
        "unique_count",
        "unique",
        "latest",
    ]
    .iter()
    .flat_map(|n| [n.to_string(), n.to_uppercase()])
    .collect();
    names.dedup();
    schemars::json_schema!({ "type": "string", "enum": names })
}

/// Each entry one condition; operands of `eq`/`ne`/`in`/`nin` are any scalar, so they
/// are kept as sent (the controller checks them, naming the entry).
fn filter_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let any = serde_json::json!({"x-kubernetes-preserve-unknown-fields": true});
    let list = serde_json::json!({"type": "array", "maxItems": 100, "items": any});
    let number = serde_json::json!({"type": "number"});
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 100,
        "additionalProperties": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "eq": any, "ne": any, "in": list, "nin": list,
                "gt": number, "gte": number, "lt": number, "lte": number,
                "exists": {"type": "boolean"}
            }
        }
    })
}

/// The rule that `valueProperty` is given unless the aggregation is count (a null is
/// not given).
const VALUE_PROPERTY_RULE: &str =
    "self.aggregation in ['count', 'COUNT'] || has(self.valueProperty)";

/// Not nullable: the API server drops a `null` before the rules run, so `valueProperty:
/// null` counts as not given (a nullable field's null would pass `has()`).
fn value_property_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "pattern": "^\\$", "maxLength": 1024})
}

/// Group names as the controller takes them; a JSONPath each. The bounds keep the rule's
/// cost estimate inside what the API server allows.
fn group_by_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": crate::domain::meter::MAX_GROUP_BY,
        "additionalProperties": {"type": "string", "pattern": "^\\$", "maxLength": 1024},
        "x-kubernetes-validations": [{
            "rule": "self.all(name, name.matches('^[A-Za-z0-9_-]{1,63}$'))",
            "message": "group names must be 1-63 characters of [A-Za-z0-9_-]"
        }]
    })
}

fn window_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "enum": ["MINUTE", "HOUR", "DAY", "minute", "hour", "day"] })
}

/// What KloudMeter observed: the controller owns `conditions` and `observedGeneration`,
/// the aggregator everything else (separate server-side-apply field managers).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterStatus {
    /// `Ready`: True once the meter's readings are complete; False with reason
    /// InvalidSpec (naming the bad field), Building (percent done and time left),
    /// Suspended, or CleanupPending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<MeterCondition>,
    /// The generation of the spec the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// All-time total over all subjects, as an exact decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Events aggregated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<i64>,
    /// Events whose value was missing or not numeric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_events: Option<i64>,
    /// Distinct subjects seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects: Option<i64>,
    /// Greatest event time seen (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_time: Option<String>,
    /// Windows starting before this instant (RFC 3339) keep the readings of the previous
    /// definition: their events had left the stream when the meter was rebuilt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilt_from: Option<String>,
    /// When the aggregator last wrote this status (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    /// Up to 10 subjects with the highest all-time values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub top_subjects: Vec<TopSubject>,
    /// With `spec.thresholds`: where the subjects stand in each threshold's current
    /// period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<ThresholdStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThresholdStatus {
    /// Levels crossed in the current periods, over every threshold and subject (each
    /// notified once).
    pub crossed: i64,
    /// Up to 10 subjects over a threshold, highest value first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub subjects: Vec<ThresholdSubject>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ThresholdSubject {
    pub subject: String,
    /// The subject's value in the period, an exact decimal string.
    pub value: String,
    /// The highest level it reached.
    pub threshold: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterCondition {
    /// Condition type; KloudMeter sets `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// One-word reason, e.g. InvalidSpec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail, naming the field for InvalidSpec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The generation this condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TopSubject {
    pub subject: String,
    /// Exact decimal string.
    pub value: String,
}

/// Meter id of a custom resource: `<namespace>/<name>`.
pub fn meter_id(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl MeterSpec {
    /// The same definition an API-created meter has, validated by the same rules.
    pub fn to_def(&self, namespace: &str, name: &str) -> Result<MeterDef, FieldError> {
        let aggregation = Aggregation::parse(&self.aggregation).ok_or_else(|| {
            FieldError::new(
                "spec.aggregation",
                format!("unknown aggregation {:?}", self.aggregation),
            )
        })?;
        let window_size = match &self.window_size {
            None => WindowSize::Hour,
            Some(w) => WindowSize::parse(w).ok_or_else(|| {
                FieldError::new("spec.windowSize", format!("unknown window size {w:?}"))
            })?,
        };
        let def = MeterDef {
            id: meter_id(namespace, name),
            description: self.description.clone().unwrap_or_default(),
            event_type: self.event_type.clone(),
            aggregation,
            value_property: self.value_property.clone().filter(|v| !v.is_empty()),
            group_by: self.group_by.clone(),
            window_size,
            filter: self.filter.clone(),
            thresholds: self.thresholds.clone(),
            export: self.export.clone(),
            suspend: self.suspend.unwrap_or(false),
            scope: Default::default(),
        };
        crate::domain::meter::check_definition(&def)
            .map_err(|e| FieldError::new(format!("spec.{}", e.field), e.message))?;
        Ok(def)
    }

    pub fn from_def(def: &MeterDef) -> MeterSpec {
        MeterSpec {
            description: Some(def.description.clone()).filter(|d| !d.is_empty()),
            event_type: def.event_type.clone(),
            aggregation: def.aggregation.to_string(),
            value_property: def.value_property.clone(),
            group_by: def.group_by.clone(),
            window_size: Some(format!("{:?}", def.window_size).to_uppercase()),
            filter: def.filter.clone(),
            thresholds: def.thresholds.clone(),
            export: def.export.clone(),
            suspend: def.suspend.then_some(true),
        }
    }
}

/// The CRD as YAML: what `kloudmeter crd` prints and `crds/meters.kloudmeter.io.yaml` holds.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = Meter::crd();
    format!(
        "# Generated by `kloudmeter crd`; do not edit.\n---\n{}",
        serde_yaml::to_string(&crd).expect("CRD serialises")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(agg: &str, vp: Option<&str>) -> MeterSpec {
        MeterSpec {
            description: None,
            event_type: "api.request".into(),
            aggregation: agg.into(),
            value_property: vp.map(String::from),
            group_by: BTreeMap::new(),
            window_size: None,
            filter: BTreeMap::new(),
            thresholds: Vec::new(),
            export: None,
            suspend: None,
        }
    }

    #[test]
    fn spec_errors_name_spec_fields() {
        assert_eq!(
            spec("sum", None).to_def("ns", "m").unwrap_err().field,
            "spec.valueProperty"
        );
        assert_eq!(
            spec("median", Some("$.x"))
                .to_def("ns", "m")
                .unwrap_err()
                .field,
            "spec.aggregation"
        );
        assert_eq!(
            spec("sum", Some("$.[["))
                .to_def("ns", "m")
                .unwrap_err()
                .field,
            "spec.valueProperty"
        );
        let def = spec("SUM", Some("$.x")).to_def("ns", "m").unwrap();
        assert_eq!(
            (def.id.as_str(), def.aggregation, def.window_size),
            ("ns/m", Aggregation::Sum, WindowSize::Hour)
        );
        assert_eq!(MeterSpec::from_def(&def).to_def("ns", "m").unwrap(), def);
        // a threshold whose zone a DAY meter's windows cannot follow
        let mut daily = spec("count", None);
        daily.window_size = Some("DAY".into());
        daily.thresholds = serde_json::from_value(serde_json::json!(
            [{"value": "5", "period": "DAY", "timeZone": "Asia/Kolkata"}]
        ))
        .unwrap();
        assert_eq!(
            daily.to_def("ns", "m").unwrap_err().field,
            "spec.thresholds[0].timeZone"
        );
    }

    #[test]
    fn crd_has_the_contract_names_and_columns() {
        let y = crd_yaml();
        for needle in [
            "name: meters.kloudmeter.io",
            "shortNames:",
            "- mtr",
            "- kloudmeter",
            "EVENT TYPE",
            "AGGREGATION",
            "VALUE",
            "EVENTS",
            "READY",
            "AGE",
            "status: {}",
            "pattern: ^\\$",
        ] {
            assert!(y.contains(needle), "{needle} missing in\n{y}");
        }
    }
}
