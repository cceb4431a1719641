//! Who did something: the principal behind an operation or a machine change, for the
//! audit trail.

use serde::{Deserialize, Serialize};

/// A principal and how it authenticated (`token`, `cert`, `local-admin`, `insecure`).
/// Records written before the server authenticated anyone have the default: both empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Actor {
    /// The principal's name: the token's name or the client certificate's identity.
    pub name: String,
    /// How it authenticated.
    pub method: String,
}

impl Actor {
    /// An actor named `name` who authenticated by `method`.
    pub fn new(name: impl Into<String>, method: impl Into<String>) -> Self {
        Actor {
            name: name.into(),
            method: method.into(),
        }
    }

    /// True for records from before the audit trail (no actor known).
    pub fn is_unknown(&self) -> bool {
        self.name.is_empty()
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_unknown() {
            f.write_str("-")
        } else {
            write!(f, "{} ({})", self.name, self.method)
        }
    }
}
