//! The configuration file of `serve` and `worker`: one TOML file (`store`, `[[backends]]`,
//! `[engine]`, `[server]`) read with figment, then `COMFYFLEET_…` environment overrides
//! (`COMFYFLEET_SERVER__BIND=0.0.0.0:8330`: `__` separates the levels) and `COMFYFLEET_TOKEN`
//! (one more API token). Errors name the file or the variable and the field.
//!
//! The format is documented, with a complete example that a test parses, in
//! `docs/configuration.md`. What the fleet does with it lives in the facade (`FleetConfig`);
//! what the server does with `[server]` lives in `comfyfleet-server`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use comfyfleet::{BackendConfig, EngineSettings, FleetConfig};
use comfyfleet_server::ServerConfig;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;
use serde::Deserialize;

/// The prefix of every configuration variable.
pub const ENV_PREFIX: &str = "COMFYFLEET_";
/// One more API token for the server (added to `server.tokens`).
pub const TOKEN_VAR: &str = "COMFYFLEET_TOKEN";

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where jobs are kept (`sqlite:PATH`, `sqlite:`, `memory:`).
    #[serde(default = "default_store")]
    pub store: String,
    /// The backends.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Engine settings.
    #[serde(default)]
    pub engine: EngineSettings,
    /// The HTTP service (`serve` only; `worker` ignores it).
    #[serde(default)]
    pub server: ServerConfig,
    /// Cloud spill-over (`[spill_over]`).
    #[serde(default)]
    pub spill_over: Option<comfyfleet::SpillOverSettings>,
    /// Registry file for custom-node installs by name.
    #[serde(default)]
    pub install_registry: Option<std::path::PathBuf>,
}

fn default_store() -> String {
    comfyfleet::DEFAULT_STORE.to_owned()
}

/// Where the configuration comes from.
#[derive(Debug, Default)]
pub struct Sources<'a> {
    /// The TOML file (must exist when given).
    pub file: Option<&'a Path>,
    /// `--store` / `COMFYFLEET_STORE`: wins over the file.
    pub store: Option<String>,
    /// `--bind`: wins over the file and the environment.
    pub bind: Option<std::net::SocketAddr>,
}

/// Reads the file, then the environment of this process.
pub fn load(sources: Sources<'_>) -> Result<FileConfig> {
    let token = std::env::var(TOKEN_VAR).ok();
    load_with(sources, env_provider(), token)
}

/// The environment variables that configure the file's keys: `COMFYFLEET_STORE`,
/// `COMFYFLEET_BACKENDS`, `COMFYFLEET_ENGINE__…`, `COMFYFLEET_SERVER__…`. Other `COMFYFLEET_`
/// variables (`COMFYFLEET_SERVER` = the client's server URL, `COMFYFLEET_LOG`, `COMFYFLEET_TOKEN`,
/// `COMFYFLEET_DATA_DIR`, …) are not configuration keys and must not trip `deny_unknown_fields`.
pub fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        .split("__")
        .filter(|key| is_config_key(key.as_str()))
}

/// Whether a key (after the prefix is cut and `__` became `.`) is a configuration key.
fn is_config_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k == "store" || k == "backends" || k.starts_with("engine.") || k.starts_with("server.")
}

/// Secrets are text, but figment reads `COMFYFLEET_SERVER__WEBHOOK_SECRET=1234…` as a number
/// and `COMFYFLEET_SERVER__TOKENS=abc` as one string where a list is expected: turn such values
/// into what `ServerConfig` wants before extracting it.
fn secrets_as_text(figment: Figment) -> Figment {
    use serde_json::Value;
    let as_text = |v: &Value| match v {
        Value::Number(n) => Some(Value::String(n.to_string())),
        Value::String(_) => Some(v.clone()),
        _ => None,
    };
    let mut fixes: Vec<(&str, Value)> = Vec::new();
    if let Ok(v) = figment.extract_inner::<Value>("server.tokens") {
        let fixed = match &v {
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| as_text(i).unwrap_or_else(|| i.clone()))
                    .collect(),
            ),
            other => as_text(other)
                .map(|t| Value::Array(vec![t]))
                .unwrap_or_else(|| other.clone()),
        };
        if fixed != v {
            fixes.push(("server.tokens", fixed));
        }
    }
    if let Ok(v @ Value::Number(_)) = figment.extract_inner::<Value>("server.webhook_secret")
        && let Some(t) = as_text(&v)
    {
        fixes.push(("server.webhook_secret", t));
    }
    fixes.into_iter().fold(figment, |f, (k, v)| f.merge((k, v)))
}

/// [`load`] with the environment given (tests).
pub fn load_with(
    sources: Sources<'_>,
    env: impl figment::Provider,
    token: Option<String>,
) -> Result<FileConfig> {
    let mut figment = Figment::new();
    if let Some(path) = sources.file {
        if !path.is_file() {
            bail!(
                "configuration file {} not found (or not a file)",
                path.display()
            );
        }
        // `file_exact`: a relative path means the working directory, not "search upwards".
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = secrets_as_text(figment.merge(env));
    let mut config: FileConfig = figment.extract().map_err(|e| {
        // Figment keeps every error; show them all, one per line.
        let all: Vec<String> = e.into_iter().map(describe).collect();
        anyhow::anyhow!("invalid configuration: {}", all.join("\n"))
    })?;
    if let Some(store) = sources.store {
        config.store = store;
    }
    if let Some(bind) = sources.bind {
        config.server.bind = bind;
    }
    if let Some(t) = token.filter(|t| !t.trim().is_empty()) {
        config.server.tokens.push(SecretString::from(t));
    }
    if config.server.backup_dir.is_none() {
        config.server.backup_dir = default_backup_dir(&config.store);
    }
    config.check()?;
    Ok(config)
}

/// One configuration error: what is wrong, the key, and the file or the variable. (Figment's
/// own message puts its profile into the key, `"default.engine.x"`, and, once keys are split on
/// `__`, can only say "`COMFYFLEET_` environment variable(s)".)
fn describe(e: figment::Error) -> String {
    let Some(md) = e.metadata.as_ref().filter(|_| !e.path.is_empty()) else {
        return e.to_string();
    };
    let key = e.path.join(".").to_ascii_lowercase();
    let place = if md.name.contains("environment variable") {
        format!(
            "environment variable {ENV_PREFIX}{}",
            e.path.join("__").to_ascii_uppercase()
        )
    } else {
        match &md.source {
            Some(source) => format!("{source} ({})", md.name),
            None => md.name.to_string(),
        }
    };
    format!("{} for key {key:?} in {place}", e.kind)
}

/// `backups/` next to the SQLite database (none for `memory:`).
fn default_backup_dir(store: &str) -> Option<PathBuf> {
    comfyfleet::sqlite_path(store).map(|db| {
        db.parent()
            .map(|d| d.join("backups"))
            .unwrap_or_else(|| PathBuf::from("backups"))
    })
}

impl FileConfig {
    /// The checks worth failing on before anything starts (the server repeats them).
    fn check(&self) -> Result<()> {
        let s = &self.server;
        if s.tokens.is_empty() && !s.bind.ip().is_loopback() {
            bail!(
                "invalid configuration: server.bind = {} is not a loopback address, so the API needs a token: set server.tokens or {TOKEN_VAR}",
                s.bind
            );
        }
        for o in &s.cors_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) {
                bail!(
                    "invalid configuration: server.cors_origins: {o:?} is not an origin like https://ops.example.com"
                );
            }
        }
        Ok(())
    }

    /// The fleet part.
    pub fn fleet(&self) -> FleetConfig {
        FleetConfig {
            store: self.store.clone(),
            backends: self.backends.clone(),
            engine: self.engine.clone(),
            spill_over: self.spill_over.clone(),
            install_registry: self.install_registry.clone(),
        }
    }

    /// Whether any token is configured (auth on).
    pub fn auth_on(&self) -> bool {
        !self.server.tokens.is_empty()
    }
}

/// Reads a configuration file for `worker` (which serves nothing, so `[server]` only has to
/// be well-formed).
pub fn load_for_worker(path: &Path, store: Option<String>) -> Result<FleetConfig> {
    let config = load(Sources {
        file: Some(path),
        store,
        bind: None,
    })
    .with_context(|| format!("reading {}", path.display()))?;
    Ok(config.fleet())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use figment::providers::Serialized;
    use secrecy::ExposeSecret;

    fn tokens(c: &FileConfig) -> Vec<&str> {
        c.server.tokens.iter().map(|t| t.expose_secret()).collect()
    }

    /// The ```toml blocks of a markdown file.
    fn toml_blocks(md: &str) -> Vec<String> {
        let mut blocks = Vec::new();
        let mut cur: Option<String> = None;
        for line in md.lines() {
            match (&mut cur, line.trim_start()) {
                (None, l) if l.starts_with("```toml") => cur = Some(String::new()),
                (Some(_), l) if l.starts_with("```") => blocks.extend(cur.take()),
                (Some(b), _) => {
                    b.push_str(line);
                    b.push('\n');
                }
                _ => {}
            }
        }
        blocks
    }

    fn from_str(toml: &str) -> Result<FileConfig> {
        let dir = std::env::temp_dir().join(format!("comfyfleet-cfg-{}", comfyfleet::JobId::new()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fleet.toml");
        std::fs::write(&path, toml).unwrap();
        let r = load_with(
            Sources {
                file: Some(&path),
                ..Sources::default()
            },
            Serialized::defaults(serde_json::json!({})),
            None,
        );
        std::fs::remove_dir_all(dir).ok();
        r
    }

    #[test]
    fn the_documented_examples_parse() {
        let md = include_str!("../../../docs/configuration.md");
        let blocks = toml_blocks(md);
        assert!(!blocks.is_empty());
        for b in &blocks {
            let c = from_str(b).unwrap_or_else(|e| panic!("{e:#}\n{b}"));
            assert!(!c.backends.is_empty(), "{b}");
        }
        // The first block is the complete example: every section is in it.
        let full = from_str(&blocks[0]).unwrap();
        assert!(full.auth_on());
        assert!(full.server.backup_dir.is_some());
        assert!(full.server.webhook_secret.is_some());
        assert!(!full.server.cors_origins.is_empty());
        assert!(full.backends.len() >= 3);
        let shipped = include_str!("../examples/fleet.toml");
        let c = from_str(shipped).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(c.server.bind, ServerConfig::default().bind);
    }

    #[test]
    fn errors_name_the_field_and_the_file() {
        let e = from_str("[engine]\nstart_timeout = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("start_timeout") && e.contains("fleet.toml"),
            "{e}"
        );
        let e = from_str("[server]\nbind = \"everywhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.bind") && e.contains("fleet.toml"), "{e}");
        let e = from_str("[[backends]]\nkind = \"gpu\"\nid = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpu") && e.contains("backends"), "{e}");
        let e = from_str("[server]\nbind = \"0.0.0.0:8330\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs a token"), "{e}");
        let e = from_str("store = 'sqlite:x'\n[server]\ncors_origins = ['example.com']\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cors_origins"), "{e}");
        let e = load_with(
            Sources {
                file: Some(Path::new("/nonexistent/fleet.toml")),
                ..Sources::default()
            },
            Serialized::defaults(serde_json::json!({})),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/nonexistent/fleet.toml") && e.contains("not found"),
            "{e}"
        );
    }

    #[test]
    fn overrides_apply_in_order_and_secrets_stay_hidden() {
        let env = Serialized::defaults(serde_json::json!({
            "server": {"bind": "0.0.0.0:9000", "webhook_secret": 1234567890123456_u64},
            "engine": {"node_timeout_secs": 7},
        }));
        let c = load_with(
            Sources {
                file: None,
                store: Some("memory:".into()),
                bind: None,
            },
            env,
            Some("tok-from-env".into()),
        )
        .unwrap();
        assert_eq!(c.store, "memory:");
        assert_eq!(c.server.bind.port(), 9000);
        assert_eq!(c.engine.node_timeout_secs, 7.0);
        assert_eq!(tokens(&c), ["tok-from-env"]);
        assert_eq!(
            c.server.webhook_secret.as_ref().unwrap().expose_secret(),
            "1234567890123456"
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("tok-from-env") && !shown.contains("1234567890123456"),
            "{shown}"
        );
        // One token as a plain string.
        let c = load_with(
            Sources::default(),
            Serialized::defaults(serde_json::json!({"server": {"tokens": "abc"}})),
            None,
        )
        .unwrap();
        assert_eq!(tokens(&c), ["abc"]);
        let c = load_with(
            Sources::default(),
            Serialized::defaults(serde_json::json!({"server": {"tokens": ["a", 42]}})),
            None,
        )
        .unwrap();
        assert_eq!(tokens(&c), ["a", "42"]);
        // --bind wins.
        let c = load_with(
            Sources {
                bind: Some("127.0.0.1:0".parse().unwrap()),
                ..Sources::default()
            },
            Serialized::defaults(serde_json::json!({"server": {"bind": "127.0.0.1:1"}})),
            None,
        )
        .unwrap();
        assert_eq!(c.server.bind.port(), 0);
        assert_eq!(
            c.server.backup_dir,
            comfyfleet::sqlite_path("sqlite:").map(|p| p.parent().unwrap().join("backups"))
        );
    }

    #[test]
    fn the_environment_filter_keeps_only_configuration_keys() {
        // The keys as the filter sees them: prefix cut, `__` turned into `.`.
        let keys = [
            "SERVER",
            "LOG",
            "SERVER.BIND",
            "ENGINE.NODE_TIMEOUT_SECS",
            "STORE",
            "DATA_DIR",
            "TOKEN",
            "KILL_ITERATIONS",
            "BACKENDS",
        ];
        let kept: Vec<&str> = keys.into_iter().filter(|k| is_config_key(k)).collect();
        assert_eq!(
            kept,
            [
                "SERVER.BIND",
                "ENGINE.NODE_TIMEOUT_SECS",
                "STORE",
                "BACKENDS"
            ]
        );
    }
}
