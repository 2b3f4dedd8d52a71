//! Names of NATS subjects, KV buckets and KV keys.
//!
//! Everything a user controls (meter ids, subjects, event types) is escaped into a
//! single NATS token, so no input can smuggle a `.`, `*` or `>` into a subject or key
//! and two different inputs never share a key.

use std::fmt::Write;

use crate::domain::window::{ReadingKey, Rollup};

/// Escape arbitrary text into one NATS token / KV key segment.
/// `[A-Za-z0-9_-]` pass through; every other byte becomes `=XX` (upper-case hex).
/// The mapping is injective, so distinct inputs give distinct tokens.
pub fn token(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            let _ = write!(out, "={b:02X}");
        }
    }
    out
}

/// Inverse of [`token`]; `None` when the text is not a valid token.
pub fn untoken(tok: &str) -> Option<String> {
    let bytes = tok.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = tok.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Names derived from the configured stream, so that two installations sharing one
/// NATS server never touch each other's data. A partition's own streams (its events,
/// claim log and claim snapshots) are named after `stream`: the configured name for
/// partition 0, exactly as before partitions existed, and `<stream>-p<N>` for the others.
/// Everything else is shared by the partitions and named after `base`.
#[derive(Clone, Debug)]
pub struct Names {
    /// The configured stream name.
    pub base: String,
    /// The events stream of this partition.
    pub stream: String,
    pub partition: u16,
}

impl Names {
    pub fn new(stream: &str) -> Self {
        Names {
            base: stream.to_string(),
            stream: stream.to_string(),
            partition: 0,
        }
    }
    /// The names of partition `p` of the same installation.
    pub fn partition(&self, p: u16) -> Names {
        Names {
            base: self.base.clone(),
            stream: if p == 0 {
                self.base.clone()
            } else {
                format!("{}-p{p}", self.base)
            },
            partition: p,
        }
    }
    /// Subject an event of `event_type` is published on.
    pub fn event_subject(&self, event_type: &str) -> String {
        format!("{}.events.{}", self.stream, token(event_type))
    }
    /// Wildcard over all event subjects.
    pub fn events_wildcard(&self) -> String {
        format!("{}.events.>", self.stream)
    }
    /// A meter id as this partition stores what is its own of it (its readings and
    /// build progress): the id itself in partition 0, `<id>#<N>` in the others (meter
    /// ids never contain `#`).
    pub fn part_id(&self, meter: &str) -> String {
        part_id(meter, self.partition)
    }
    /// The cursor of this partition's events in the state bucket.
    pub fn cursor_key(&self) -> String {
        match self.partition {
            0 => CURSOR_KEY.to_string(),
            p => format!("{CURSOR_KEY}-p{p}"),
        }
    }
    /// This partition's lease in the leader bucket (partition 0's is the one leader's
    /// lease of before, and carries the operator's role).
    pub fn lease_key(&self) -> String {
        match self.partition {
            0 => LEADER_KEY.to_string(),
            p => format!("{LEADER_KEY}-p{p}"),
        }
    }
    /// A live process's membership entry in the leader bucket (it expires like a lease).
    pub fn member_key(holder: &str) -> String {
        format!("member.{}", token(holder))
    }
    /// Subject on which aggregators announce meters whose readings they wrote (the
    /// status write-back of the process holding partition 0 listens).
    pub fn changed_subject(&self) -> String {
        format!("{}.changed", self.base)
    }
    pub fn deadletter_stream(&self) -> String {
        format!("{}-deadletter", self.base)
    }
    pub fn deadletter_subject(&self, meter_id: &str) -> String {
        format!("{}.deadletter.{}", self.base, token(meter_id))
    }
    pub fn deadletter_wildcard(&self) -> String {
        format!("{}.deadletter.>", self.base)
    }
    pub fn meters_bucket(&self) -> String {
        format!("{}-meters", self.base)
    }
    pub fn readings_bucket(&self) -> String {
        format!("{}-readings", self.base)
    }
    /// The claim log: which stream sequence first claimed each event id (see `claims`).
    pub fn claims_stream(&self) -> String {
        format!("{}-claims", self.stream)
    }
    /// Threshold notifications (CloudEvents), one subject per meter.
    pub fn notifications_stream(&self) -> String {
        format!("{}-notifications", self.base)
    }
    pub fn notifications_subject(&self, meter_id: &str) -> String {
        format!("{}.notifications.{}", self.base, token(meter_id))
    }
    pub fn notifications_wildcard(&self) -> String {
        format!("{}.notifications.>", self.base)
    }
    /// Crossings already notified: a key per crossing id.
    pub fn fired_bucket(&self) -> String {
        format!("{}-fired", self.base)
    }
    /// The object store bucket of the claim index snapshot (`claims::snapshot`).
    pub fn claim_snapshots_bucket(&self) -> String {
        format!("{}-claim-snapshots", self.stream)
    }
    pub fn claims_subject(&self) -> String {
        format!("{}.claims", self.stream)
    }
    pub fn state_bucket(&self) -> String {
        format!("{}-state", self.base)
    }
    pub fn leader_bucket(&self) -> String {
        format!("{}-leader", self.base)
    }
}

/// The key segment prefix of a rollup window (none for the meter's own windows).
fn rollup_prefix(rollup: Rollup) -> &'static str {
    match rollup {
        Rollup::Hour => "h",
        Rollup::Day => "d",
        Rollup::Month => "M",
    }
}

/// Key layout of the readings bucket:
/// - `r.<meter>.summary`                       per-meter totals and counters
/// - `r.<meter>.<subject>.total`               all-time total of one subject
/// - `r.<meter>.<subject>.<group>.total`       all-time total of one subject's group
/// - `r.<meter>.<subject>.<group>.<start>`     one window of one subject and group
///   (`<start>` prefixed `h`, `d` or `M` for rollups)
impl ReadingKey {
    pub fn kv_key(&self) -> String {
        match self {
            ReadingKey::Summary { meter } => format!("r.{}.summary", token(meter)),
            ReadingKey::SubjectTotal { meter, subject } => {
                format!("r.{}.{}.total", token(meter), token(subject))
            }
            ReadingKey::GroupTotal {
                meter,
                subject,
                group,
            } => format!("r.{}.{}.{group}.total", token(meter), token(subject)),
            ReadingKey::Window {
                meter,
                subject,
                group,
                rollup,
                start,
            } => window_key(&window_key_prefix(meter, subject, group), *rollup, *start),
        }
    }
}

/// The part of a window's key that one subject and group's windows share (a query
/// makes it once and reads hundreds of windows with it).
pub fn window_key_prefix(meter: &str, subject: &str, group: &str) -> String {
    format!("r.{}.{}.{group}.", token(meter), token(subject))
}

/// A window's key from [`window_key_prefix`], its rollup and start.
pub fn window_key(prefix: &str, rollup: Option<Rollup>, start: i64) -> String {
    let mut key = String::with_capacity(prefix.len() + 12);
    key.push_str(prefix);
    key.push_str(rollup.map_or("", rollup_prefix));
    let _ = write!(key, "{start}");
    key
}

/// The name a generation of a meter's readings is stored under: the meter id for
/// generation 0 (as before builds had generations), `<id>@<generation>` after. Meter
/// ids never contain `@`, so no two meters' generations share a name.
pub fn readings_id(meter: &str, generation: u64) -> String {
    if generation == 0 {
        meter.to_string()
    } else {
        format!("{meter}@{generation}")
    }
}

/// The meter id of a name from [`readings_id`] (of any partition's readings).
pub fn meter_of_readings_id(name: &str) -> &str {
    let part = name.split_once('@').map_or(name, |(id, _)| id);
    part.split_once('#').map_or(part, |(id, _)| id)
}

/// A meter id as partition `p` stores its own part of it (see [`Names::part_id`]).
pub fn part_id(meter: &str, p: u16) -> String {
    if p == 0 {
        meter.to_string()
    } else {
        format!("{meter}#{p}")
    }
}

/// The meter id and partition of a name from [`part_id`].
pub fn split_part_id(name: &str) -> (&str, u16) {
    match name.rsplit_once('#') {
        Some((id, p)) => match p.parse() {
            Ok(p) => (id, p),
            Err(_) => (name, 0),
        },
        None => (name, 0),
    }
}

/// Key filter for everything stored for one meter in the readings bucket.
pub fn meter_readings_filter(meter: &str) -> String {
    format!("r.{}.>", token(meter))
}

/// Key filter for the all-time subject totals of one meter (optionally one subject).
pub fn subject_totals_filter(meter: &str, subject: Option<&str>) -> String {
    match subject {
        Some(s) => format!("r.{}.{}.total", token(meter), token(s)),
        None => format!("r.{}.*.total", token(meter)),
    }
}

/// Key filter for every subject's group totals of a meter.
pub fn group_totals_filter(meter: &str) -> String {
    format!("r.{}.*.*.total", token(meter))
}

/// The subject and group token of a group-total key (`r.<meter>.<subject>.<group>.total`).
pub fn group_total_of(key: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        ["r", _, subject, group, "total"] => Some((untoken(subject)?, group.to_string())),
        _ => None,
    }
}

/// Key filter for one stored window of every subject and group of a meter.
pub fn window_filter(meter: &str, rollup: Option<Rollup>, start: i64) -> String {
    let prefix = rollup.map_or("", rollup_prefix);
    format!("r.{}.*.*.{prefix}{start}", token(meter))
}

pub fn meter_key(meter: &str) -> String {
    format!("m.{}", token(meter))
}

pub fn progress_key(meter: &str) -> String {
    format!("p.{}", token(meter))
}

/// Every meter definition in the meters bucket.
pub const ALL_METERS: &str = "m.*";

/// Every build-progress record in the state bucket.
pub const ALL_PROGRESS: &str = "p.*";

/// A late event's mark in the state bucket: `l.<meter>.<hour start>`, for the notifier
/// to evaluate thresholds in the period the event fell in.
pub fn late_key(meter: &str, hour: i64) -> String {
    format!("l.{}.{hour}", token(meter))
}

/// Every late-event mark.
pub const ALL_LATE: &str = "l.*.*";

/// The meter and hour of a key from [`late_key`].
pub fn late_of(key: &str) -> Option<(String, i64)> {
    let mut parts = key.split('.');
    let (l, meter, hour) = (parts.next()?, parts.next()?, parts.next()?);
    if l != "l" || parts.next().is_some() {
        return None;
    }
    Some((untoken(meter)?, hour.parse().ok()?))
}

/// The meter id of a key from [`meter_key`].
pub fn meter_of(key: &str) -> Option<String> {
    key.strip_prefix("m.").and_then(untoken)
}

/// The meter id of a key from [`progress_key`].
pub fn progress_meter_of(key: &str) -> Option<String> {
    key.strip_prefix("p.").and_then(untoken)
}

/// A window at a meter's own size from a readings key (`r.<meter>.<subject>.<group>.<start>`,
/// no rollup prefix): subject, group token and start.
pub fn own_window_of(key: &str) -> Option<(String, String, i64)> {
    let mut parts = key.split('.');
    let (_, _, subject, group, start) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if parts.next().is_some() {
        return None;
    }
    // rollups are prefixed with a letter, so only own windows parse
    let start: i64 = start.parse().ok()?;
    Some((untoken(subject)?, group.to_string(), start))
}

/// The subject of a subject-total key (`r.<meter>.<subject>.total`).
pub fn subject_of_total(key: &str) -> Option<String> {
    key.split('.').nth(2).and_then(untoken)
}

pub const CURSOR_KEY: &str = "cursor";
pub const LEADER_KEY: &str = "aggregator";

/// Header carrying the hashed deduplication key of an event.
pub const DEDUP_HEADER: &str = "Km-Dedup";

/// The 16-byte dedup key carried (hex-encoded) in an event's [`DEDUP_HEADER`]. A header
/// that is not 32 hex digits (written by hand into the stream) is hashed instead, so every
/// value still maps to one fixed key.
pub fn dedup_key(header: &str) -> crate::domain::dedup::IdKey {
    let mut key = [0u8; 16];
    let bytes = header.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    if bytes.len() == 32 {
        let mut ok = true;
        for (i, pair) in bytes.chunks(2).enumerate() {
            match (hex(pair[0]), hex(pair[1])) {
                (Some(hi), Some(lo)) => key[i] = hi << 4 | lo,
                _ => ok = false,
            }
        }
        if ok {
            return key;
        }
    }
    use sha2::Digest as _;
    key.copy_from_slice(&sha2::Sha256::digest(bytes)[..16]);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keys_decode_hex_and_hash_anything_else() {
        let hex = "00ff10a0b1c2d3e4f5060708090a0b0c";
        assert_eq!(
            dedup_key(hex),
            [
                0x00, 0xff, 0x10, 0xa0, 0xb1, 0xc2, 0xd3, 0xe4, 0xf5, 0x06, 0x07, 0x08, 0x09, 0x0a,
                0x0b, 0x0c
            ]
        );
        assert_eq!(dedup_key(&hex.to_uppercase()), dedup_key(hex));
        // not hex, or not 32 digits: hashed, and distinct from each other
        let odd = ["zz".repeat(16), "abc".into(), String::new(), "é".repeat(16)];
        let keys: std::collections::HashSet<_> = odd.iter().map(|h| dedup_key(h)).collect();
        assert_eq!(keys.len(), odd.len());
    }

    #[test]
    fn token_round_trips_and_escapes_wildcards() {
        for raw in [
            "customer-1",
            "a.b",
            "*",
            ">",
            "x y",
            "ns/name",
            "é",
            "=41",
            "a:b@c",
        ] {
            let t = token(raw);
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'='),
                "{t}"
            );
            assert_eq!(untoken(&t).as_deref(), Some(raw));
        }
        assert_eq!(token("a.b"), "a=2Eb");
        assert_eq!(token("=41"), "=3D41");
        assert_ne!(token("=41"), token("A"));
    }

    #[test]
    fn reading_keys_have_fixed_token_counts() {
        let s = ReadingKey::Summary {
            meter: "t/m".into(),
        }
        .kv_key();
        assert_eq!(s, "r.t=2Fm.summary");
        let t = ReadingKey::SubjectTotal {
            meter: "m".into(),
            subject: "c.1".into(),
        }
        .kv_key();
        assert_eq!(t, "r.m.c=2E1.total");
        let w = ReadingKey::Window {
            meter: "m".into(),
            subject: "c".into(),
            group: "_".into(),
            rollup: None,
            start: 3600,
        }
        .kv_key();
        assert_eq!(w, "r.m.c._.3600");
        let d = ReadingKey::Window {
            meter: "m".into(),
            subject: "c".into(),
            group: "_".into(),
            rollup: Some(Rollup::Day),
            start: 0,
        }
        .kv_key();
        assert_eq!(d, "r.m.c._.d0");
    }

    proptest::proptest! {
        #[test]
        fn tokens_are_injective_and_safe(a in "\\PC{0,40}", b in "\\PC{0,40}") {
            let (ta, tb) = (token(&a), token(&b));
            proptest::prop_assert!(ta.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'='));
            proptest::prop_assert_eq!(ta == tb, a == b);
            proptest::prop_assert_eq!(untoken(&ta), Some(a.clone()));
        }

        #[test]
        fn an_event_type_is_one_token_of_its_subject(event_type in "\\PC{1,60}") {
            // whatever the event type, the subject it is stored on has exactly three
            // tokens and no wildcard
            let subject = Names::new("s").event_subject(&event_type);
            proptest::prop_assert_eq!(subject.matches('.').count(), 2);
            proptest::prop_assert!(!subject.contains(['*', '>', ' ']));
        }
    }
}
