//! Opening what keyholderd serves from, the PKCS#11 module and the vault
//! file, and why starting can fail, with the exit status for each reason.

use std::sync::Arc;

use keyholder_token::{Module, YubiKeyBackend};
use keyholder_vault::{FileStorage, Storage, StorageError};

use crate::config::{ConfigError, TokenBackend};
use crate::{Config, Core};

/// Why keyholderd cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration (file or flags) is not acceptable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The configuration names no PKCS#11 module.
    #[error("no PKCS#11 module configured")]
    NoModule,
    /// The PKCS#11 module cannot be loaded.
    #[error(transparent)]
    Module(#[from] keyholder_token::Error),
    /// The vault file cannot be opened, or another keyholderd holds it.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl StartError {
    /// The process's exit status: 2 for the configuration or the module
    /// (a vault directory others can write included), 3 when another
    /// keyholderd holds the vault, 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_)
            | Self::NoModule
            | Self::Module(_)
            | Self::Storage(StorageError::LooseDirectory { .. }) => 2,
            Self::Storage(StorageError::Busy { .. }) => 3,
            Self::Storage(_) => 1,
        }
    }
}

/// The configured home of the vault: the file, or etcd.
fn storage(config: &Config) -> Result<Box<dyn Storage>, StorageError> {
    match config.etcd_settings() {
        Some(settings) => {
            if let Some(copy) = &settings.cache
                && let Some(dir) = copy.parent()
                && !dir.as_os_str().is_empty()
                && !dir.exists()
            {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|source| StorageError::Io {
                        what: "cannot create the directory of the local copy",
                        path: dir.to_owned(),
                        source,
                    })?;
            }
            Ok(Box::new(keyholder_etcd::EtcdStorage::open(settings)?))
        }
        None => Ok(Box::new(FileStorage::open(&config.vault)?)),
    }
}

/// Loads the configured PKCS#11 module (or takes the native YubiKey
/// backend), takes the vault file (locking out any other keyholderd) and
/// builds the core over them, locked, with its audit log installed.
pub fn open(config: Config) -> Result<Arc<Core>, StartError> {
    match config.token_backend {
        TokenBackend::Pkcs11 => {
            let path = config
                .pkcs11_module
                .as_deref()
                .ok_or(StartError::NoModule)?;
            let module = Module::load_with_args(path, config.pkcs11_init_args.as_deref())?;
            let storage = storage(&config)?;
            let core = Core::new(config, module, storage);
            crate::audit::install(&core);
            Ok(core)
        }
        TokenBackend::Yubikey => {
            if let Some(path) = &config.pkcs11_module {
                tracing::warn!(
                    module = %path.display(),
                    "pkcs11_module is not loaded: the token backend is yubikey"
                );
            }
            let storage = storage(&config)?;
            let core = Core::new(config, YubiKeyBackend::new(), storage);
            // So that a client can tell the user to touch the key before
            // the first unlock (card errors are only logged).
            core.probe_vault_key();
            crate::audit::install(&core);
            Ok(core)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_problems_exit_2_and_a_held_vault_exits_3() {
        assert_eq!(StartError::NoModule.exit_code(), 2);
        assert_eq!(StartError::from(ConfigError("bad".into())).exit_code(), 2);
        let busy = StorageError::Busy {
            path: "/v/vault.age".into(),
            lock: "/v/.vault.age.lock".into(),
        };
        assert_eq!(StartError::from(busy).exit_code(), 3);
    }

    #[test]
    fn a_missing_module_is_a_configuration_error() {
        let config = Config {
            pkcs11_module: Some("/nonexistent/libpkcs11.so".into()),
            ..Config::default()
        };
        let err = open(config).err().expect("no module there");
        assert!(matches!(err, StartError::Module(_)), "{err}");
        assert_eq!(err.exit_code(), 2);
        let err = open(Config::default()).err().expect("none configured");
        assert_eq!(err.to_string(), "no PKCS#11 module configured");
        assert_eq!(err.exit_code(), 2);
    }
}
