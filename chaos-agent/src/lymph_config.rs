//! Running as one instance of a `lymph node`: what the node hands its instances, and the node's ZooKeeper hosts
//! read from its lymph configuration when neither `--zookeeper` nor the agent's configuration names them.
//!
//! A node's `.lymph.yml` runs the agent like any other instance:
//!
//! ```yaml
//! instances:
//!     echo:
//!         command: lymph instance --interface echo:Echo
//!     chaos:
//!         command: /usr/local/bin/lymph-chaos agent --config /etc/lymph-chaos/config.yml
//! ```
//!
//! # What `lymph node` passes (lymph 0.15 `services/node.py` `Node.on_start`, `cli/service.py` `NodeCommand`)
//!
//! | variable | value | what the agent does with it |
//! |---|---|---|
//! | `LYMPH_NODE_CONFIG` | path of the node's config file (set by `lymph node` itself) | ZooKeeper hosts ([`fill_zookeeper`]) |
//! | `LYMPH_CONFIG` | only if the node's own environment had it | ZooKeeper hosts, overriding the node's file |
//! | `LYMPH_NODE_IP` | the node's `container.ip` | advertised (and bound) address (`Config::apply_lymph_env`) |
//! | `LYMPH_SERVICE_NAME` | the instance's name in `instances:` (e.g. `chaos`) | logged |
//! | `LYMPH_SHARED_SOCKET_FDS` | JSON `{port: fd}` of listening sockets the node shares with its instances | closed ([`release_shared_sockets`]) |
//! | `LYMPH_NODE` | the node's RPC endpoint | nothing: PyPI lymph's `node` interface has no process-listing methods; the agent finds pids in `/proc` |
//! | `LYMPH_MONITOR` | the node's monitoring endpoint | nothing |
//!
//! The command is split on single spaces and run without a shell (`cmd.split(' ')`): no quoting, no `$VAR`, no
//! double spaces; give absolute paths unless the node's `PATH` has them. The node restarts an instance that died
//! within about a second (`watch_processes`) and stops instances with SIGTERM, on which the agent reverts its
//! faults and exits.
//!
//! # Precedence
//! `--zookeeper` > `zookeeper:` in the agent's configuration file (any value; null/`""` = standalone) > the lymph
//! configuration below > the agent's built-in default.
//!
//! # Resolution, as lymph does it (`cli/main.py setup_config`, `config.py`, `core/container.py`)
//! 1. `$LYMPH_NODE_CONFIG`, sections `container`, `registry`, `event_system`, `plugins`, `dependencies`; then
//!    `$LYMPH_CONFIG`, all sections; a later file replaces the keys of a section it also has (shallow update).
//! 2. The registry is `container.registry`, or the deprecated top-level `registry`; `dep:<name>` refers to
//!    `dependencies.<name>` (for the registry and for its `zkclient`).
//! 3. It must be lymph's ZooKeeper registry (`lymph.discovery.zookeeper:ZookeeperServiceRegistry`); its
//!    `zkclient.hosts` (kazoo's default `127.0.0.1:2181` when absent) is the answer, chroot included; lymph's
//!    default chroot `/lymph` applies when there is none (as everywhere in the agent).
//! 4. `$(env.NAME)` and `$(var.NAME)` (from the `$LYMPH_VARS` file) are substituted as lymph does.

use std::path::{Path, PathBuf};

use tracing::{info, warn};
use yaml_serde::{Mapping, Value};

use crate::config::Config;

/// The node's config file (set by `lymph node` for its instances).
pub(crate) const NODE_CONFIG_ENV: &str = "LYMPH_NODE_CONFIG";
/// An explicit lymph config file.
pub(crate) const CONFIG_ENV: &str = "LYMPH_CONFIG";
/// The `$(var.…)` file.
pub(crate) const VARS_ENV: &str = "LYMPH_VARS";
/// The instance's name in the node's `instances:`.
pub(crate) const SERVICE_NAME_ENV: &str = "LYMPH_SERVICE_NAME";
/// Listening sockets the node shares with its instances (JSON `{port: fd}`).
pub(crate) const SHARED_SOCKETS_ENV: &str = "LYMPH_SHARED_SOCKET_FDS";
/// Sections lymph takes from the node's config file.
const NODE_SECTIONS: &[&str] = &["container", "registry", "event_system", "plugins", "dependencies"];
/// The registry class whose hosts we can use.
const ZK_REGISTRY_CLASS: &str = "lymph.discovery.zookeeper:ZookeeperServiceRegistry";
/// kazoo's default `hosts`.
const KAZOO_DEFAULT_HOSTS: &str = "127.0.0.1:2181";

/// Why the lymph configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LymphConfigError {
    /// A file cannot be read.
    #[error("cannot read the lymph configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// A file is not YAML (or not a mapping at the top).
    #[error("the lymph configuration {path} is not valid YAML: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// `$(env.X)` / `$(var.X)` names something undefined (lymph fails the same way).
    #[error("the lymph configuration uses {reference}, which is not defined")]
    Undefined {
        /// The reference.
        reference: String,
    },
    /// The registry is not lymph's ZooKeeper registry, or `dep:` points nowhere.
    #[error("the lymph configuration {path}: {detail}")]
    Registry {
        /// The file that defined it last.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// ZooKeeper hosts found in a lymph configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LymphZookeeper {
    /// kazoo's `hosts` (`host:port[,…][/chroot]`).
    pub(crate) hosts: String,
    /// The files they came from (node config first).
    pub(crate) sources: Vec<PathBuf>,
}

/// The hook for `lymph-chaos agent`: unless the agent's own configuration file names `zookeeper` (any value,
/// null included), take the hosts from the lymph configuration in the environment (see the module docs) instead
/// of the built-in default; log what was used, or why nothing was. Call it after the agent's configuration is
/// loaded (from `config_file`, or the defaults when `None`) and before the command-line overrides (`--zookeeper`
/// wins over everything).
pub fn fill_zookeeper(config: &mut Config, config_file: Option<&Path>) {
    if let Ok(name) = std::env::var(SERVICE_NAME_ENV) {
        info!(instance = %name, "running as an instance of a lymph node");
    }
    if config_file.is_some_and(names_zookeeper) {
        return;
    }
    match zookeeper_from_env(&|name| std::env::var(name).ok()) {
        Ok(Some(found)) => {
            info!(hosts = %found.hosts, sources = ?found.sources, "ZooKeeper hosts taken from the lymph configuration");
            config.zookeeper = Some(found.hosts);
        }
        Ok(None) => {}
        Err(err) => warn!(
            %err,
            zookeeper = config.zookeeper.as_deref().unwrap_or("none (standalone)"),
            "lymph configuration not used; keeping the agent's own ZooKeeper setting (use --zookeeper)"
        ),
    }
}

/// Whether the agent's configuration file sets `zookeeper` itself (an unreadable file counts as not).
fn names_zookeeper(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| yaml_serde::from_str::<Value>(&text).ok())
        .is_some_and(|doc| doc.get("zookeeper").is_some())
}

/// The ZooKeeper hosts of the lymph configuration named by `$LYMPH_NODE_CONFIG` / `$LYMPH_CONFIG` (looked up
/// through `env`), or `None` when neither is set.
///
/// # Errors
/// [`LymphConfigError`] when a file is unreadable or invalid, or its registry is not ZooKeeper.
pub(crate) fn zookeeper_from_env(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<LymphZookeeper>, LymphConfigError> {
    let node = env(NODE_CONFIG_ENV).filter(|s| !s.is_empty()).map(PathBuf::from);
    let own = env(CONFIG_ENV).filter(|s| !s.is_empty()).map(PathBuf::from);
    if node.is_none() && own.is_none() {
        return Ok(None);
    }
    let vars = match env(VARS_ENV).filter(|s| !s.is_empty()) {
        Some(path) => read_yaml(Path::new(&path))?,
        None => Value::Mapping(Mapping::new()),
    };
    let mut merged = Mapping::new();
    let mut sources = Vec::new();
    // The same file twice (a node's instance usually has LYMPH_CONFIG = the node's file) is read once.
    let files: Vec<(PathBuf, Option<&[&str]>)> = match (node, own) {
        (Some(n), Some(o)) if n == o => vec![(o, None)],
        (n, o) => n.map(|p| (p, Some(NODE_SECTIONS))).into_iter().chain(o.map(|p| (p, None))).collect(),
    };
    for (path, sections) in files {
        let Value::Mapping(doc) = substitute(read_yaml(&path)?, env, &vars)? else {
            return Err(LymphConfigError::Parse { path, detail: "the top level is not a mapping".into() });
        };
        for (section, values) in doc {
            if sections.is_some_and(|s| !section.as_str().is_some_and(|name| s.contains(&name))) {
                continue;
            }
            match (merged.get_mut(&section), values) {
                (Some(Value::Mapping(existing)), Value::Mapping(new)) => existing.extend(new),
                (_, values) => {
                    merged.insert(section, values);
                }
            }
        }
        sources.push(path);
    }
    let last = sources.last().cloned().unwrap_or_default();
    let registry_error = |detail: String| LymphConfigError::Registry { path: last.clone(), detail };
    let root = Value::Mapping(merged);
    let registry = root
        .get("container")
        .and_then(|c| c.get("registry"))
        .or_else(|| root.get("registry"))
        .ok_or_else(|| registry_error("no container.registry".into()))?;
    let registry = follow_dep(&root, registry).map_err(registry_error)?;
    let class = registry.get("class").and_then(Value::as_str).unwrap_or_default();
    if class != ZK_REGISTRY_CLASS {
        return Err(registry_error(format!(
            "container.registry.class is `{class}`, not {ZK_REGISTRY_CLASS}: no ZooKeeper to use"
        )));
    }
    let hosts = match registry.get("zkclient") {
        None => KAZOO_DEFAULT_HOSTS.to_owned(),
        Some(client) => {
            let client = follow_dep(&root, client).map_err(registry_error)?;
            match client.get("hosts") {
                None | Some(Value::Null) => KAZOO_DEFAULT_HOSTS.to_owned(),
                Some(Value::String(s)) => s.trim().to_owned(),
                // kazoo also takes a list of `host:port`.
                Some(Value::Sequence(list)) => {
                    list.iter().filter_map(Value::as_str).map(str::trim).collect::<Vec<_>>().join(",")
                }
                Some(other) => return Err(registry_error(format!("zkclient.hosts is not a string: {other:?}"))),
            }
        }
    };
    if hosts.is_empty() {
        return Err(registry_error("zkclient.hosts is empty".into()));
    }
    Ok(Some(LymphZookeeper { hosts, sources }))
}

fn read_yaml(path: &Path) -> Result<Value, LymphConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| LymphConfigError::Read { path: path.to_owned(), source })?;
    if text.trim().is_empty() {
        return Ok(Value::Mapping(Mapping::new()));
    }
    yaml_serde::from_str(&text).map_err(|e| LymphConfigError::Parse { path: path.to_owned(), detail: e.to_string() })
}

/// `dep:<name>` → `dependencies.<name>`; a mapping is returned as is.
fn follow_dep<'a>(root: &'a Value, v: &'a Value) -> Result<&'a Value, String> {
    match v {
        Value::String(s) => {
            let name = s.strip_prefix("dep:").ok_or_else(|| format!("`{s}` is neither a mapping nor dep:<name>"))?;
            root.get("dependencies")
                .and_then(|d| d.get(name))
                .ok_or_else(|| format!("`{s}` refers to dependencies.{name}, which is not defined"))
        }
        Value::Mapping(_) => Ok(v),
        other => Err(format!("expected a mapping, found {other:?}")),
    }
}

/// lymph's `_replace_dollar_vars`: a string that is exactly `$(ns.name)` becomes the value itself; references
/// inside a longer string are replaced by their text.
fn substitute(v: Value, env: &dyn Fn(&str) -> Option<String>, vars: &Value) -> Result<Value, LymphConfigError> {
    Ok(match v {
        Value::Mapping(m) => Value::Mapping(
            m.into_iter().map(|(k, v)| Ok((k, substitute(v, env, vars)?))).collect::<Result<_, LymphConfigError>>()?,
        ),
        Value::Sequence(s) => {
            Value::Sequence(s.into_iter().map(|v| substitute(v, env, vars)).collect::<Result<_, _>>()?)
        }
        Value::String(s) => substitute_str(&s, env, vars)?,
        other => other,
    })
}

fn dollar_var() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"\$\((\w+)\.([\w.-]+)\)").expect("valid regex"))
}

fn lookup(ns: &str, name: &str, env: &dyn Fn(&str) -> Option<String>, vars: &Value) -> Option<Value> {
    match ns {
        "env" => env(name).map(Value::String),
        // lymph's Configuration.get: a dotted path.
        "var" => name.split('.').try_fold(vars, |v, bit| v.get(bit)).cloned(),
        _ => None,
    }
}

fn substitute_str(s: &str, env: &dyn Fn(&str) -> Option<String>, vars: &Value) -> Result<Value, LymphConfigError> {
    let re = dollar_var();
    if let Some(c) = re.captures(s)
        && c.get(0).is_some_and(|m| m.start() == 0 && m.end() == s.len())
    {
        return lookup(&c[1], &c[2], env, vars).ok_or_else(|| LymphConfigError::Undefined { reference: s.to_owned() });
    }
    let mut missing = None;
    let text = re.replace_all(s, |c: &regex::Captures<'_>| match lookup(&c[1], &c[2], env, vars) {
        Some(Value::String(v)) => v,
        Some(other) => yaml_serde::to_string(&other).unwrap_or_default().trim().to_owned(),
        None => {
            missing.get_or_insert_with(|| c[0].to_owned());
            String::new()
        }
    });
    match missing {
        Some(reference) => Err(LymphConfigError::Undefined { reference }),
        None => Ok(Value::String(text.into_owned())),
    }
}

/// Closes the listening sockets a `lymph node` shares with its instances (`$LYMPH_SHARED_SOCKET_FDS`): the agent
/// serves nothing on them, and holding them would keep them open in its guardian and resource workers. Only
/// descriptors that are sockets are closed. Returns how many were. Call it first thing, before any thread or
/// descriptor of the agent's own exists.
pub fn release_shared_sockets() -> usize {
    let Ok(json) = std::env::var(SHARED_SOCKETS_ENV) else { return 0 };
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&json) else { return 0 };
    let mut closed = 0;
    for fd in map.values().filter_map(serde_json::Value::as_i64).filter_map(|fd| i32::try_from(fd).ok()) {
        if fd <= 2 {
            continue;
        }
        // SAFETY: fstat writes into a zeroed stat buffer; an invalid fd only makes it fail.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let is_socket = unsafe { libc::fstat(fd, &mut st) } == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK;
        // SAFETY: the fd was inherited from the node, is a socket, and nothing in this process owns it yet.
        if is_socket && unsafe { libc::close(fd) } == 0 {
            closed += 1;
        }
    }
    closed
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Files {
        dir: PathBuf,
    }

    impl Files {
        fn new() -> Files {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "chaos-lymph-config-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Files { dir }
        }

        fn write(&self, name: &str, text: &str) -> String {
            let p = self.dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn resolve(vars: &[(&str, &str)]) -> Result<Option<LymphZookeeper>, LymphConfigError> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        zookeeper_from_env(&move |k| env.get(k).cloned())
    }

    /// The node config of the tests' harness (tests/lymph/lymph.yml.in) plus `instances:`.
    const NODE: &str = r#"
container:
    ip: 127.0.0.1
    registry:
        class: lymph.discovery.zookeeper:ZookeeperServiceRegistry
        zkclient:
            class: kazoo.client:KazooClient
            hosts: "127.0.0.1:2181/t-node"
            timeout: 10.0
    events:
        class: lymph.events.null:NullEventSystem
instances:
    chaos:
        command: lymph-chaos agent
"#;

    #[test]
    fn nothing_without_lymph_variables() {
        assert_eq!(resolve(&[]).unwrap(), None);
        assert_eq!(resolve(&[(NODE_CONFIG_ENV, "")]).unwrap(), None);
    }

    #[test]
    fn the_node_config_gives_the_hosts() {
        let f = Files::new();
        let node = f.write("node.yml", NODE);
        let found = resolve(&[(NODE_CONFIG_ENV, &node)]).unwrap().unwrap();
        assert_eq!(found.hosts, "127.0.0.1:2181/t-node");
        assert_eq!(found.sources, vec![PathBuf::from(&node)]);
        // LYMPH_CONFIG naming the same file: read once.
        let found = resolve(&[(NODE_CONFIG_ENV, &node), (CONFIG_ENV, &node)]).unwrap().unwrap();
        assert_eq!(found.sources.len(), 1);
    }

    #[test]
    fn lymph_config_overrides_the_node_section_by_section() {
        let f = Files::new();
        let node = f.write("node.yml", NODE);
        let own = f.write(
            "own.yml",
            "container:\n    registry:\n        class: lymph.discovery.zookeeper:ZookeeperServiceRegistry\n        \
             zkclient: {hosts: [\"zk1:2181\", \"zk2:2181\"]}\n",
        );
        let found = resolve(&[(NODE_CONFIG_ENV, &node), (CONFIG_ENV, &own)]).unwrap().unwrap();
        assert_eq!(found.hosts, "zk1:2181,zk2:2181");
        // Only lymph's node sections come from the node file: a registry elsewhere is ignored.
        let odd = f.write("odd.yml", "instances:\n    registry: {class: x}\n");
        assert!(matches!(resolve(&[(NODE_CONFIG_ENV, &odd)]), Err(LymphConfigError::Registry { .. })));
    }

    #[test]
    fn dependencies_env_and_var_references_are_resolved() {
        let f = Files::new();
        let vars = f.write("vars.yml", "zk:\n    hosts: 10.0.0.5:2181/prod\n");
        let cfg = f.write(
            "deps.yml",
            "registry: dep:reg\ndependencies:\n    reg:\n        class: lymph.discovery.zookeeper:ZookeeperServiceRegistry\n        zkclient: dep:kazoo\n    kazoo:\n        class: kazoo.client:KazooClient\n        hosts: $(var.zk.hosts)\n",
        );
        let found = resolve(&[(CONFIG_ENV, &cfg), (VARS_ENV, &vars)]).unwrap().unwrap();
        assert_eq!(found.hosts, "10.0.0.5:2181/prod");
        let env_cfg = f.write(
            "env.yml",
            "container:\n    registry:\n        class: lymph.discovery.zookeeper:ZookeeperServiceRegistry\n        zkclient:\n            hosts: \"$(env.ZK_HOST):2181/lymph\"\n",
        );
        let found = resolve(&[(CONFIG_ENV, &env_cfg), ("ZK_HOST", "zk.internal")]).unwrap().unwrap();
        assert_eq!(found.hosts, "zk.internal:2181/lymph");
        assert!(matches!(resolve(&[(CONFIG_ENV, &env_cfg)]), Err(LymphConfigError::Undefined { .. })));
    }

    #[test]
    fn kazoo_default_hosts_and_wrong_registries() {
        let f = Files::new();
        let bare = f.write(
            "bare.yml",
            "container:\n    registry:\n        class: lymph.discovery.zookeeper:ZookeeperServiceRegistry\n",
        );
        assert_eq!(resolve(&[(CONFIG_ENV, &bare)]).unwrap().unwrap().hosts, "127.0.0.1:2181");
        let static_reg = f.write(
            "static.yml",
            "container:\n    registry:\n        class: lymph.discovery.static:StaticServiceRegistryHub\n",
        );
        let err = resolve(&[(CONFIG_ENV, &static_reg)]).unwrap_err();
        assert!(err.to_string().contains("not lymph.discovery.zookeeper"), "{err}");
        let missing_dep = f.write("dep.yml", "container:\n    registry: dep:nope\n");
        assert!(resolve(&[(CONFIG_ENV, &missing_dep)]).unwrap_err().to_string().contains("dependencies.nope"));
        assert!(matches!(resolve(&[(CONFIG_ENV, "/nonexistent/.lymph.yml")]), Err(LymphConfigError::Read { .. })));
        let broken = f.write("broken.yml", "container: [");
        assert!(matches!(resolve(&[(CONFIG_ENV, &broken)]), Err(LymphConfigError::Parse { .. })));
    }

    #[test]
    fn an_agent_config_naming_zookeeper_wins() {
        let f = Files::new();
        let own = f.write("agent.yml", "zookeeper: zk:1/own\n");
        let mut config = Config { zookeeper: Some("zk:1/own".into()), ..Config::default() };
        fill_zookeeper(&mut config, Some(Path::new(&own)));
        assert_eq!(config.zookeeper.as_deref(), Some("zk:1/own"));
        assert!(names_zookeeper(Path::new(&f.write("null.yml", "zookeeper: ~\n"))), "null is a setting too");
        assert!(!names_zookeeper(Path::new(&f.write("other.yml", "dry_run: true\n"))));
        assert!(!names_zookeeper(Path::new(&f.write("empty.yml", ""))));
        assert!(!names_zookeeper(Path::new("/nonexistent/config.yml")));
    }
}
