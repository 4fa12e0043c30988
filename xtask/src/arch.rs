//! `cargo xtask arch`: architecture rules over the workspace dependency
//! graph (from `cargo metadata --format-version 1 --all-features`).
//!
//! The rules are the data table [`RULES`]. Crates are named, so crates that
//! do not exist yet (backends, stores, server) are simply skipped until they
//! are added to the workspace. "Depends on" means normal or build
//! dependencies; dev-dependencies are checked by their own rules.
//!
//! To add a crate: put its name in the `crates` of the rules that govern it
//! (and in [`KNOWN_CRATES`], or `arch` prints a reminder).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

// ---------------------------------------------------------------------------
// the rule table

const CORE: &str = "comfyfleet-core";
const ENGINE: &str = "comfyfleet-engine";
const TESTKIT: &str = "comfyfleet-testkit";
const FACADE: &str = "comfyfleet";
const CLI: &str = "comfyfleet-cli";
const BENCHES: &str = "comfyfleet-benches";
const XTASK: &str = "xtask";
const COMFYUI: &str = "comfyfleet-comfyui";
const RUNNINGHUB: &str = "comfyfleet-runninghub";
const SSH: &str = "comfyfleet-ssh";
const STORE_SQLITE: &str = "comfyfleet-store-sqlite";
const STORE_POSTGRES: &str = "comfyfleet-store-postgres";
const SERVER: &str = "comfyfleet-server";

/// Every workspace crate the rule table knows about (present or future).
const KNOWN_CRATES: &[&str] = &[
    CORE,
    ENGINE,
    TESTKIT,
    FACADE,
    CLI,
    BENCHES,
    XTASK,
    COMFYUI,
    RUNNINGHUB,
    SSH,
    STORE_SQLITE,
    STORE_POSTGRES,
    SERVER,
];

/// Backends and stores: adapters over the core traits.
const ADAPTERS: &[&str] = &[COMFYUI, RUNNINGHUB, SSH, STORE_SQLITE, STORE_POSTGRES];

/// HTTP / SQL / SSH / server / TLS crates the pure layers must never pull in.
const IO_CRATES: &[&str] = &[
    // HTTP clients and servers
    "reqwest",
    "hyper",
    "hyper-util",
    "h2",
    "axum",
    "tower-http",
    "actix-web",
    "warp",
    "ureq",
    "tonic",
    // (utoipa is not here: it only describes types — core derives `ToSchema` behind its optional
    // `openapi` feature, which the server turns on — and does no I/O.)
    // websockets
    "tokio-tungstenite",
    "tungstenite",
    // SQL
    "sqlx",
    "sqlx-core",
    "rusqlite",
    "libsqlite3-sys",
    "tokio-postgres",
    "postgres",
    "diesel",
    "sea-orm",
    // SSH
    "russh",
    "ssh2",
    "libssh2-sys",
    "openssh",
    "thrussh",
    // TLS
    "rustls",
    "native-tls",
];

/// One architecture rule.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Printed after `violates:`.
    pub text: &'static str,
    /// The crates this rule constrains (absent ones are skipped).
    pub crates: &'static [&'static str],
    pub kind: Kind,
    /// Explicit `(crate, dep)` pairs allowed despite the rule.
    pub exceptions: &'static [(&'static str, &'static str)],
}

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// `crates` must not reach any of these packages (any package, workspace
    /// or not) through normal/build dependencies, transitively.
    Forbid(&'static [&'static str]),
    /// Among workspace crates, `crates` may reach (normal/build deps,
    /// transitively) only these.
    WorkspaceDeps(&'static [&'static str]),
    /// Among workspace crates, `crates` may have only these as direct
    /// dev-dependencies.
    WorkspaceDevDeps(&'static [&'static str]),
    /// Only these workspace crates may depend (directly, normal, build or
    /// dev) on `crates`.
    OnlyDependedOnBy(&'static [&'static str]),
}

pub const RULES: &[Rule] = &[
    Rule {
        text: "a. core and engine must not depend on HTTP/SQL/SSH/server crates",
        crates: &[CORE, ENGINE],
        kind: Kind::Forbid(IO_CRATES),
        exceptions: &[],
    },
    Rule {
        text: "b. comfyfleet-core must not depend on any other workspace crate",
        crates: &[CORE],
        kind: Kind::WorkspaceDeps(&[]),
        exceptions: &[],
    },
    Rule {
        text: "b. comfyfleet-engine may depend on comfyfleet-core only (among workspace crates)",
        crates: &[ENGINE],
        kind: Kind::WorkspaceDeps(&[CORE]),
        exceptions: &[],
    },
    Rule {
        text: "c. backends and stores may depend on comfyfleet-core only (among workspace crates)",
        crates: ADAPTERS,
        kind: Kind::WorkspaceDeps(&[CORE]),
        // The ssh backend tunnels to a ComfyUI behind the ssh host.
        exceptions: &[(SSH, COMFYUI)],
    },
    Rule {
        text: "c. backends and stores may dev-depend on comfyfleet-core, -testkit and -engine only (among workspace crates)",
        crates: ADAPTERS,
        kind: Kind::WorkspaceDevDeps(&[CORE, TESTKIT, ENGINE]),
        exceptions: &[(SSH, COMFYUI)],
    },
    Rule {
        text: "d. comfyfleet-testkit may depend on comfyfleet-core only (among workspace crates; plus the backend simulators)",
        crates: &[TESTKIT],
        kind: Kind::WorkspaceDeps(&[CORE]),
        exceptions: &[(TESTKIT, COMFYUI), (TESTKIT, RUNNINGHUB)],
    },
    Rule {
        text: "e. only comfyfleet-cli, comfyfleet-server, comfyfleet-benches and xtask may depend on comfyfleet, comfyfleet-cli or comfyfleet-server",
        crates: &[FACADE, CLI, SERVER],
        kind: Kind::OnlyDependedOnBy(&[CLI, SERVER, BENCHES, XTASK]),
        exceptions: &[],
    },
];

// ---------------------------------------------------------------------------
// the graph

/// A resolved dependency graph. Nodes are indices into `nodes`.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: Vec<Node>,
}

#[derive(Debug)]
struct Node {
    name: String,
    workspace: bool,
    /// Normal and build dependencies.
    normal: BTreeSet<usize>,
    /// Dev dependencies.
    dev: BTreeSet<usize>,
}

impl Graph {
    /// Adds a package (ids are indices; the same name may appear twice,
    /// e.g. two versions of one crate).
    fn add(&mut self, name: &str, workspace: bool) -> usize {
        self.nodes.push(Node {
            name: name.to_owned(),
            workspace,
            normal: BTreeSet::new(),
            dev: BTreeSet::new(),
        });
        self.nodes.len() - 1
    }

    fn workspace_member(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.workspace && n.name == name)
    }

    fn workspace_names(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter(|n| n.workspace)
            .map(|n| n.name.as_str())
    }

    /// Builds the graph from `cargo metadata --format-version 1` JSON (with
    /// `resolve`, i.e. without `--no-deps`).
    pub fn from_metadata(meta: &Value) -> Result<Graph> {
        let packages = meta["packages"]
            .as_array()
            .context("cargo metadata: no `packages` array")?;
        let members: BTreeSet<&str> = meta["workspace_members"]
            .as_array()
            .context("cargo metadata: no `workspace_members` array")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let nodes = meta["resolve"]["nodes"]
            .as_array()
            .context("cargo metadata: no `resolve.nodes` (was it run with --no-deps?)")?;

        let mut graph = Graph::default();
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        for package in packages {
            let id = package["id"].as_str().context("package without `id`")?;
            let name = package["name"]
                .as_str()
                .with_context(|| format!("package {id} without `name`"))?;
            index.insert(id, graph.add(name, members.contains(id)));
        }

        for node in nodes {
            let id = node["id"].as_str().context("resolve node without `id`")?;
            let &from = index
                .get(id)
                .with_context(|| format!("resolve node {id} is not in `packages`"))?;
            for dep in node["deps"].as_array().into_iter().flatten() {
                let pkg = dep["pkg"].as_str().context("resolve dep without `pkg`")?;
                let &to = index
                    .get(pkg)
                    .with_context(|| format!("resolve dep {pkg} is not in `packages`"))?;
                let kinds = dep["dep_kinds"]
                    .as_array()
                    .with_context(|| format!("resolve dep {pkg} without `dep_kinds`"))?;
                for kind in kinds {
                    match kind["kind"].as_str() {
                        None | Some("build") => graph.nodes[from].normal.insert(to),
                        Some("dev") => graph.nodes[from].dev.insert(to),
                        Some(other) => bail!("unknown dependency kind `{other}` ({id} -> {pkg})"),
                    };
                }
            }
        }
        Ok(graph)
    }

    /// Breadth-first over normal/build edges from `start`. Calls `bad` on
    /// every reached node; a `true` records it (with its shortest path) and
    /// does not expand past it. Returns the recorded paths.
    fn search(&self, start: usize, bad: impl Fn(&Node) -> bool) -> Vec<Vec<usize>> {
        let mut parent: BTreeMap<usize, usize> = BTreeMap::new();
        let mut seen = BTreeSet::from([start]);
        let mut queue = VecDeque::from([start]);
        let mut found = Vec::new();
        while let Some(at) = queue.pop_front() {
            for &next in &self.nodes[at].normal {
                if !seen.insert(next) {
                    continue;
                }
                parent.insert(next, at);
                if bad(&self.nodes[next]) {
                    let mut path = vec![next];
                    let mut cur = next;
                    while let Some(&p) = parent.get(&cur) {
                        path.push(p);
                        cur = p;
                    }
                    path.reverse();
                    found.push(path);
                } else {
                    queue.push_back(next);
                }
            }
        }
        found
    }

    fn path_names(&self, path: &[usize]) -> String {
        path.iter()
            .map(|&i| self.nodes[i].name.as_str())
            .collect::<Vec<_>>()
            .join(" -> ")
    }
}

// ---------------------------------------------------------------------------
// evaluation

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    pub krate: String,
    pub dep: String,
    /// `a -> b -> c`.
    pub path: String,
    pub rule: &'static str,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "arch: {} -> {} ({}) violates: {}",
            self.krate, self.dep, self.path, self.rule
        )
    }
}

fn excepted(rule: &Rule, krate: &str, dep: &str) -> bool {
    rule.exceptions.contains(&(krate, dep))
}

/// Evaluates `rules` on `graph`; sorted, deduplicated violations.
pub fn check(graph: &Graph, rules: &[Rule]) -> Vec<Violation> {
    let mut out = BTreeSet::new();
    for rule in rules {
        for &krate in rule.crates {
            let Some(from) = graph.workspace_member(krate) else {
                continue; // not in the workspace (yet)
            };
            let mut report = |path: &[usize]| {
                let dep = path.last().map_or(krate, |&i| graph.nodes[i].name.as_str());
                out.insert(Violation {
                    krate: krate.to_owned(),
                    dep: dep.to_owned(),
                    path: graph.path_names(path),
                    rule: rule.text,
                });
            };
            match rule.kind {
                Kind::Forbid(forbidden) => {
                    for path in graph.search(from, |n| {
                        forbidden.contains(&n.name.as_str()) && !excepted(rule, krate, &n.name)
                    }) {
                        report(&path);
                    }
                }
                Kind::WorkspaceDeps(allowed) => {
                    for path in graph.search(from, |n| {
                        n.workspace
                            && !allowed.contains(&n.name.as_str())
                            && !excepted(rule, krate, &n.name)
                    }) {
                        report(&path);
                    }
                }
                Kind::WorkspaceDevDeps(allowed) => {
                    for &to in &graph.nodes[from].dev {
                        let n = &graph.nodes[to];
                        if n.workspace
                            && n.name != krate
                            && !allowed.contains(&n.name.as_str())
                            && !excepted(rule, krate, &n.name)
                        {
                            report(&[from, to]);
                        }
                    }
                }
                Kind::OnlyDependedOnBy(dependents) => {
                    for (i, n) in graph.nodes.iter().enumerate() {
                        if !n.workspace
                            || i == from
                            || dependents.contains(&n.name.as_str())
                            || excepted(rule, &n.name, krate)
                        {
                            continue;
                        }
                        if n.normal.contains(&from) || n.dev.contains(&from) {
                            out.insert(Violation {
                                krate: n.name.clone(),
                                dep: krate.to_owned(),
                                path: graph.path_names(&[i, from]),
                                rule: rule.text,
                            });
                        }
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

/// `cargo xtask arch`.
pub fn run() -> Result<()> {
    let root = crate::workspace_root()?;
    let args = ["metadata", "--format-version", "1", "--all-features"];
    eprintln!("$ cargo {}", args.join(" "));
    let out = Command::new(crate::cargo_bin())
        .args(args)
        .current_dir(&root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running `cargo metadata`")?;
    if !out.status.success() {
        bail!("`cargo {}` failed ({})", args.join(" "), out.status);
    }
    let meta: Value =
        serde_json::from_slice(&out.stdout).context("parsing `cargo metadata` output")?;
    let graph = Graph::from_metadata(&meta)?;

    let members: Vec<&str> = graph.workspace_names().collect();
    for name in &members {
        if !KNOWN_CRATES.contains(name) {
            eprintln!(
                "arch: note: workspace crate `{name}` is not in the rule table \
                 (xtask/src/arch.rs KNOWN_CRATES / RULES)"
            );
        }
    }
    let absent: Vec<&str> = KNOWN_CRATES
        .iter()
        .copied()
        .filter(|k| !members.contains(k))
        .collect();

    let violations = check(&graph, RULES);
    for v in &violations {
        eprintln!("{v}");
    }
    if !violations.is_empty() {
        bail!("{} architecture violation(s)", violations.len());
    }
    eprintln!(
        "arch: {} rules ok over {} workspace crates{}",
        RULES.len(),
        members.len(),
        if absent.is_empty() {
            String::new()
        } else {
            format!(" (not present yet, skipped: {})", absent.join(", "))
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built graph: names in `workspace` are workspace crates, every
    /// other name mentioned in an edge is an external package.
    fn graph(workspace: &[&str], normal: &[(&str, &str)], dev: &[(&str, &str)]) -> Graph {
        let mut g = Graph::default();
        let mut ids: BTreeMap<String, usize> = BTreeMap::new();
        for name in workspace {
            ids.insert((*name).to_owned(), g.add(name, true));
        }
        let mut id = |g: &mut Graph, name: &str| {
            *ids.entry(name.to_owned())
                .or_insert_with(|| g.add(name, false))
        };
        for (a, b) in normal {
            let (a, b) = (id(&mut g, a), id(&mut g, b));
            g.nodes[a].normal.insert(b);
        }
        for (a, b) in dev {
            let (a, b) = (id(&mut g, a), id(&mut g, b));
            g.nodes[a].dev.insert(b);
        }
        g
    }

    /// Today's workspace, plus the future crates wired the way they should be.
    const WS: &[&str] = &[
        CORE,
        ENGINE,
        TESTKIT,
        FACADE,
        CLI,
        BENCHES,
        XTASK,
        COMFYUI,
        RUNNINGHUB,
        SSH,
        STORE_SQLITE,
        STORE_POSTGRES,
        SERVER,
    ];
    const GOOD_NORMAL: &[(&str, &str)] = &[
        (CORE, "serde"),
        (CORE, "tokio"),
        (ENGINE, CORE),
        (ENGINE, "tokio"),
        (TESTKIT, CORE),
        (TESTKIT, COMFYUI),
        (TESTKIT, RUNNINGHUB),
        (FACADE, CORE),
        (FACADE, ENGINE),
        (FACADE, TESTKIT),
        (FACADE, COMFYUI),
        (FACADE, STORE_SQLITE),
        (CLI, FACADE),
        (SERVER, FACADE),
        (SERVER, "axum"),
        ("axum", "hyper"),
        (COMFYUI, CORE),
        (COMFYUI, "reqwest"),
        ("reqwest", "hyper"),
        (RUNNINGHUB, CORE),
        (SSH, CORE),
        (SSH, COMFYUI),
        (SSH, "russh"),
        (STORE_SQLITE, CORE),
        (STORE_SQLITE, "rusqlite"),
        (STORE_POSTGRES, CORE),
        (STORE_POSTGRES, "sqlx"),
        (XTASK, "serde_json"),
    ];
    const GOOD_DEV: &[(&str, &str)] = &[
        (ENGINE, TESTKIT),
        (COMFYUI, TESTKIT),
        (COMFYUI, ENGINE),
        (SSH, COMFYUI),
        (SSH, TESTKIT),
        (STORE_SQLITE, TESTKIT),
        (BENCHES, CORE),
        (BENCHES, ENGINE),
        (BENCHES, TESTKIT),
        (BENCHES, FACADE),
        (CLI, "assert_cmd"),
        (SERVER, CLI),
    ];

    fn with(extra_normal: &[(&str, &str)], extra_dev: &[(&str, &str)]) -> Vec<Violation> {
        let normal: Vec<_> = GOOD_NORMAL.iter().chain(extra_normal).copied().collect();
        let dev: Vec<_> = GOOD_DEV.iter().chain(extra_dev).copied().collect();
        check(&graph(WS, &normal, &dev), RULES)
    }

    fn lines(v: &[Violation]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn good_graph_passes() {
        assert_eq!(lines(&with(&[], &[])), Vec::<String>::new());
    }

    #[test]
    fn todays_workspace_passes_and_future_crates_are_skipped() {
        let ws = &[CORE, ENGINE, TESTKIT, FACADE, CLI, BENCHES, XTASK];
        let normal = &[
            (ENGINE, CORE),
            (TESTKIT, CORE),
            (FACADE, CORE),
            (FACADE, ENGINE),
            (FACADE, TESTKIT),
            (CLI, FACADE),
        ];
        let dev = &[(ENGINE, TESTKIT), (BENCHES, ENGINE), (BENCHES, TESTKIT)];
        assert!(check(&graph(ws, normal, dev), RULES).is_empty());
    }

    #[test]
    fn core_reaching_http_transitively_is_reported_with_its_path() {
        let v = with(&[(CORE, "some-helper"), ("some-helper", "reqwest")], &[]);
        let l = lines(&v);
        assert!(
            l.contains(&format!(
                "arch: comfyfleet-core -> reqwest (comfyfleet-core -> some-helper -> reqwest) violates: {}",
                RULES[0].text
            )),
            "{l:#?}"
        );
        // The engine reaches it through core, and is reported too.
        assert!(
            l.iter().any(|s| s.starts_with(
                "arch: comfyfleet-engine -> reqwest (comfyfleet-engine -> comfyfleet-core -> some-helper -> reqwest)"
            )),
            "{l:#?}"
        );
        // hyper sits behind reqwest: the search stops at the first offender.
        assert!(!l.iter().any(|s| s.contains("-> hyper")), "{l:#?}");
    }

    #[test]
    fn engine_forbidden_crates() {
        for bad in [
            "sqlx",
            "russh",
            "tokio-tungstenite",
            "axum",
            "libsqlite3-sys",
        ] {
            let v = with(&[(ENGINE, bad)], &[]);
            assert_eq!(v.len(), 1, "{bad}: {v:#?}");
            assert_eq!((v[0].krate.as_str(), v[0].dep.as_str()), (ENGINE, bad));
            assert!(v[0].rule.starts_with("a."));
        }
    }

    #[test]
    fn dev_deps_do_not_count_for_rule_a() {
        assert!(with(&[], &[(ENGINE, "axum"), (CORE, "hyper")]).is_empty());
    }

    #[test]
    fn core_must_not_depend_on_workspace_crates() {
        let v = with(&[(CORE, TESTKIT)], &[]);
        let l = lines(&v);
        assert!(
            l.iter().any(|s| s.starts_with(
                "arch: comfyfleet-core -> comfyfleet-testkit (comfyfleet-core -> comfyfleet-testkit) violates: b."
            )),
            "{l:#?}"
        );
    }

    #[test]
    fn engine_may_depend_on_core_only() {
        let v = with(&[(ENGINE, TESTKIT)], &[]);
        let l = lines(&v);
        assert!(
            l.iter().any(|s| s.starts_with(
                "arch: comfyfleet-engine -> comfyfleet-testkit (comfyfleet-engine -> comfyfleet-testkit) violates: b."
            )),
            "{l:#?}"
        );
        // The testkit will carry the ComfyUI simulator, so through it the
        // engine would also reach an HTTP client: rule a fires as well.
        assert!(
            l.iter().any(|s| s.starts_with(
                "arch: comfyfleet-engine -> reqwest (comfyfleet-engine -> comfyfleet-testkit -> comfyfleet-comfyui -> reqwest) violates: a."
            )),
            "{l:#?}"
        );
        assert_eq!(v.len(), 2, "{l:#?}");
        // As a dev-dependency it is fine (GOOD_DEV already has it).
    }

    #[test]
    fn backends_and_stores() {
        // A backend depending on another backend.
        let v = with(&[(RUNNINGHUB, COMFYUI)], &[]);
        assert_eq!(v.len(), 1, "{v:#?}");
        assert_eq!(
            (v[0].krate.as_str(), v[0].dep.as_str()),
            (RUNNINGHUB, COMFYUI)
        );
        assert!(v[0].rule.starts_with("c."));

        // A store on the engine (normal dep) is not allowed...
        let v = with(&[(STORE_POSTGRES, ENGINE)], &[]);
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(v[0].rule.starts_with("c."));
        // ...but as a dev-dep it is.
        assert!(with(&[], &[(STORE_POSTGRES, ENGINE)]).is_empty());

        // Transitive: ssh -> comfyui is the exception, but comfyui -> store is
        // reported for comfyui, and for ssh and testkit which reach it.
        let v = with(&[(COMFYUI, STORE_SQLITE)], &[]);
        let l = lines(&v);
        assert!(
            l.iter().any(|s| s.starts_with(
                "arch: comfyfleet-ssh -> comfyfleet-store-sqlite (comfyfleet-ssh -> comfyfleet-comfyui -> comfyfleet-store-sqlite)"
            )),
            "{l:#?}"
        );
        assert!(
            l.iter()
                .any(|s| s.starts_with("arch: comfyfleet-testkit -> comfyfleet-store-sqlite")),
            "{l:#?}"
        );
        assert_eq!(v.len(), 3, "{l:#?}");

        // The exception is for ssh only.
        let v = with(&[(STORE_SQLITE, COMFYUI)], &[]);
        assert_eq!(v.len(), 1, "{v:#?}");
    }

    #[test]
    fn adapter_dev_deps() {
        let v = with(&[], &[(COMFYUI, RUNNINGHUB)]);
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(v[0].rule.starts_with("c.") && v[0].rule.contains("dev-depend"));
        assert_eq!(v[0].path, "comfyfleet-comfyui -> comfyfleet-runninghub");
    }

    #[test]
    fn testkit_rules() {
        let v = with(&[(TESTKIT, ENGINE)], &[]);
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(v[0].rule.starts_with("d."));
        let v = with(&[(TESTKIT, SSH)], &[]);
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(v[0].rule.starts_with("d."));
    }

    #[test]
    fn only_binaries_depend_on_the_facade_cli_and_server() {
        let v = with(&[(ENGINE, FACADE)], &[]);
        let l = lines(&v);
        assert!(
            l.contains(&format!(
                "arch: comfyfleet-engine -> comfyfleet (comfyfleet-engine -> comfyfleet) violates: {}",
                RULES[6].text
            )),
            "{l:#?}"
        );

        // Dev-deps count for rule e.
        let v = with(&[], &[(TESTKIT, CLI)]);
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(v[0].rule.starts_with("e."));
        assert_eq!((v[0].krate.as_str(), v[0].dep.as_str()), (TESTKIT, CLI));

        // The facade itself must not depend on the cli.
        let v = with(&[(FACADE, CLI)], &[]);
        assert!(
            v.iter().any(|v| v.krate == FACADE && v.dep == CLI),
            "{v:#?}"
        );

        // xtask and benches may.
        assert!(with(&[(XTASK, FACADE)], &[(BENCHES, SERVER)]).is_empty());
    }

    #[test]
    fn rule_table_names_only_known_crates() {
        for rule in RULES {
            let allowed: &[&str] = match rule.kind {
                Kind::Forbid(_) => &[],
                Kind::WorkspaceDeps(a) | Kind::WorkspaceDevDeps(a) | Kind::OnlyDependedOnBy(a) => a,
            };
            let exc = rule.exceptions.iter().flat_map(|(a, b)| [a, b]);
            for name in rule.crates.iter().chain(allowed).chain(exc) {
                assert!(KNOWN_CRATES.contains(name), "{name} in rule {}", rule.text);
            }
        }
    }

    #[test]
    fn parses_cargo_metadata() {
        let meta = serde_json::json!({
            "packages": [
                {"id": "path+file:///w/core#0.1.0", "name": "comfyfleet-core"},
                {"id": "path+file:///w/engine#comfyfleet-engine@0.1.0", "name": "comfyfleet-engine"},
                {"id": "registry+x#hyper@1.0.0", "name": "hyper"},
                {"id": "registry+x#cc@1.0.0", "name": "cc"},
            ],
            "workspace_members": ["path+file:///w/core#0.1.0", "path+file:///w/engine#comfyfleet-engine@0.1.0"],
            "resolve": {"nodes": [
                {"id": "path+file:///w/core#0.1.0", "deps": [
                    {"name": "cc", "pkg": "registry+x#cc@1.0.0", "dep_kinds": [{"kind": "build", "target": null}]},
                ]},
                {"id": "path+file:///w/engine#comfyfleet-engine@0.1.0", "deps": [
                    {"name": "comfyfleet_core", "pkg": "path+file:///w/core#0.1.0", "dep_kinds": [{"kind": null, "target": null}]},
                    {"name": "hyper", "pkg": "registry+x#hyper@1.0.0", "dep_kinds": [{"kind": "dev", "target": null}]},
                ]},
                {"id": "registry+x#hyper@1.0.0", "deps": []},
                {"id": "registry+x#cc@1.0.0", "deps": []},
            ]},
        });
        let g = Graph::from_metadata(&meta).unwrap();
        assert_eq!(g.workspace_names().collect::<Vec<_>>(), [CORE, ENGINE]);
        assert!(check(&g, RULES).is_empty());

        // Make hyper a normal dep of core through the build dep: now rule a fires.
        let mut meta = meta;
        meta["resolve"]["nodes"][3]["deps"] = serde_json::json!([
            {"name": "hyper", "pkg": "registry+x#hyper@1.0.0", "dep_kinds": [{"kind": null, "target": null}]},
        ]);
        let g = Graph::from_metadata(&meta).unwrap();
        let l = lines(&check(&g, RULES));
        assert_eq!(
            l,
            [
                format!(
                    "arch: comfyfleet-core -> hyper (comfyfleet-core -> cc -> hyper) violates: {}",
                    RULES[0].text
                ),
                format!(
                    "arch: comfyfleet-engine -> hyper (comfyfleet-engine -> comfyfleet-core -> cc -> hyper) violates: {}",
                    RULES[0].text
                ),
            ]
        );
    }

    #[test]
    fn no_deps_metadata_is_an_error() {
        let meta = serde_json::json!({"packages": [], "workspace_members": [], "resolve": null});
        assert!(Graph::from_metadata(&meta).is_err());
    }
}
