//! Where in the manifest's text a field is: the line and column of the offending value, for
//! every error about the manifest.
//!
//! The text is parsed a second time, only when there is an error to place, into toml's
//! document tree that keeps the span of every key and value. Two kinds of error need it:
//! a field that validation found wrong, named by its path (`source.blobs[1].sha256`), and an
//! error of the schema, which toml can place only at the enclosing table when the table is an
//! internally tagged enum (`source`, `output`: serde reads them through a buffer without
//! spans). The latter is narrowed by what the message names: the unknown key, the unknown
//! variant, or the quoted value that was refused.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One step of a field path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// `source.blobs[1].sha256` as steps; `None` for a path that is not of that form.
fn steps(field: &str) -> Option<Vec<Step>> {
    let mut out = Vec::new();
    for part in field.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if key.is_empty() {
            return None;
        }
        out.push(Step::Key(key.to_owned()));
        if !rest.is_empty() {
            rest = rest.strip_suffix(']')?;
            for index in rest.split("][") {
                out.push(Step::Index(index.parse().ok()?));
            }
        }
    }
    Some(out)
}

/// The path of steps as a field name: `source.blobs[1].sha256`.
fn field_name(steps: &[Step]) -> String {
    let mut s = String::new();
    for step in steps {
        match step {
            Step::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A place in the manifest: the package (when inside one), the field path within it, and the
/// span of the offending key or value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Place {
    pub package: Option<String>,
    pub field: String,
    pub span: Range<usize>,
}

/// The span of `package.<package>.<field>`: of the value itself, or, for a field that is not
/// in the text (a missing key), of the nearest enclosing key that is. `None` when the text
/// does not parse or the package is not in it.
/// When the field is a table or an array and `message` quotes one of the strings inside it
/// (`` `-x` is not a Debian package name``), the span of that string.
pub(crate) fn field_span(
    text: &str,
    package: &str,
    field: &str,
    message: &str,
) -> Option<Range<usize>> {
    let doc = DeTable::parse(text).ok()?;
    let mut path = vec![Step::Key("package".into()), Step::Key(package.into())];
    path.extend(steps(field).unwrap_or_default());
    let mut node = Node::Table(doc.get_ref());
    let mut best = None;
    for step in &path {
        let Some((_, key_span, child)) = node.children().find(|(s, _, _)| s == step) else {
            break;
        };
        // A table (`[package.x]`, dotted keys) is pointed at where its key names it; any
        // other value at itself.
        best = Some(match child.get_ref() {
            DeValue::Table(_) => key_span,
            _ => child.span(),
        });
        node = Node::Value(child);
    }
    if let Node::Value(v) = node {
        if matches!(v.get_ref(), DeValue::Table(_) | DeValue::Array(_)) {
            if let Some((_, span)) =
                backticked(message).iter().find_map(|q| node.find_string(q, &mut Vec::new()))
            {
                return Some(span);
            }
        }
    }
    best
}

/// Narrows a schema error toml placed at `span` to the key or value its `message` names, and
/// says which package and field that is.
pub(crate) fn refine(text: &str, span: Range<usize>, message: &str) -> Option<Place> {
    let doc = DeTable::parse(text).ok()?;
    // The deepest value whose span holds the error's. A table's span is only where it is
    // named (its header, or the first key of its dotted keys), not its whole extent, so every
    // node is looked at, not only the children of a match.
    let mut best: Option<(Vec<Step>, Range<usize>, &Spanned<DeValue<'_>>)> = None;
    let mut walk = Vec::new();
    deepest(Node::Table(doc.get_ref()), &span, &mut walk, &mut best);
    let (path, node_span, node) = match best {
        Some((path, node_span, value)) => (path, node_span, Node::Value(value)),
        None => (Vec::new(), span.clone(), Node::Table(doc.get_ref())),
    };
    let quoted = backticked(message);
    // An unknown or missing key: the key itself, or the table that lacks it.
    let (mut steps, mut place) = (path.clone(), node_span.clone());
    if message.starts_with("unknown field") {
        let key = quoted.first().map(|k| Step::Key((*k).to_owned()));
        if let Some(at) = key.as_ref().and_then(|k| path.iter().position(|s| s == k)) {
            // The unknown key is the blamed table itself or one above it (`[packages.a]`).
            steps.truncate(at + 1);
            if let Some(span) = key_span(Node::Table(doc.get_ref()), &steps) {
                place = span;
            }
        } else if let Some((found, key_span)) =
            // The key may sit deeper than the table toml blamed (`source.rust.relase` is
            // reported at `source`).
            quoted.first().and_then(|key| node.find_key(key, &mut Vec::new()))
        {
            steps.extend(found);
            place = key_span;
        }
    } else if message.starts_with("missing field") {
        if let Some(key) = quoted.first() {
            steps.push(Step::Key((*key).to_owned()));
        }
    } else if let Some((found, found_span)) =
        quoted.iter().find_map(|q| node.find_string(q, &mut Vec::new()))
    {
        // A refused value (an unknown variant, a malformed digest or name): the string.
        steps.extend(found);
        place = found_span;
    }
    let (package, field) = match steps.as_slice() {
        [Step::Key(p), Step::Key(name), rest @ ..] if p == "package" => {
            (Some(name.clone()), field_name(rest))
        }
        rest => (None, field_name(rest)),
    };
    Some(Place { package, field, span: place })
}

fn contains(outer: Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end && outer != (0..0)
}

/// The span of the key at the end of `path`, walked from `node`.
fn key_span(node: Node<'_, '_>, path: &[Step]) -> Option<Range<usize>> {
    let (first, rest) = path.split_first()?;
    let (_, span, child) = node.children().find(|(s, _, _)| s == first)?;
    if rest.is_empty() {
        Some(span)
    } else {
        key_span(Node::Value(child), rest)
    }
}

/// Records in `best` the deepest node at or below `node` whose span holds `span`.
fn deepest<'a, 'i>(
    node: Node<'a, 'i>,
    span: &Range<usize>,
    path: &mut Vec<Step>,
    best: &mut Option<(Vec<Step>, Range<usize>, &'a Spanned<DeValue<'i>>)>,
) {
    for (step, _, child) in node.children() {
        path.push(step);
        if contains(child.span(), span)
            && best.as_ref().is_none_or(|(p, _, _)| p.len() < path.len())
        {
            *best = Some((path.clone(), child.span(), child));
        }
        deepest(Node::Value(child), span, path, best);
        path.pop();
    }
}

/// The words of a message in backticks: serde's and our own way of quoting a name or value.
fn backticked(message: &str) -> Vec<&str> {
    message.split('`').skip(1).step_by(2).collect()
}

/// A table or a value of the document, to walk it the same way.
#[derive(Clone, Copy)]
enum Node<'a, 'i> {
    Table(&'a DeTable<'i>),
    Value(&'a Spanned<DeValue<'i>>),
}

impl<'a, 'i> Node<'a, 'i> {
    /// Each child with its step, the span of its key (its own span in an array) and itself.
    fn children(
        self,
    ) -> Box<dyn Iterator<Item = (Step, Range<usize>, &'a Spanned<DeValue<'i>>)> + 'a>
    where
        'i: 'a,
    {
        let table = match self {
            Node::Table(t) => Some(t),
            Node::Value(v) => match v.get_ref() {
                DeValue::Table(t) => Some(t),
                DeValue::Array(a) => {
                    return Box::new(
                        a.iter().enumerate().map(|(i, v)| (Step::Index(i), v.span(), v)),
                    )
                }
                _ => None,
            },
        };
        match table {
            Some(t) => {
                Box::new(t.iter().map(|(k, v)| (Step::Key(k.get_ref().to_string()), k.span(), v)))
            }
            None => Box::new(std::iter::empty()),
        }
    }

    /// The first key named `wanted` at or below this node: its path and the key's span.
    fn find_key(self, wanted: &str, path: &mut Vec<Step>) -> Option<(Vec<Step>, Range<usize>)> {
        for (step, key_span, child) in self.children() {
            path.push(step.clone());
            if step == Step::Key(wanted.to_owned()) {
                return Some((path.clone(), key_span));
            }
            let found = Node::Value(child).find_key(wanted, path);
            path.pop();
            if found.is_some() {
                return found;
            }
        }
        None
    }

    /// The first string value equal to `wanted` at or below this node: its path and span.
    fn find_string(self, wanted: &str, path: &mut Vec<Step>) -> Option<(Vec<Step>, Range<usize>)> {
        if let Node::Value(v) = self {
            if let DeValue::String(s) = v.get_ref() {
                return (s.as_ref() == wanted).then(|| (path.clone(), v.span()));
            }
        }
        for (step, _, child) in self.children() {
            path.push(step);
            let found = Node::Value(child).find_string(wanted, path);
            path.pop();
            if found.is_some() {
                return found;
            }
        }
        None
    }
}
