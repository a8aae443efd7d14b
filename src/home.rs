//! The home folder: broker data directories and the agents' stored tokens.
//!
//! `--home`, else `$IPC_MESH_HOME`, else `~/.ipc-mesh`. The home is created mode 0700 and
//! token files 0600, so another local user can neither read a token nor take a name.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use federation::AgentName;

use crate::error::{Error, Result};

/// The largest token file read (a token is 64 characters).
pub const MAX_TOKEN_FILE: u64 = 4096;

#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// Picks the home folder from the flag, the environment, or the user's home directory.
    pub fn resolve(flag: Option<PathBuf>) -> Result<Home> {
        let root = match flag {
            Some(p) => p,
            None => match std::env::var_os("IPC_MESH_HOME") {
                Some(p) if !p.is_empty() => PathBuf::from(p),
                _ => {
                    let home = std::env::var_os("HOME").ok_or_else(|| {
                        Error::Config("neither --home, IPC_MESH_HOME nor HOME is set".into())
                    })?;
                    PathBuf::from(home).join(".ipc-mesh")
                }
            },
        };
        Ok(Home { root })
    }

    pub fn at(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the home (0700) if needed.
    pub fn ensure(&self) -> Result<()> {
        create_private_dir(&self.root)
    }

    /// `<home>/broker-<port>/`, where a broker on that port keeps its data.
    pub fn broker_dir(&self, port: u16) -> PathBuf {
        self.root.join(format!("broker-{port}"))
    }

    /// `<home>/mesh.toml`.
    pub fn config_file(&self) -> PathBuf {
        self.root.join("mesh.toml")
    }

    fn token_path(&self, name: &AgentName) -> PathBuf {
        self.root.join("agents").join(format!("{name}.token"))
    }

    /// The stored token of `name`, if any. A token file is small: one larger than
    /// [`MAX_TOKEN_FILE`], or not a regular file, is an error rather than read.
    pub fn load_token(&self, name: &AgentName) -> Result<Option<String>> {
        let path = self.token_path(name);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = crate::config::read_capped(&path, MAX_TOKEN_FILE)
            .map_err(|e| Error::Config(format!("token file {}: {e}", path.display())))?;
        Ok(Some(String::from_utf8_lossy(&bytes).trim().to_string()))
    }

    /// Stores `token` for `name` (0600), replacing any old one atomically.
    pub fn store_token(&self, name: &AgentName, token: &str) -> Result<()> {
        self.ensure()?;
        let dir = self.root.join("agents");
        create_private_dir(&dir)?;
        let path = self.token_path(name);
        let tmp = dir.join(format!(".{name}.token.tmp"));
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(token.as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn remove_token(&self, name: &AgentName) -> Result<()> {
        match fs::remove_file(self.token_path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Io(e)),
        }
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)
            .map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_private_and_replaceable() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().join("h"));
        let name = AgentName::new("alice").unwrap();
        assert_eq!(home.load_token(&name).unwrap(), None);
        home.store_token(&name, "one").unwrap();
        home.store_token(&name, "two").unwrap();
        assert_eq!(home.load_token(&name).unwrap().as_deref(), Some("two"));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(home.root()), 0o700);
        assert_eq!(mode(&home.root().join("agents/alice.token")), 0o600);
    }

    #[test]
    fn an_oversized_token_file_is_an_error_not_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().join("h"));
        let name = AgentName::new("bob").unwrap();
        home.store_token(&name, &"a".repeat(10_000)).unwrap();
        let e = home.load_token(&name).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
    }
}
