//! The module graph has no cycles, and dependencies point the way docs/architecture.md draws
//! them. Read from the sources (`use crate::…`, `crate::…` paths, `super::…`):
//! - between top-level modules (`cli`, `commands`, `server`, `volume`, …): acyclic, and
//!   `crypto`, `protocol`, `storage` and the leaves depend on no other module but `codec`;
//! - between the sibling files of each module directory (a parent `mod.rs` aside: it declares
//!   its children and owns what they share): acyclic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/a/b.rs` → `["a", "b"]`; `src/a/mod.rs` → `["a"]`; `src/lib.rs` → `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Module paths a file refers to, absolute (`crate::x::y` → `[x, y]`; `super::y` resolved).
fn references(text: &str, me: &[String]) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    // Drop comments and the test module: doc examples and tests may reach anywhere.
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap_or("")
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|p| {
                p.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| !p.is_empty())
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        out.insert(ident(&code[at + "crate::".len()..]));
    }
    for (at, _) in code.match_indices("super::") {
        if at >= 7 && &code[at - 7..at] == "super::" {
            continue; // the second `super` of `super::super::`, handled by the first
        }
        let mut rest = &code[at..];
        // `super` is the module above this one: for `a/b.rs` (module a::b) that is `a`, for
        // `a/mod.rs` (module a) the crate root. Either way: drop the last segment.
        let mut base: Vec<String> = me.to_vec();
        base.pop();
        rest = &rest["super::".len()..];
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        let mut path = base;
        path.extend(ident(rest));
        out.insert(path);
    }
    out
}

#[test]
fn module_graph_has_no_cycles_and_points_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let modules: BTreeMap<Vec<String>, PathBuf> = all
        .iter()
        .map(|f| (module_of(&src, f), f.clone()))
        .collect();
    // The file that defines the longest known prefix of `path`.
    let owner = |path: &[String]| -> Option<Vec<String>> {
        (1..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|p| modules.contains_key(p))
    };
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut siblings: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (me, file) in &modules {
        if me.is_empty() {
            continue; // lib.rs / main.rs
        }
        let is_mod_file = file.ends_with("mod.rs");
        let text = std::fs::read_to_string(file).unwrap();
        for r in references(&text, me) {
            let Some(target) = owner(&r) else { continue };
            if target.is_empty() {
                continue;
            }
            if target[0] != me[0] {
                top.entry(me[0].clone())
                    .or_default()
                    .insert(target[0].clone());
            }
            // Siblings: same parent directory, neither is the parent's mod.rs.
            let parent = &me[..me.len() - 1];
            if !is_mod_file
                && target.len() == me.len()
                && target[..target.len() - 1] == *parent
                && target != *me
            {
                siblings.entry(me.clone()).or_default().insert(target);
            }
        }
    }
    let cycle = |graph: &BTreeMap<String, BTreeSet<String>>| -> Option<Vec<String>> {
        fn visit(
            n: &str,
            g: &BTreeMap<String, BTreeSet<String>>,
            stack: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(i) = stack.iter().position(|s| s == n) {
                let mut c = stack[i..].to_vec();
                c.push(n.to_owned());
                return Some(c);
            }
            if done.contains(n) {
                return None;
            }
            stack.push(n.to_owned());
            for m in g.get(n).into_iter().flatten() {
                if let Some(c) = visit(m, g, stack, done) {
                    return Some(c);
                }
            }
            stack.pop();
            done.insert(n.to_owned());
            None
        }
        let mut done = BTreeSet::new();
        for n in graph.keys() {
            if let Some(c) = visit(n, graph, &mut Vec::new(), &mut done) {
                return Some(c);
            }
        }
        None
    };
    assert_eq!(
        cycle(&top),
        None,
        "a cycle between top-level modules: {top:#?}"
    );
    let files_graph: BTreeMap<String, BTreeSet<String>> = siblings
        .iter()
        .map(|(k, v)| (k.join("::"), v.iter().map(|t| t.join("::")).collect()))
        .collect();
    assert_eq!(
        cycle(&files_graph),
        None,
        "a cycle between sibling files: {files_graph:#?}"
    );
    // The pure cores and the leaves depend on nothing else in the crate (but `codec` and
    // `error`, leaves themselves).
    for leaf in [
        "crypto", "protocol", "storage", "codec", "error", "human", "fsutil", "faults",
    ] {
        let deps: Vec<&String> = top
            .get(leaf)
            .into_iter()
            .flatten()
            .filter(|d| *d != "codec" && *d != "error")
            .collect();
        assert!(deps.is_empty(), "{leaf} depends on {deps:?}");
    }
    // Printed for docs/architecture.md.
    for (m, deps) in &top {
        eprintln!(
            "{m} -> {}",
            deps.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
}
