//! The architecture's invariants that a reading of the sources can check
//! (see ARCHITECTURE.md): only `pipeline/` issues Redis commands, and no
//! crate's top-level modules import each other in a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file below `dir`, as (path relative to `dir`, text).
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("reading {}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), text));
            }
        }
    }
    out
}

const CRATE_SOURCES: [&str; 4] = ["src", "api/src", "stages/src", "pipeline/src"];

#[test]
fn only_the_pipeline_crate_issues_redis_commands() {
    // What issuing a command looks like with the redis crate: a command or
    // pipeline built by hand, the command traits, running one, a script.
    let speaking = [
        "redis::cmd(",
        "redis::pipe(",
        "AsyncCommands",
        "AsyncTypedCommands",
        ".query_async(",
        ".invoke_async(",
        "Script::new(",
    ];
    let mut found = Vec::new();
    for dir in CRATE_SOURCES.into_iter().filter(|d| *d != "pipeline/src") {
        for (path, text) in sources(&root().join(dir)) {
            for (n, line) in text.lines().enumerate() {
                if let Some(token) = speaking.iter().find(|t| line.contains(*t)) {
                    found.push(format!("{dir}/{}:{}: {token}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "Redis spoken outside pipeline/ (call a pipeline function instead):\n{}",
        found.join("\n")
    );
}

/// The top-level module a file belongs to (`runner` for `runner/mod.rs`
/// and `runner/finisher.rs`), `None` for the crate root.
fn top_module(path: &Path) -> Option<String> {
    let first = path.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

/// Each top-level module and the other top-level modules it names through
/// `crate::`.
fn module_graph(dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = sources(dir);
    let modules: BTreeSet<String> = files.iter().filter_map(|(p, _)| top_module(p)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in &files {
        let Some(from) = top_module(path) else { continue };
        let uses = graph.entry(from.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if name != from && modules.contains(&name) {
                uses.insert(name);
            }
        }
    }
    graph
}

/// A circle through `start`, if there is one, as the modules on it.
fn circle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == start {
                return Some(path.clone());
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_crate_has_an_import_circle_between_its_modules() {
    let mut circles = Vec::new();
    for dir in CRATE_SOURCES {
        let graph = module_graph(&root().join(dir));
        assert!(
            graph.len() > 3,
            "{dir}: no modules found; is the layout test looking in the right place?"
        );
        for module in graph.keys() {
            if let Some(circle) = circle_through(&graph, module) {
                circles.push(format!("{dir}: {} -> {module}", circle.join(" -> ")));
            }
        }
    }
    assert!(
        circles.is_empty(),
        "modules importing each other in a circle:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_circle_check_finds_a_circle() {
    // The check itself can fail: a -> b -> a is found, a -> b is not.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    assert_eq!(circle_through(&graph, "a"), None);
    graph.entry("b".into()).or_default().insert("a".into());
    assert_eq!(
        circle_through(&graph, "a"),
        Some(vec!["a".to_string(), "b".to_string()])
    );
}
