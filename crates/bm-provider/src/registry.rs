//! The providers a server knows, by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::Provider;

/// The providers of a server, looked up by the name in a machine's `spec.provider`.
#[derive(Clone, Default)]
pub struct ProviderRegistry {
    providers: BTreeMap<String, Arc<dyn Provider>>,
}

/// A machine names a provider the server does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown provider {name:?}: this server has {}", known.join(", "))]
pub struct UnknownProvider {
    /// The name asked for.
    pub name: String,
    /// The names the server has.
    pub known: Vec<String>,
}

impl ProviderRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        ProviderRegistry::default()
    }

    /// Adds a provider under its [`Provider::name`], replacing one of the same name.
    pub fn register(&mut self, provider: Arc<dyn Provider>) -> &mut Self {
        self.providers.insert(provider.name().to_owned(), provider);
        self
    }

    /// The provider of that name.
    ///
    /// # Errors
    ///
    /// [`UnknownProvider`] listing the names there are.
    pub fn get(&self, name: &str) -> Result<&Arc<dyn Provider>, UnknownProvider> {
        self.providers.get(name).ok_or_else(|| UnknownProvider {
            name: name.to_owned(),
            known: self.names().map(str::to_owned).collect(),
        })
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }
}

impl std::fmt::Debug for ProviderRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}
