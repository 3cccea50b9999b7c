//! The agent's top-level modules form layers: no two of them use each other, directly or through others.
//!
//! Reads `src/` and follows every `crate::<module>` path (in `use` trees and inline) outside `#[cfg(test)]`
//! modules; a cycle between top-level modules fails the test with the files that make each edge.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Modules left out: the crate roots, and code that only exists under `cfg(test)`.
const ROOTS: &[&str] = &["lib", "main", "fuzz"];

type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn ident(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The first path segments of the use tree at the start of `s` (`a::b`, `{a::b, c::{d, e}}` …).
fn first_segments(s: &str) -> Vec<String> {
    let s = s.trim_start();
    let Some(rest) = s.strip_prefix('{') else {
        return vec![ident(s).to_owned()];
    };
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = true;
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                start = true;
                continue;
            }
            c if c.is_whitespace() => continue,
            _ => {}
        }
        if start && depth == 0 && (c.is_ascii_alphabetic() || c == '_') {
            out.push(ident(&rest[i..]).to_owned());
        } else if start && c == '{' {
            // A nested group directly inside: its own first segments.
            out.extend(first_segments(&rest[i..]));
        }
        start = false;
    }
    out
}

/// Source without line comments and without the trailing `#[cfg(test)] mod tests` block.
fn code_of(text: &str) -> String {
    let cut = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..cut].lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn collect(dir: &Path, src: &Path, graph: &mut Graph) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect(&path, src, graph);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(src).expect("under src").to_string_lossy().into_owned();
        let top = rel.split(['/', '.']).next().expect("name").to_owned();
        if ROOTS.contains(&top.as_str()) {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&path).expect("read"));
        for (at, _) in code.match_indices("crate::") {
            for module in first_segments(&code[at + "crate::".len()..]) {
                if module != top && module.starts_with(|c: char| c.is_ascii_lowercase()) {
                    graph.entry(top.clone()).or_default().entry(module).or_default().insert(rel.clone());
                }
            }
        }
    }
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flat_map(|m| m.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn the_parser_follows_use_trees() {
    assert_eq!(first_segments("config::Faults;"), ["config"]);
    assert_eq!(first_segments("{a::B, c::{d, e::F}, g}"), ["a", "c", "g"]);
    assert_eq!(first_segments("{\n    faults::{x::{Y, Z}},\n    rpc,\n}"), ["faults", "rpc"]);
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(a.into()).or_default().entry(b.into()).or_default().insert("f.rs".into());
    }
    assert_eq!(cycles(&g), vec![vec!["a".to_owned(), "b".into(), "c".into()]]);
}

#[test]
fn top_level_modules_have_no_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = Graph::new();
    collect(&src, &src, &mut graph);
    assert!(graph.len() > 5, "the scan found too few modules: {graph:?}");
    let found = cycles(&graph);
    let graph = &graph;
    let explain: Vec<String> = found
        .iter()
        .map(|comp| {
            let edges: Vec<String> = comp
                .iter()
                .flat_map(|a| {
                    comp.iter().filter_map(move |b| {
                        graph.get(a).and_then(|m| m.get(b)).map(|files| {
                            format!("{a} -> {b} ({})", files.iter().cloned().collect::<Vec<_>>().join(", "))
                        })
                    })
                })
                .collect();
            format!("cycle {comp:?}: {}", edges.join("; "))
        })
        .collect();
    assert!(found.is_empty(), "modules that use each other:\n{}", explain.join("\n"));
}
