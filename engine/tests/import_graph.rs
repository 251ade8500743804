//! The engine's module import graph, and a check that it has no circles.
//!
//! Reads `engine/src` as text (no compiler involved), follows the `mod` tree from `lib.rs`, and
//! records an edge from a module to every module it names through `use`, `crate::`/`super::`/
//! `self::` paths or a name a `use` brought in. A path through a `pub use` re-export counts
//! against the file that defines the item, so `crate::config::Snapshot` is an edge to
//! `config::snapshot`. Test code (`#[cfg(test)]` items and the files they declare) is left out:
//! tests may reach anywhere.
//!
//! Two graphs are checked: files (`config::parse` → `config::validate`) and top-level modules
//! (`proxy` → `shard`, every file of a folder as one). A circle in either fails the test.
//! `cargo test -p ringtun --test import_graph -- --nocapture` (or `scripts/import-graph.sh`)
//! prints both graphs, sorted, so two runs on the same tree print the same text.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules whose circles other work in progress is removing (issue 11): a circle
/// with a member in one of these is printed but tolerated. An entry that is in no circle any
/// more fails the test, so the list only shrinks; empty it once those changes are merged.
const PENDING: &[&str] = &[];

/// A module path below the crate: `[]` is `lib.rs`, `["config", "parse"]` is `config/parse.rs`.
type Module = Vec<String>;

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".to_owned()
    } else {
        m.join("::")
    }
}

/// The source with comments, string and char literals blanked (newlines kept), so braces,
/// semicolons and `crate::` inside them count for nothing.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied().unwrap_or('\0');
        if c[i] == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if (c[i] == 'r' || (c[i] == 'b' && at(i + 1) == 'r'))
            && !ident_char(if i == 0 { ' ' } else { c[i - 1] })
            && {
                let mut k = i + if c[i] == 'b' { 2 } else { 1 };
                while at(k) == '#' {
                    k += 1;
                }
                at(k) == '"'
            }
        {
            // Raw string: r#"..."#, closed by a quote and as many hashes.
            let mut k = i + if c[i] == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while at(k) == '#' {
                hashes += 1;
                k += 1;
            }
            k += 1;
            while k < c.len() {
                if c[k] == '"' && (1..=hashes).all(|h| at(k + h) == '#') {
                    k += 1 + hashes;
                    break;
                }
                k += 1;
            }
            for &ch in &c[i..k.min(c.len())] {
                out.push(blank(ch));
            }
            i = k;
        } else if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c[i] == '\'' && (at(i + 1) == '\\' || at(i + 2) == '\'') {
            // A char literal ('x', '\n', '\u{..}'); a lifetime ('a) has no closing quote.
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '\'' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                out.push(' ');
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn ident_char(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Blanks every item marked `#[cfg(test)]`: up to its `;` or the end of its first block.
fn drop_test_items(code: &str) -> String {
    let mut c: Vec<char> = code.chars().collect();
    let pattern: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + pattern.len() <= c.len() {
        if c[i..i + pattern.len()] != pattern[..] {
            i += 1;
            continue;
        }
        let start = i;
        let mut k = i + pattern.len();
        let mut depth = 0;
        while k < c.len() {
            match c[k] {
                ';' if depth == 0 => break,
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            k += 1;
        }
        let end = (k + 1).min(c.len());
        for ch in &mut c[start..end] {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
        i = k + 1;
    }
    c.into_iter().collect()
}

/// Whether `word` starts at byte `i` of `code` as a whole word.
fn word_at(code: &str, i: usize, word: &str) -> bool {
    code[i..].starts_with(word)
        && !code[..i].chars().next_back().is_some_and(ident_char)
        && !code[i + word.len()..]
            .chars()
            .next()
            .is_some_and(ident_char)
}

/// Every `use` statement's body (`crate::{a, b::C}`) and the byte range it spans.
fn use_statements(code: &str) -> Vec<(String, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(off) = code[from..].find("use") {
        let i = from + off;
        from = i + 3;
        if !word_at(code, i, "use") {
            continue;
        }
        let Some(end) = code[i..].find(';') else {
            break;
        };
        out.push((code[i + 3..i + end].to_owned(), i..i + end));
        from = i + end;
    }
    out
}

/// Expands a use tree into (bound name, path) pairs; `self` in a group binds the group's path.
fn expand(prefix: &[String], tree: &str, out: &mut Vec<(String, Vec<String>)>) {
    let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let tree = tree.trim().trim_start_matches("::");
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let base: Vec<String> = prefix.iter().cloned().chain(head).collect();
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut depth = 0;
        let mut part = String::new();
        for ch in inner.chars() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&base, &part, out);
                    part.clear();
                    continue;
                }
                _ => {}
            }
            part.push(ch);
        }
        expand(&base, &part, out);
        return;
    }
    let (path, alias) = match tree.split_once(" as ") {
        Some((p, a)) => (p.trim(), Some(a.trim())),
        None => (tree, None),
    };
    if path.is_empty() {
        return;
    }
    let mut full: Vec<String> = prefix.to_vec();
    for seg in path.split("::").map(str::trim) {
        if seg == "self" {
            continue;
        }
        full.push(seg.to_owned());
    }
    let bound = alias
        .map(str::to_owned)
        .or_else(|| full.last().cloned())
        .unwrap_or_default();
    out.push((bound, full));
}

/// One parsed file.
struct Source {
    /// The code with comments, literals and test items blanked.
    code: String,
    /// Names its `use` statements bind, with the (unresolved) path each names.
    uses: Vec<(String, Vec<String>)>,
    /// Its `pub use` re-exports: name → path.
    reexports: BTreeMap<String, Vec<String>>,
    /// Child modules it declares with `mod x;` or `mod x {`.
    children: Vec<String>,
}

fn parse_source(text: &str) -> Source {
    let code = drop_test_items(&strip(text));
    let mut uses = Vec::new();
    let mut reexports = BTreeMap::new();
    for (body, range) in use_statements(&code) {
        let mut bound = Vec::new();
        expand(&[], &body, &mut bound);
        let before = code[..range.start].trim_end();
        if before.ends_with("pub") || before.ends_with(')') && before.contains("pub(") {
            for (n, p) in &bound {
                if n != "*" {
                    reexports.insert(n.clone(), p.clone());
                }
            }
        }
        uses.extend(bound);
    }
    let mut children = Vec::new();
    let mut from = 0;
    while let Some(off) = code[from..].find("mod") {
        let i = from + off;
        from = i + 3;
        if !word_at(&code, i, "mod") {
            continue;
        }
        let rest = code[i + 3..].trim_start();
        let ident: String = rest.chars().take_while(|&ch| ident_char(ch)).collect();
        let after = rest[ident.len()..].trim_start();
        if !ident.is_empty() && (after.starts_with(';') || after.starts_with('{')) {
            children.push(ident);
        }
    }
    Source {
        code,
        uses,
        reexports,
        children,
    }
}

/// The file of a module: `x.rs` or `x/mod.rs` beside its parent.
fn file_of(src: &Path, m: &Module) -> Option<PathBuf> {
    if m.is_empty() {
        return Some(src.join("lib.rs"));
    }
    let dir: PathBuf = m.iter().collect();
    let flat = src.join(&dir).with_extension("rs");
    let nested = src.join(&dir).join("mod.rs");
    [flat, nested].into_iter().find(|p| p.is_file())
}

struct Crate {
    files: BTreeMap<Module, Source>,
}

impl Crate {
    fn load(src: &Path) -> Crate {
        let mut files = BTreeMap::new();
        let mut todo = vec![Module::new()];
        while let Some(m) = todo.pop() {
            // An inline `mod x { }` has no file; its code is its parent's.
            let Some(path) = file_of(src, &m) else {
                continue;
            };
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let parsed = parse_source(&text);
            for child in &parsed.children {
                let mut c = m.clone();
                c.push(child.clone());
                todo.push(c);
            }
            files.insert(m, parsed);
        }
        Crate { files }
    }

    /// Makes a path absolute from module `m`: `crate::`, `super::`, `self::`, or a child of `m`.
    fn absolute(&self, m: &Module, path: &[String]) -> Option<Vec<String>> {
        let first = path.first()?;
        let (mut base, rest) = match first.as_str() {
            "crate" => (Vec::new(), &path[1..]),
            "self" => (m.clone(), &path[1..]),
            "super" => {
                let mut b = m.clone();
                let mut r = path;
                while r.first().is_some_and(|s| s == "super") {
                    b.pop();
                    r = &r[1..];
                }
                (b, r)
            }
            _ => {
                let mut child = m.clone();
                child.push(first.clone());
                if !self.files.contains_key(&child) {
                    return None;
                }
                (m.clone(), path)
            }
        };
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The file defining what `path` (absolute) names, through re-exports.
    fn resolve(&self, path: &[String], hops: usize) -> Option<Module> {
        let mut m = Module::new();
        let mut i = 0;
        while i < path.len() {
            let mut next = m.clone();
            next.push(path[i].clone());
            if !self.files.contains_key(&next) {
                break;
            }
            m = next;
            i += 1;
        }
        if let (Some(item), true) = (path.get(i), hops < 8) {
            if let Some(target) = self.files[&m].reexports.get(item) {
                let mut target = self.absolute(&m, target)?;
                target.extend(path[i + 1..].iter().cloned());
                return self.resolve(&target, hops + 1).or(Some(m));
            }
        }
        Some(m)
    }

    /// Edges of the file graph: module → modules it names.
    fn edges(&self) -> BTreeMap<Module, BTreeSet<Module>> {
        let mut edges = BTreeMap::new();
        for (m, src) in &self.files {
            let mut to = BTreeSet::new();
            let mut aliases: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for (bound, path) in &src.uses {
                if let Some(abs) = self.absolute(m, path) {
                    if let Some(target) = self.resolve(&abs, 0) {
                        to.insert(target);
                    }
                    aliases.insert(bound, abs);
                }
            }
            for path in paths_in(&src.code) {
                let abs = match aliases.get(path[0].as_str()) {
                    Some(a) => a.iter().chain(&path[1..]).cloned().collect(),
                    None => match self.absolute(m, &path) {
                        Some(a) => a,
                        None => continue,
                    },
                };
                if let Some(target) = self.resolve(&abs, 0) {
                    to.insert(target);
                }
            }
            to.remove(m);
            edges.insert(m.clone(), to);
        }
        edges
    }
}

/// Every `a::b::c` path in code (at least one `::`), as its segments.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if !ident_char(c[i]) || (i > 0 && (ident_char(c[i - 1]) || c[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let mut segs = Vec::new();
        let mut k = i;
        loop {
            let s = k;
            while k < c.len() && ident_char(c[k]) {
                k += 1;
            }
            segs.push(c[s..k].iter().collect::<String>());
            if c.get(k) == Some(&':')
                && c.get(k + 1) == Some(&':')
                && c.get(k + 2).is_some_and(|&ch| ident_char(ch))
            {
                k += 2;
            } else {
                break;
            }
        }
        if segs.len() > 1 {
            out.push(segs);
        }
        i = k.max(i + 1);
    }
    out
}

/// Strongly connected sets of more than one node (Tarjan), each sorted, sorted.
fn circles<N: Ord + Clone>(edges: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    struct State<N> {
        index: BTreeMap<N, usize>,
        low: BTreeMap<N, usize>,
        stack: Vec<N>,
        on_stack: BTreeSet<N>,
        next: usize,
        out: Vec<Vec<N>>,
    }
    fn visit<N: Ord + Clone>(n: &N, edges: &BTreeMap<N, BTreeSet<N>>, st: &mut State<N>) {
        st.index.insert(n.clone(), st.next);
        st.low.insert(n.clone(), st.next);
        st.next += 1;
        st.stack.push(n.clone());
        st.on_stack.insert(n.clone());
        for t in edges.get(n).into_iter().flatten() {
            if !st.index.contains_key(t) {
                visit(t, edges, st);
                let l = st.low[t].min(st.low[n]);
                st.low.insert(n.clone(), l);
            } else if st.on_stack.contains(t) {
                let l = st.index[t].min(st.low[n]);
                st.low.insert(n.clone(), l);
            }
        }
        if st.low[n] == st.index[n] {
            let mut set = Vec::new();
            while let Some(top) = st.stack.pop() {
                st.on_stack.remove(&top);
                let done = &top == n;
                set.push(top);
                if done {
                    break;
                }
            }
            if set.len() > 1 {
                set.sort();
                st.out.push(set);
            }
        }
    }
    let mut st = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for n in edges.keys() {
        if !st.index.contains_key(n) {
            visit(n, edges, &mut st);
        }
    }
    st.out.sort();
    st.out
}

fn print_graph(title: &str, edges: &BTreeMap<String, BTreeSet<String>>) {
    println!("{title}:");
    for (from, to) in edges {
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        println!("  {from} -> {}", to.join(", "));
    }
}

/// A module name → the names it imports.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The file graph and the top-level module graph of the crate whose `lib.rs` is in `src`.
fn graphs(src: &Path) -> (Graph, Graph) {
    let edges = Crate::load(src).edges();
    let files: Graph = edges
        .iter()
        .map(|(m, to)| (name(m), to.iter().map(name).collect()))
        .collect();
    // Top level: each file counts as the top-level module (folder) it is in.
    let head = |m: &Module| name(&m.iter().take(1).cloned().collect());
    let mut top = Graph::new();
    for (m, to) in &edges {
        let entry = top.entry(head(m)).or_default();
        entry.extend(to.iter().map(head).filter(|t| *t != head(m)));
    }
    (files, top)
}

/// Circles in either graph; a top-level one names its members `x (folder)`.
fn all_circles(files: &Graph, top: &Graph) -> Vec<Vec<String>> {
    let mut found = circles(files);
    found.extend(
        circles(top)
            .into_iter()
            .map(|c| c.into_iter().map(|n| format!("{n} (folder)")).collect()),
    );
    found.sort();
    found.dedup();
    found
}

/// The top-level module a graph node belongs to.
fn top_of(n: &str) -> &str {
    let n = n.trim_end_matches(" (folder)");
    n.split("::").next().unwrap_or(n)
}

#[test]
fn engine_modules_import_each_other_without_circles() {
    let (files, top) = graphs(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    print_graph("files", &files);
    print_graph("top-level modules", &top);
    let found = all_circles(&files, &top);
    for c in &found {
        println!("circle: {}", c.join(" <-> "));
    }
    let pending = |c: &&Vec<String>| c.iter().any(|n| PENDING.contains(&top_of(n)));
    let new: Vec<&Vec<String>> = found.iter().filter(|c| !pending(c)).collect();
    let stale: Vec<&&str> = PENDING
        .iter()
        .filter(|p| !found.iter().flatten().any(|n| top_of(n) == **p))
        .collect();
    assert!(
        new.is_empty(),
        "import circles in engine/src: {new:?}; a module must not reach back to one that uses it"
    );
    assert!(
        stale.is_empty(),
        "modules listed in PENDING are in no circle any more, remove them: {stale:?}"
    );
}

/// The reader on a small crate: what counts as an edge and what does not.
#[test]
fn reader_finds_circles_and_skips_tests_comments_and_strings() {
    let dir = std::env::temp_dir().join(format!("ringtun-import-graph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("f")).expect("temp dir");
    let write = |path: &str, text: &str| std::fs::write(dir.join(path), text).expect("write");
    write(
        "lib.rs",
        "pub mod a;\npub mod b;\npub mod c;\npub mod f;\npub use c::Thing;\n",
    );
    // a -> b through a grouped use; b -> a through a path in code: a circle.
    write("a.rs", "use crate::{b::{self, B}, Thing};\npub struct A;\n");
    write("b.rs", "pub struct B;\nfn f() { let _ = super::a::A; }\n");
    // c names a and f only in a comment, a string, a raw string and test code: no edge.
    write(
        "c.rs",
        "// crate::a::A\npub struct Thing;\nconst S: &str = \"crate::a::A\";\nconst R: &str = r#\"crate::f::x \"quoted\"\"#;\nconst C: char = '{';\n#[cfg(test)]\nmod tests {\n    use crate::a::A;\n}\n#[cfg(test)]\nmod more;\nfn g<'a>(x: &'a str) -> &'a str { x }\n",
    );
    // f/mod.rs re-exports its child; f::g uses c through the crate root's re-export.
    write("f/mod.rs", "mod g;\npub use g::G;\n");
    write("f/g.rs", "use crate::Thing;\npub struct G;\n");
    let (files, top) = graphs(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let edges = |n: &str| files[n].iter().cloned().collect::<Vec<_>>().join(",");
    assert_eq!(edges("a"), "b,c");
    assert_eq!(edges("b"), "a");
    assert_eq!(edges("c"), "");
    assert_eq!(edges("f"), "f::g");
    assert_eq!(edges("f::g"), "c");
    assert_eq!(edges("crate"), "c");
    assert!(
        !files.contains_key("c::more"),
        "a test-only file is not read"
    );
    assert_eq!(
        all_circles(&files, &top),
        [vec!["a", "b"], vec!["a (folder)", "b (folder)"]]
    );
}
