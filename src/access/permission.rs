//! What a request needs, in the API server's terms: a verb on a resource of the
//! `kloudmeter.io` group, in a namespace (or cluster-wide) and optionally on one name.

use std::fmt;

/// The API group of Meters, and of the `events` resource that grants posting.
pub(crate) const API_GROUP: &str = "kloudmeter.io";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Verb {
    Create,
    Get,
    List,
    Update,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Create => "create",
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Update => "update",
            Verb::Delete => "delete",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Resource {
    /// Usage events (a resource only for RBAC: nothing of that kind is stored).
    Events,
    Meters,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Events => "events",
            Resource::Meters => "meters",
        }
    }
}

/// One permission, as a SubjectAccessReview asks it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Permission {
    pub verb: Verb,
    pub resource: Resource,
    /// `None`: cluster-wide.
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Permission {
    /// Posting events into `namespace` (cluster-wide for callers without one).
    pub fn post_events(namespace: Option<&str>) -> Permission {
        Permission {
            verb: Verb::Create,
            resource: Resource::Events,
            namespace: namespace.map(str::to_string),
            name: None,
        }
    }

    /// `verb` on the meter `id`: a Meter resource's id is `<namespace>/<name>`; a
    /// standalone meter has no namespace, so it needs the grant cluster-wide.
    pub fn meter(verb: Verb, id: &str) -> Permission {
        let (namespace, name) = match id.split_once('/') {
            Some((ns, name)) => (Some(ns.to_string()), name.to_string()),
            None => (None, id.to_string()),
        };
        Permission {
            verb,
            resource: Resource::Meters,
            namespace,
            name: Some(name),
        }
    }

    /// Listing the meters of `namespace` (cluster-wide for standalone meters).
    pub fn list_meters(namespace: Option<&str>) -> Permission {
        Permission {
            verb: Verb::List,
            resource: Resource::Meters,
            namespace: namespace.map(str::to_string),
            name: None,
        }
    }

    /// The namespace a meter id lives in, as [`Permission::meter`] reads it.
    pub fn namespace_of(id: &str) -> Option<&str> {
        id.split_once('/').map(|(ns, _)| ns)
    }
}

/// As a 403 names it: `create events.kloudmeter.io in namespace team-a`,
/// `get meters.kloudmeter.io "m1" in namespace team-a`, `list meters.kloudmeter.io cluster-wide`.
impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}.{API_GROUP}",
            self.verb.as_str(),
            self.resource.as_str()
        )?;
        if let Some(name) = &self.name {
            write!(f, " {name:?}")?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " in namespace {ns}"),
            None => write!(f, " cluster-wide"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_read_as_the_api_server_would_grant_them() {
        assert_eq!(
            Permission::post_events(Some("team-a")).to_string(),
            "create events.kloudmeter.io in namespace team-a"
        );
        assert_eq!(
            Permission::meter(Verb::Get, "team-a/m1").to_string(),
            "get meters.kloudmeter.io \"m1\" in namespace team-a"
        );
        assert_eq!(
            Permission::meter(Verb::Delete, "tokens").to_string(),
            "delete meters.kloudmeter.io \"tokens\" cluster-wide"
        );
        assert_eq!(
            Permission::list_meters(None).to_string(),
            "list meters.kloudmeter.io cluster-wide"
        );
        assert_eq!(Permission::namespace_of("a/b"), Some("a"));
        assert_eq!(Permission::namespace_of("b"), None);
    }
}
