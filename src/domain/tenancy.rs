//! Tenant isolation (CONTRACT §2 `TENANCY`): which posted events a meter may count.
//!
//! With `shared` tenancy every meter counts every event of its type. With `namespaced`
//! tenancy each event carries the namespace it was posted from (its poster's
//! ServiceAccount's; none for other callers), and a meter counts only events of its own
//! namespace — unless its namespace is one of the cross-namespace ones, whose meters count
//! events from everywhere. A meter without a namespace (standalone) counts only events
//! that have none.

use std::collections::BTreeSet;

/// The installation's rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Tenancy {
    #[default]
    Shared,
    Namespaced {
        /// Namespaces whose meters count events from every namespace (e.g. `billing`).
        cross: BTreeSet<String>,
    },
}

/// Which events one meter may count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every event of its type.
    #[default]
    Everywhere,
    /// Only events posted from this namespace (`None`: events without one).
    Namespace(Option<String>),
}

impl Tenancy {
    /// The scope of the meter `id` (`<namespace>/<name>`, or a standalone id).
    pub fn scope_of(&self, meter_id: &str) -> Scope {
        match self {
            Tenancy::Shared => Scope::Everywhere,
            Tenancy::Namespaced { cross } => match meter_id.split_once('/').map(|(ns, _)| ns) {
                Some(ns) if cross.contains(ns) => Scope::Everywhere,
                ns => Scope::Namespace(ns.map(str::to_string)),
            },
        }
    }

    /// Whether events record where they were posted from (and their ids are unique
    /// per namespace).
    pub fn records_namespace(&self) -> bool {
        matches!(self, Tenancy::Namespaced { .. })
    }
}

impl Scope {
    /// Whether an event posted from `namespace` counts.
    pub fn admits(&self, namespace: Option<&str>) -> bool {
        match self {
            Scope::Everywhere => true,
            Scope::Namespace(own) => own.as_deref() == namespace,
        }
    }

    /// What a meter's fingerprint adds for this scope (nothing for `Everywhere`, so that
    /// shared tenancy keeps every fingerprint as it was).
    pub fn fingerprint(&self) -> Option<String> {
        match self {
            Scope::Everywhere => None,
            Scope::Namespace(ns) => Some(format!("namespace:{}", ns.as_deref().unwrap_or(""))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meters_count_their_own_namespace_unless_cross_namespace() {
        let t = Tenancy::Namespaced {
            cross: BTreeSet::from(["billing".to_string()]),
        };
        let own = t.scope_of("team-a/usage");
        assert!(own.admits(Some("team-a")));
        assert!(!own.admits(Some("team-b")));
        assert!(!own.admits(None));
        let billing = t.scope_of("billing/all");
        assert!(billing.admits(Some("team-a")) && billing.admits(None));
        let standalone = t.scope_of("tokens");
        assert!(standalone.admits(None) && !standalone.admits(Some("team-a")));
        assert_eq!(Tenancy::Shared.scope_of("team-a/usage"), Scope::Everywhere);
        assert_eq!(Scope::Everywhere.fingerprint(), None);
    }
}
