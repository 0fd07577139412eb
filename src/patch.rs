//! Unified diffs: parsed from git-style or `diff -u` patches and applied in
//! memory against the pristine tree, like `patch -p1`: a hunk may land at an
//! offset from its stated line, and with fuzz only when the caller allows it.
//!
//! Nothing here touches the file system: [`parse`] turns patch text into
//! [`Patch`]es and [`apply_all`] computes the new content of every touched
//! file from a caller-supplied reader, so the pristine tree is never written.

use crate::Error;
use anyhow::Result;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// One patch file: the per-file changes it contains, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    /// Where the patch came from, for error messages.
    pub origin: PathBuf,
    pub files: Vec<FilePatch>,
}

/// What a file section does to its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Modify,
    Create,
    Delete,
    /// `old_path` moves to `new_path`, with the hunks applied on the way.
    Rename,
    /// `new_path` starts as a copy of `old_path`, with the hunks applied.
    Copy,
}

/// The changes to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePatch {
    /// Line of the patch where this file's section starts (1-based).
    pub line: usize,
    pub operation: Operation,
    /// Path relative to the tree root before the change (`None` for a new file).
    pub old_path: Option<PathBuf>,
    /// Path relative to the tree root after the change (`None` for a deletion).
    pub new_path: Option<PathBuf>,
    pub hunks: Vec<Hunk>,
    /// The section came from `git diff` (names are exact); plain `diff -u`
    /// sections with differing names patch whichever of the two exists.
    pub git: bool,
}

/// One `@@ -a,b +c,d @@` hunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hunk {
    /// Line of the `@@` header in the patch (1-based).
    pub line: usize,
    pub old_start: usize,
    pub old_len: usize,
    pub new_start: usize,
    pub new_len: usize,
    pub lines: Vec<HunkLine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    Context,
    Remove,
    Add,
}

/// One line of a hunk; `text` includes its `\n` unless the patch said
/// `\ No newline at end of file` after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HunkLine {
    pub kind: LineKind,
    pub text: Vec<u8>,
}

impl Hunk {
    /// Context lines before the first change and after the last one.
    fn context_counts(&self) -> (usize, usize) {
        let lead = self
            .lines
            .iter()
            .take_while(|l| l.kind == LineKind::Context)
            .count();
        let trail = self
            .lines
            .iter()
            .rev()
            .take_while(|l| l.kind == LineKind::Context)
            .count();
        (lead, trail)
    }
}

impl Patch {
    /// Read and parse a patch file.
    pub fn from_file(path: &Path) -> Result<Patch> {
        let data = std::fs::read(path).map_err(|e| Error::Input {
            path: path.to_path_buf(),
            message: format!("cannot read patch: {e}"),
        })?;
        parse_bytes(&data, path)
    }

    /// Every path this patch reads or writes, in order of appearance.
    pub fn paths(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::new();
        for f in &self.files {
            for p in [&f.old_path, &f.new_path].into_iter().flatten() {
                if !out.contains(&p.as_path()) {
                    out.push(p);
                }
            }
        }
        out
    }
}

fn input_error(origin: &Path, line: usize, message: impl std::fmt::Display) -> anyhow::Error {
    Error::Input {
        path: origin.to_path_buf(),
        message: format!("line {line}: {message}"),
    }
    .into()
}

/// Parse a unified diff. Anything before the first file section (mail
/// headers, a commit message, a diffstat) and between sections is ignored.
pub fn parse(text: &str, origin: &Path) -> Result<Patch> {
    parse_bytes(text.as_bytes(), origin)
}

/// [`parse`] for patch text that need not be UTF-8.
pub fn parse_bytes(data: &[u8], origin: &Path) -> Result<Patch> {
    let lines: Vec<&[u8]> = split_lines(data)
        .map(|l| l.strip_suffix(b"\n").unwrap_or(l))
        .collect();
    let mut parser = Parser {
        lines: &lines,
        pos: 0,
        origin,
    };
    let mut files = Vec::new();
    while parser.pos < lines.len() {
        if let Some(file) = parser.next_file()? {
            files.push(file);
        }
    }
    if files.is_empty() {
        return Err(Error::Input {
            path: origin.to_path_buf(),
            message: "no unified diff found in the patch".into(),
        }
        .into());
    }
    Ok(Patch {
        origin: origin.to_path_buf(),
        files,
    })
}

fn split_lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split_inclusive(|&b| b == b'\n')
}

struct Parser<'a> {
    lines: &'a [&'a [u8]],
    /// Index of the next line to look at (0-based).
    pos: usize,
    origin: &'a Path,
}

/// Names gathered from a file section's headers, before they are combined.
#[derive(Default)]
struct Headers {
    git: Option<(Option<PathBuf>, Option<PathBuf>)>,
    minus: Option<Option<PathBuf>>,
    plus: Option<Option<PathBuf>>,
    rename_from: Option<PathBuf>,
    rename_to: Option<PathBuf>,
    copy_from: Option<PathBuf>,
    copy_to: Option<PathBuf>,
    new_file: bool,
    deleted_file: bool,
    epoch_minus: bool,
    epoch_plus: bool,
}

impl<'a> Parser<'a> {
    fn line(&self, idx: usize) -> Option<&'a [u8]> {
        self.lines.get(idx).copied()
    }

    fn err(&self, idx: usize, message: impl std::fmt::Display) -> anyhow::Error {
        input_error(self.origin, idx + 1, message)
    }

    /// Skip to and parse the next file section; `None` when only commentary was left.
    fn next_file(&mut self) -> Result<Option<FilePatch>> {
        // Find the start of a section.
        let start = loop {
            let Some(line) = self.line(self.pos) else {
                return Ok(None);
            };
            if line.starts_with(b"diff --git ") {
                break self.pos;
            }
            if line.starts_with(b"diff --cc ") || line.starts_with(b"diff --combined ") {
                return Err(self.err(self.pos, "combined (merge) diffs are not supported"));
            }
            if is_binary_marker(line) {
                return Err(self.err(self.pos, "binary patches are not supported"));
            }
            if line.starts_with(b"--- ")
                && self
                    .line(self.pos + 1)
                    .is_some_and(|l| l.starts_with(b"+++ "))
                && self
                    .line(self.pos + 2)
                    .is_some_and(|l| l.starts_with(b"@@ "))
            {
                break self.pos;
            }
            self.pos += 1;
        };
        let mut h = Headers::default();
        let git = self.lines[start].starts_with(b"diff --git ");
        if git {
            let rest = &self.lines[start][b"diff --git ".len()..];
            h.git = Some(self.git_names(start, rest)?);
            self.pos += 1;
            // Extended headers, up to `---` or the first hunk or the next section.
            while let Some(line) = self.line(self.pos) {
                if line.starts_with(b"--- ")
                    || line.starts_with(b"@@ ")
                    || line.starts_with(b"diff ")
                {
                    break;
                }
                if is_binary_marker(line) {
                    return Err(self.err(self.pos, "binary patches are not supported"));
                }
                let field = |prefix: &[u8]| line.strip_prefix(prefix);
                if let Some(v) = field(b"rename from ") {
                    h.rename_from = Some(self.plain_path(self.pos, v)?);
                } else if let Some(v) = field(b"rename to ") {
                    h.rename_to = Some(self.plain_path(self.pos, v)?);
                } else if let Some(v) = field(b"copy from ") {
                    h.copy_from = Some(self.plain_path(self.pos, v)?);
                } else if let Some(v) = field(b"copy to ") {
                    h.copy_to = Some(self.plain_path(self.pos, v)?);
                } else if line.starts_with(b"new file mode ") {
                    h.new_file = true;
                } else if line.starts_with(b"deleted file mode ") {
                    h.deleted_file = true;
                } else if line.starts_with(b"old mode ")
                    || line.starts_with(b"new mode ")
                    || line.starts_with(b"index ")
                    || line.starts_with(b"similarity index ")
                    || line.starts_with(b"dissimilarity index ")
                {
                    // Modes and blob ids do not affect the content.
                } else {
                    // Anything else ends the header block (commentary).
                    break;
                }
                self.pos += 1;
            }
        }
        if self.line(self.pos).is_some_and(|l| l.starts_with(b"--- ")) {
            let minus_idx = self.pos;
            let plus_idx = self.pos + 1;
            let Some(plus) = self.line(plus_idx).filter(|l| l.starts_with(b"+++ ")) else {
                return Err(self.err(plus_idx, "expected a `+++` line after `---`"));
            };
            let (minus_path, epoch) = self.dash_name(minus_idx, &self.lines[minus_idx][4..])?;
            h.minus = Some(minus_path);
            h.epoch_minus = epoch;
            let (plus_path, epoch) = self.dash_name(plus_idx, &plus[4..])?;
            h.plus = Some(plus_path);
            h.epoch_plus = epoch;
            self.pos += 2;
        }
        let mut hunks = Vec::new();
        while self.line(self.pos).is_some_and(|l| l.starts_with(b"@@ ")) {
            hunks.push(self.hunk()?);
        }
        if !git && hunks.is_empty() {
            return Err(self.err(start, "file header without any hunk"));
        }
        if git && hunks.is_empty() && h.minus.is_some() {
            return Err(self.err(start, "file header without any hunk"));
        }
        self.combine(start, git, h, hunks).map(Some)
    }

    fn combine(&self, start: usize, git: bool, h: Headers, hunks: Vec<Hunk>) -> Result<FilePatch> {
        let mut file = FilePatch {
            line: start + 1,
            operation: Operation::Modify,
            old_path: None,
            new_path: None,
            hunks,
            git,
        };
        if let (Some(from), Some(to)) = (h.rename_from.clone(), h.rename_to.clone()) {
            file.operation = Operation::Rename;
            file.old_path = Some(from);
            file.new_path = Some(to);
        } else if let (Some(from), Some(to)) = (h.copy_from.clone(), h.copy_to.clone()) {
            file.operation = Operation::Copy;
            file.old_path = Some(from);
            file.new_path = Some(to);
        } else if h.rename_from.is_some()
            || h.rename_to.is_some()
            || h.copy_from.is_some()
            || h.copy_to.is_some()
        {
            return Err(self.err(start, "rename or copy without both `from` and `to` lines"));
        } else {
            let (old, new) = match (h.minus, h.plus) {
                (Some(m), Some(p)) => {
                    // `diff -N` marks created and deleted files with the epoch.
                    let m = if !git && h.epoch_minus && is_whole_file(&file.hunks, true) {
                        None
                    } else {
                        m
                    };
                    let p = if !git && h.epoch_plus && is_whole_file(&file.hunks, false) {
                        None
                    } else {
                        p
                    };
                    (m, p)
                }
                _ => match h.git {
                    Some((a, b)) => (a, b),
                    None => return Err(self.err(start, "file section without names")),
                },
            };
            let (old, new) = if h.new_file {
                (None, new.or(old))
            } else if h.deleted_file {
                (old.or(new), None)
            } else {
                (old, new)
            };
            file.operation = match (&old, &new) {
                (None, Some(_)) => Operation::Create,
                (Some(_), None) => Operation::Delete,
                (Some(_), Some(_)) => Operation::Modify,
                (None, None) => return Err(self.err(start, "both sides of the diff are /dev/null")),
            };
            if git && file.operation == Operation::Modify && old != new {
                return Err(self.err(
                    start,
                    "the old and new names differ without a `rename` header",
                ));
            }
            file.old_path = old;
            file.new_path = new;
        }
        if file.operation == Operation::Create && file.hunks.iter().any(|h| h.old_len != 0) {
            return Err(self.err(start, "a new file's hunk removes lines"));
        }
        if file.operation == Operation::Delete && file.hunks.iter().any(|h| h.new_len != 0) {
            return Err(self.err(start, "a deleted file's hunk adds lines"));
        }
        Ok(file)
    }

    /// `a/x b/x` from `diff --git`; names in `---`/`+++` take precedence later.
    fn git_names(&self, idx: usize, rest: &[u8]) -> Result<(Option<PathBuf>, Option<PathBuf>)> {
        let (a, b) = if rest.first() == Some(&b'"') {
            let (a, used) = unquote(rest).ok_or_else(|| self.err(idx, "bad quoted name"))?;
            let tail = rest[used..].strip_prefix(b" ").unwrap_or(&rest[used..]);
            let b = if tail.first() == Some(&b'"') {
                unquote(tail)
                    .ok_or_else(|| self.err(idx, "bad quoted name"))?
                    .0
            } else {
                tail.to_vec()
            };
            (a, b)
        } else if let Some(q) = rest.windows(2).position(|w| w == b" \"") {
            let b = unquote(&rest[q + 1..])
                .ok_or_else(|| self.err(idx, "bad quoted name"))?
                .0;
            (rest[..q].to_vec(), b)
        } else {
            // Unquoted names may contain spaces: prefer the split where both
            // halves name the same file, as they do unless renamed.
            let n = rest.len();
            let same = (n % 2 == 1)
                .then(|| (&rest[..n / 2], &rest[n / 2 + 1..]))
                .filter(|(a, b)| rest[n / 2] == b' ' && a.get(2..) == b.get(2..) && a.len() > 2);
            match same {
                Some((a, b)) => (a.to_vec(), b.to_vec()),
                None => match rest.windows(3).position(|w| w == b" b/") {
                    Some(p) => (rest[..p].to_vec(), rest[p + 1..].to_vec()),
                    None => return Err(self.err(idx, "cannot read the names on `diff --git`")),
                },
            }
        };
        Ok((
            Some(self.strip_path(idx, &a)?),
            Some(self.strip_path(idx, &b)?),
        ))
    }

    /// Name on a `---`/`+++` line: `None` for /dev/null; also whether a
    /// `diff -N` epoch timestamp follows it.
    fn dash_name(&self, idx: usize, rest: &[u8]) -> Result<(Option<PathBuf>, bool)> {
        let (name, stamp): (Vec<u8>, &[u8]) = if rest.first() == Some(&b'"') {
            let (name, used) = unquote(rest).ok_or_else(|| self.err(idx, "bad quoted name"))?;
            (name, &rest[used..])
        } else {
            match rest.iter().position(|&b| b == b'\t') {
                Some(t) => (rest[..t].to_vec(), &rest[t..]),
                None => (trim_end(rest).to_vec(), &[][..]),
            }
        };
        let stamp = String::from_utf8_lossy(stamp);
        let epoch = stamp.contains("1970-01-01 00:00:00") || stamp.contains("1969-12-31 ");
        if name == b"/dev/null" {
            return Ok((None, epoch));
        }
        Ok((Some(self.strip_path(idx, &name)?), epoch))
    }

    /// A name on `rename from` and friends: already without the `a/` prefix.
    fn plain_path(&self, idx: usize, raw: &[u8]) -> Result<PathBuf> {
        let raw = if raw.first() == Some(&b'"') {
            unquote(raw)
                .ok_or_else(|| self.err(idx, "bad quoted name"))?
                .0
        } else {
            trim_end(raw).to_vec()
        };
        self.check_path(idx, &raw)
    }

    /// Drop the first path component, like `patch -p1`, and check what is left.
    fn strip_path(&self, idx: usize, raw: &[u8]) -> Result<PathBuf> {
        if raw.first() == Some(&b'/') {
            return Err(self.err(
                idx,
                format!(
                    "absolute path {} is not allowed",
                    String::from_utf8_lossy(raw)
                ),
            ));
        }
        let mut parts = raw.splitn(2, |&b| b == b'/');
        let _prefix = parts.next();
        match parts.next() {
            Some(rest) if !rest.is_empty() => self.check_path(idx, rest),
            _ => Err(self.err(
                idx,
                format!(
                    "path {} has no leading folder to strip (patches are applied like `patch -p1`)",
                    String::from_utf8_lossy(raw)
                ),
            )),
        }
    }

    /// Only plain relative paths inside the tree are accepted.
    fn check_path(&self, idx: usize, raw: &[u8]) -> Result<PathBuf> {
        let shown = String::from_utf8_lossy(raw);
        if raw.is_empty() || raw.contains(&0) {
            return Err(self.err(idx, format!("invalid path {shown:?}")));
        }
        let path = Path::new(OsStr::from_bytes(raw));
        let mut clean = PathBuf::new();
        for c in path.components() {
            match c {
                Component::Normal(p) => clean.push(p),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(self.err(idx, format!("path {shown} leaves the tree through `..`")))
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(self.err(idx, format!("absolute path {shown} is not allowed")))
                }
            }
        }
        if clean.as_os_str().is_empty() {
            return Err(self.err(idx, format!("invalid path {shown:?}")));
        }
        Ok(clean)
    }

    fn hunk(&mut self) -> Result<Hunk> {
        let idx = self.pos;
        let header = self.lines[idx];
        let (old_start, old_len, new_start, new_len) =
            parse_hunk_header(header).ok_or_else(|| self.err(idx, "malformed hunk header"))?;
        if (old_start == 0 && old_len != 0) || (new_start == 0 && new_len != 0) {
            return Err(self.err(idx, "hunk starts at line 0"));
        }
        // Bounded so that every offset computed from them fits an isize.
        if [old_start, old_len, new_start, new_len]
            .iter()
            .any(|&n| n > MAX_HUNK_LINE)
        {
            return Err(self.err(
                idx,
                format!("hunk header numbers a line past {MAX_HUNK_LINE}"),
            ));
        }
        self.pos += 1;
        let mut lines: Vec<HunkLine> = Vec::new();
        let (mut old_seen, mut new_seen) = (0usize, 0usize);
        while old_seen < old_len || new_seen < new_len {
            let Some(line) = self.line(self.pos) else {
                return Err(self.err(
                    self.pos.min(self.lines.len().saturating_sub(1)),
                    format!("hunk at line {} is truncated", idx + 1),
                ));
            };
            let (kind, text) = match line.first() {
                Some(b' ') => (LineKind::Context, &line[1..]),
                Some(b'-') => (LineKind::Remove, &line[1..]),
                Some(b'+') => (LineKind::Add, &line[1..]),
                // Mailers strip the space from empty context lines.
                None => (LineKind::Context, line),
                Some(b'\r') if line.len() == 1 => (LineKind::Context, line),
                Some(b'\\') if !lines.is_empty() => {
                    self.no_newline(&mut lines);
                    self.pos += 1;
                    continue;
                }
                _ => {
                    return Err(self.err(
                        self.pos,
                        format!(
                            "unexpected line in the hunk starting at line {} (hunk is shorter than its header says)",
                            idx + 1
                        ),
                    ))
                }
            };
            match kind {
                LineKind::Context => {
                    old_seen += 1;
                    new_seen += 1;
                }
                LineKind::Remove => old_seen += 1,
                LineKind::Add => new_seen += 1,
            }
            if old_seen > old_len || new_seen > new_len {
                return Err(self.err(
                    self.pos,
                    format!(
                        "hunk starting at line {} is longer than its header says",
                        idx + 1
                    ),
                ));
            }
            let mut text = text.to_vec();
            text.push(b'\n');
            lines.push(HunkLine { kind, text });
            self.pos += 1;
        }
        // `\ No newline at end of file` may follow the last line.
        if self
            .line(self.pos)
            .is_some_and(|l| l.first() == Some(&b'\\'))
            && !lines.is_empty()
        {
            self.no_newline(&mut lines);
            self.pos += 1;
        }
        Ok(Hunk {
            line: idx + 1,
            old_start,
            old_len,
            new_start,
            new_len,
            lines,
        })
    }

    fn no_newline(&self, lines: &mut [HunkLine]) {
        if let Some(last) = lines.last_mut() {
            if last.text.last() == Some(&b'\n') {
                last.text.pop();
                // CRLF files: the \r stays, as it is part of the content.
            }
        }
    }
}

fn is_binary_marker(line: &[u8]) -> bool {
    line == b"GIT binary patch"
        || (line.starts_with(b"Binary files ") && line.ends_with(b" differ"))
}

/// All hunks together cover a whole file on the given side being empty.
fn is_whole_file(hunks: &[Hunk], old_side: bool) -> bool {
    hunks.len() == 1
        && if old_side {
            hunks[0].old_start == 0 && hunks[0].old_len == 0
        } else {
            hunks[0].new_start == 0 && hunks[0].new_len == 0
        }
}

fn trim_end(s: &[u8]) -> &[u8] {
    let mut end = s.len();
    while end > 0 && matches!(s[end - 1], b' ' | b'\r' | b'\t') {
        end -= 1;
    }
    &s[..end]
}

/// `@@ -a[,b] +c[,d] @@ ...` → (a, b, c, d); a missing count means 1.
/// The largest line number or length a hunk header may state; no source
/// file comes near it.
const MAX_HUNK_LINE: usize = u32::MAX as usize;

fn parse_hunk_header(line: &[u8]) -> Option<(usize, usize, usize, usize)> {
    let rest = line.strip_prefix(b"@@ -")?;
    let end = rest.windows(3).position(|w| w == b" @@")?;
    let ranges = std::str::from_utf8(&rest[..end]).ok()?;
    let (old, new) = ranges.split_once(" +")?;
    let range = |r: &str| -> Option<(usize, usize)> {
        match r.split_once(',') {
            Some((s, l)) => Some((number(s)?, number(l)?)),
            None => Some((number(r)?, 1)),
        }
    };
    let (a, b) = range(old)?;
    let (c, d) = range(new)?;
    Some((a, b, c, d))
}

fn number(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Undo git's C-style quoting of a name starting with `"`; returns the
/// name and how many bytes of `s` it used.
fn unquote(s: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'"' => return Some((out, i + 1)),
            b'\\' => {
                let c = *s.get(i + 1)?;
                i += 2;
                match c {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'a' => out.push(7),
                    b'b' => out.push(8),
                    b'f' => out.push(12),
                    b'v' => out.push(11),
                    b'0'..=b'7' => {
                        let mut v: u32 = (c - b'0') as u32;
                        for _ in 0..2 {
                            match s.get(i) {
                                Some(&d @ b'0'..=b'7') => {
                                    v = v * 8 + (d - b'0') as u32;
                                    i += 1;
                                }
                                _ => break,
                            }
                        }
                        out.push(u8::try_from(v).ok()?);
                    }
                    other => out.push(other),
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    None
}

/// New content of every file the patches touch: `Some(bytes)`, or `None`
/// when the file is deleted. Files whose only change is their mode are not
/// listed.
pub type Changes = BTreeMap<PathBuf, Option<Vec<u8>>>;

/// A reader for [`apply_all`] over a tree on disk: the content of
/// `root/path`, or `None` when there is no such file. It only reads.
pub fn tree_reader(root: &Path) -> impl Fn(&Path) -> Result<Option<Vec<u8>>> + '_ {
    move |path: &Path| {
        let full = root.join(path);
        match std::fs::read(&full) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot read {}", full.display()))),
        }
    }
}

/// [`apply_with_fuzz`] without fuzz: every hunk's context must match in full.
pub fn apply_all(
    patches: &[Patch],
    read: impl Fn(&Path) -> Result<Option<Vec<u8>>>,
) -> Result<Changes> {
    apply_with_fuzz(patches, read, 0).map(|applied| applied.changes)
}

/// The patches applied: new file contents, and one line for every hunk that
/// landed elsewhere than its header says or with fuzz.
#[derive(Debug)]
pub struct Applied {
    pub changes: Changes,
    pub notes: Vec<String>,
}

/// Apply `patches` in order, each seeing the results of the earlier ones.
/// `read` gives the pristine content of a path relative to the tree root,
/// `None` when the file does not exist. Pure: nothing is written.
///
/// A hunk is looked for at the line its header names, shifted by the offset
/// the previous hunk of the file landed at, then ever farther away; with
/// `max_fuzz` > 0 it may also land ignoring up to that many context lines
/// at its start and end (as `patch --fuzz` does).
pub fn apply_with_fuzz(
    patches: &[Patch],
    read: impl Fn(&Path) -> Result<Option<Vec<u8>>>,
    max_fuzz: usize,
) -> Result<Applied> {
    let mut state: Changes = BTreeMap::new();
    let mut notes = Vec::new();
    let current = |state: &Changes, path: &Path| -> Result<Option<Vec<u8>>> {
        match state.get(path) {
            Some(content) => Ok(content.clone()),
            None => read(path),
        }
    };
    for patch in patches {
        for file in &patch.files {
            let fail = |path: &Path, message: String| -> anyhow::Error {
                Error::Input {
                    path: patch.origin.clone(),
                    message: format!("line {}: {}: {message}", file.line, path.display()),
                }
                .into()
            };
            // The hunks applied to `content`, their landings noted.
            let mut place = |content: &[u8], path: &Path| -> Result<Vec<u8>> {
                let placed = place_hunks(content, &file.hunks, max_fuzz)
                    .map_err(|e| e.error(patch, path, max_fuzz))?;
                for (number, landing) in placed.landings.iter().enumerate() {
                    if let Some(note) = landing.note(path, number + 1) {
                        notes.push(match patches.len() {
                            1 => note,
                            _ => format!("{note} ({})", patch.origin.display()),
                        });
                    }
                }
                Ok(placed.content)
            };
            match file.operation {
                Operation::Create => {
                    let path = file.new_path.as_deref().expect("created file has a name");
                    if current(&state, path)?.is_some() {
                        return Err(fail(
                            path,
                            "the patch creates it but it already exists".into(),
                        ));
                    }
                    let content = place(&[], path)?;
                    state.insert(path.to_path_buf(), Some(content));
                }
                Operation::Delete => {
                    let path = file.old_path.as_deref().expect("deleted file has a name");
                    let Some(old) = current(&state, path)? else {
                        return Err(fail(
                            path,
                            "the patch deletes it but it does not exist".into(),
                        ));
                    };
                    let content = place(&old, path)?;
                    if !content.is_empty() {
                        return Err(fail(
                            path,
                            "the patch deletes it but it has content the patch does not remove"
                                .into(),
                        ));
                    }
                    state.insert(path.to_path_buf(), None);
                }
                Operation::Modify => {
                    let old_path = file.old_path.as_deref().expect("modified file has a name");
                    let new_path = file.new_path.as_deref().expect("modified file has a name");
                    // Plain diffs may name e.g. `x.c.orig` and `x.c`: patch
                    // the one that exists, preferring the new name as patch(1) does.
                    let mut found = None;
                    for p in [new_path, old_path] {
                        if let Some(c) = current(&state, p)? {
                            found = Some((p, c));
                            break;
                        }
                    }
                    let Some((path, old)) = found else {
                        return Err(fail(new_path, "the file to patch does not exist".into()));
                    };
                    if file.hunks.is_empty() {
                        continue; // mode change only
                    }
                    let content = place(&old, path)?;
                    state.insert(path.to_path_buf(), Some(content));
                }
                Operation::Rename | Operation::Copy => {
                    let from = file.old_path.as_deref().expect("rename has a source");
                    let to = file.new_path.as_deref().expect("rename has a target");
                    let Some(old) = current(&state, from)? else {
                        return Err(fail(
                            from,
                            "the file to rename or copy does not exist".into(),
                        ));
                    };
                    if from != to && current(&state, to)?.is_some() {
                        return Err(fail(to, "the rename or copy target already exists".into()));
                    }
                    let content = place(&old, to)?;
                    if file.operation == Operation::Rename && from != to {
                        state.insert(from.to_path_buf(), None);
                    }
                    state.insert(to.to_path_buf(), Some(content));
                }
            }
        }
    }
    Ok(Applied {
        changes: state,
        notes,
    })
}

/// Where a hunk landed in the file it patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Landing {
    /// Line of the file where the hunk's old text starts, counting the
    /// context lines the fuzz ignored (1-based, as in the hunk header).
    line: isize,
    /// Lines from where the hunk's header says it starts.
    offset: isize,
    /// Context lines ignored at each end.
    fuzz: usize,
}

impl Landing {
    /// `at line 891 with fuzz 2 (offset 23 lines)`: where it landed, and how
    /// that differs from the header.
    fn how(&self) -> String {
        let fuzz = match self.fuzz {
            0 => String::new(),
            n => format!(" with fuzz {n}"),
        };
        let offset = match self.offset {
            0 => String::new(),
            1 | -1 => format!(" (offset {} line)", self.offset),
            n => format!(" (offset {n} lines)"),
        };
        format!("at line {}{fuzz}{offset}", self.line)
    }

    fn note(&self, path: &Path, number: usize) -> Option<String> {
        (self.offset != 0 || self.fuzz != 0)
            .then(|| format!("{}: hunk #{number} applied {}", path.display(), self.how()))
    }
}

/// The hunks of one file section applied to its content.
struct Placed {
    content: Vec<u8>,
    /// One per hunk, in order.
    landings: Vec<Landing>,
}

/// A hunk that did not match, by number (1-based) and patch line.
struct HunkFailure {
    number: usize,
    line: usize,
    why: Miss,
}

enum Miss {
    /// The hunk cannot land anywhere; the text says why.
    Nowhere(&'static str),
    /// It lands only with more fuzz than allowed: here, and the most fuzz
    /// this hunk and the file's later ones need (when they land at all).
    NeedsFuzz { landing: Landing, file_fuzz: usize },
}

impl HunkFailure {
    fn error(&self, patch: &Patch, path: &Path, allowed: usize) -> anyhow::Error {
        let why = match &self.why {
            Miss::Nowhere(why) => format!("does not apply: {why}"),
            Miss::NeedsFuzz { landing, file_fuzz } => {
                let allowed = match allowed {
                    0 => "without fuzz".to_string(),
                    n => format!("with fuzz {n}"),
                };
                let later = if *file_fuzz > landing.fuzz {
                    format!(" (the file's later hunks need fuzz {file_fuzz})")
                } else {
                    String::new()
                };
                format!(
                    "does not apply {allowed}: applies with fuzz {} at line {}; rerun with --fuzz {file_fuzz} to accept it{later}",
                    landing.fuzz, landing.line
                )
            }
        };
        Error::Input {
            path: patch.origin.clone(),
            message: format!(
                "line {}: hunk #{} for {} {why}",
                self.line,
                self.number,
                path.display(),
            ),
        }
        .into()
    }
}

/// [`apply_hunks`], and when a hunk needs more fuzz than allowed, how much
/// the whole file needs.
fn place_hunks(
    content: &[u8],
    hunks: &[Hunk],
    max_fuzz: usize,
) -> std::result::Result<Placed, HunkFailure> {
    apply_hunks(content, hunks, max_fuzz).map_err(|mut failure| {
        if let Miss::NeedsFuzz { file_fuzz, .. } = &mut failure.why {
            if let Ok(placed) = apply_hunks(content, hunks, usize::MAX) {
                let most = placed.landings.iter().map(|l| l.fuzz).max();
                *file_fuzz = most.unwrap_or(0).max(*file_fuzz);
            }
        }
        failure
    })
}

/// Apply the hunks of one file section to `content`, each where
/// [`locate`] finds it with the least fuzz up to `max_fuzz`, never before
/// the end of the previous hunk.
fn apply_hunks(
    content: &[u8],
    hunks: &[Hunk],
    max_fuzz: usize,
) -> std::result::Result<Placed, HunkFailure> {
    let lines: Vec<&[u8]> = split_lines(content).collect();
    let mut out: Vec<u8> = Vec::with_capacity(content.len());
    let mut landings = Vec::with_capacity(hunks.len());
    let mut cursor = 0usize; // first line not yet copied to `out`
    let mut offset: isize = 0; // where the previous hunk landed vs. its header
    for (i, hunk) in hunks.iter().enumerate() {
        let failure = |why| HunkFailure {
            number: i + 1,
            line: hunk.line,
            why,
        };
        let (lead, trail) = hunk.context_counts();
        let most_fuzz = lead.max(trail);
        let found = (0..=max_fuzz.min(most_fuzz))
            .find_map(|fuzz| locate(&lines, hunk, cursor, offset, fuzz));
        let Some(found) = found else {
            if let Some(why) = line_ending_mismatch(&lines, hunk) {
                return Err(failure(Miss::Nowhere(why)));
            }
            let more = (max_fuzz.saturating_add(1)..=most_fuzz)
                .find_map(|fuzz| locate(&lines, hunk, cursor, offset, fuzz));
            return Err(failure(match more {
                Some(found) => Miss::NeedsFuzz {
                    landing: found.landing,
                    file_fuzz: found.landing.fuzz,
                },
                None => Miss::Nowhere("its context or removed lines are not in the file"),
            }));
        };
        let kept = &hunk.lines[found.skip_start..hunk.lines.len() - found.skip_end];
        let old_len = kept.iter().filter(|l| l.kind != LineKind::Add).count();
        let new: Vec<&[u8]> = kept
            .iter()
            .filter(|l| l.kind != LineKind::Remove)
            .map(|l| l.text.as_slice())
            .collect();
        let at = found.at;
        // A line without newline may only end the file.
        for (idx, l) in new.iter().enumerate() {
            let is_last_of_file = idx + 1 == new.len() && at + old_len == lines.len();
            if !l.ends_with(b"\n") && !is_last_of_file {
                return Err(failure(Miss::Nowhere(
                    "it leaves a line without newline in the middle of the file",
                )));
            }
        }
        for l in &lines[cursor..at] {
            out.extend_from_slice(l);
        }
        for l in &new {
            out.extend_from_slice(l);
        }
        cursor = at + old_len;
        offset = found.landing.offset;
        landings.push(found.landing);
    }
    for l in &lines[cursor..] {
        out.extend_from_slice(l);
    }
    Ok(Placed {
        content: out,
        landings,
    })
}

/// A hunk's place in a file at one fuzz level.
struct Found {
    /// Index of the file line the hunk's first kept line matched.
    at: usize,
    /// Context lines of the hunk ignored at its start and its end.
    skip_start: usize,
    skip_end: usize,
    landing: Landing,
}

/// Where `hunk` matches `lines` with `fuzz`. With unequal context at its
/// ends, fuzz first evens the two out (as `patch` does), then ignores up to
/// `fuzz` context lines at each end. A hunk cut short by the file's edge
/// must sit there while it is still short: one stated at line 1 with less
/// context before than after at the start, one with context before but none
/// after at the end (hand-written hunks often have unequal context, so a
/// merely shorter end does not anchor them, as in `git apply`). Positions
/// are tried nearest first to the header's line shifted by `offset`, from
/// `cursor` on.
fn locate(
    lines: &[&[u8]],
    hunk: &Hunk,
    cursor: usize,
    offset: isize,
    fuzz: usize,
) -> Option<Found> {
    let (lead, trail) = hunk.context_counts();
    let most = lead.max(trail);
    let short_start = (fuzz + lead) < most;
    let short_end = (fuzz + trail) < most;
    let skip_start = (fuzz + lead).saturating_sub(most);
    // A hunk of context only counts it at both ends: never skip it twice.
    let skip_end = (fuzz + trail)
        .saturating_sub(most)
        .min(hunk.lines.len() - skip_start);
    let anchored_start = short_start && hunk.old_start <= 1;
    let anchored_end = short_end && trail == 0;
    let pattern: Vec<&[u8]> = hunk.lines[skip_start..hunk.lines.len() - skip_end]
        .iter()
        .filter(|l| l.kind != LineKind::Add)
        .map(|l| l.text.as_slice())
        .collect();
    let last = lines
        .len()
        .checked_sub(pattern.len())
        .filter(|&l| l >= cursor)?;
    // With no old lines the hunk inserts after line `old_start`.
    let stated = match hunk.old_len {
        0 => hunk.old_start,
        _ => hunk.old_start.saturating_sub(1),
    }
    .min(isize::MAX as usize / 2) as isize;
    let expected = stated
        .saturating_add(offset)
        .saturating_add(skip_start as isize)
        .clamp(cursor as isize, last as isize) as usize;
    let fits = |at: usize| {
        lines[at..at + pattern.len()] == pattern[..]
            && (!anchored_start || at == 0)
            && (!anchored_end || at == last)
    };
    let distance = expected.abs_diff(cursor).max(expected.abs_diff(last));
    let at = (0..=distance).find_map(|d| {
        [
            expected.checked_add(d),
            expected.checked_sub(d).filter(|_| d > 0),
        ]
        .into_iter()
        .flatten()
        .find(|&at| at >= cursor && at <= last && fits(at))
    })?;
    let start = at as isize - skip_start as isize;
    Some(Found {
        at,
        skip_start,
        skip_end,
        landing: Landing {
            line: start + (hunk.old_start as isize - stated),
            offset: start - stated,
            fuzz,
        },
    })
}

/// Whether the hunk and the file end their lines differently (CRLF against
/// LF), which no amount of searching gets past.
fn line_ending_mismatch(lines: &[&[u8]], hunk: &Hunk) -> Option<&'static str> {
    fn mostly_crlf<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Option<bool> {
        let ended: Vec<&[u8]> = lines.filter(|l| l.ends_with(b"\n")).collect();
        let crlf = ended.iter().filter(|l| l.ends_with(b"\r\n")).count();
        (!ended.is_empty()).then_some(crlf * 2 > ended.len())
    }
    let patch = mostly_crlf(hunk.lines.iter().map(|l| l.text.as_slice()));
    let file = mostly_crlf(lines.iter().copied());
    match (patch, file) {
        (Some(true), Some(false)) => {
            Some("the patch has CRLF (DOS) line endings but the file has LF; convert the patch with `dos2unix`")
        }
        (Some(false), Some(true)) => {
            Some("the file has CRLF (DOS) line endings but the patch has LF")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn origin() -> &'static Path {
        Path::new("fix.patch")
    }

    fn tree(files: &[(&str, &str)]) -> impl Fn(&Path) -> Result<Option<Vec<u8>>> {
        let map: BTreeMap<PathBuf, Vec<u8>> = files
            .iter()
            .map(|(p, c)| (PathBuf::from(p), c.as_bytes().to_vec()))
            .collect();
        move |p: &Path| Ok(map.get(p).cloned())
    }

    fn apply_one(patch: &str, files: &[(&str, &str)]) -> Result<Changes> {
        let p = parse(patch, origin())?;
        apply_all(&[p], tree(files))
    }

    fn text(changes: &Changes, path: &str) -> Option<String> {
        changes
            .get(Path::new(path))
            .expect("path touched")
            .as_ref()
            .map(|c| String::from_utf8(c.clone()).unwrap())
    }

    #[test]
    fn hunk_line_numbers_past_any_file_are_an_error_not_an_overflow() {
        let huge = 1usize << 63;
        let patch = format!("--- a/f\n+++ b/f\n@@ -{huge},1 +{huge},1 @@\n-line 1\n+line one\n");
        let err = apply_one(&patch, &[("f", &numbered(3))]).unwrap_err();
        assert!(err.to_string().contains("past 4294967295"), "{err}");
        let near = "--- a/f\n+++ b/f\n@@ -4294967295,1 +4294967295,1 @@\n-line 1\n+line one\n";
        let changes = apply_one(near, &[("f", &numbered(3))]).unwrap();
        assert_eq!(text(&changes, "f").unwrap(), "line one\nline 2\nline 3\n");
    }

    fn numbered(n: usize) -> String {
        (1..=n).map(|i| format!("line {i}\n")).collect()
    }

    const GIT_PATCH: &str = "\
From 1234 Mon Sep 17 00:00:00 2001
From: Some One <one@example.org>
Subject: [PATCH] proc: say hello

This changes the greeting.
---
 fs/proc/version.c | 2 +-
 1 file changed, 1 insertion(+), 1 deletion(-)

diff --git a/fs/proc/version.c b/fs/proc/version.c
index 02e3c3c..7c0f1a1 100644
--- a/fs/proc/version.c
+++ b/fs/proc/version.c
@@ -2,3 +2,3 @@
 line 2
-line 3
+line three
 line 4
-- 
2.39.2
";

    #[test]
    fn git_patch_with_mail_headers() {
        let p = parse(GIT_PATCH, origin()).unwrap();
        assert_eq!(p.files.len(), 1);
        let f = &p.files[0];
        assert_eq!(f.operation, Operation::Modify);
        assert_eq!(f.new_path.as_deref(), Some(Path::new("fs/proc/version.c")));
        assert_eq!(f.line, 10);
        assert_eq!(f.hunks[0].line, 14);
        let out = apply_all(&[p], tree(&[("fs/proc/version.c", &numbered(5))])).unwrap();
        assert_eq!(
            text(&out, "fs/proc/version.c").unwrap(),
            "line 1\nline 2\nline three\nline 4\nline 5\n"
        );
    }

    #[test]
    fn plain_diff_u_with_timestamps_and_prefix() {
        let patch = "\
diff -u linux.orig/kernel/a.c linux/kernel/a.c
--- linux.orig/kernel/a.c\t2024-01-01 10:00:00.000000000 +0000
+++ linux/kernel/a.c\t2024-01-02 10:00:00.000000000 +0000
@@ -1,2 +1,3 @@
 line 1
+inserted
 line 2
";
        let out = apply_one(patch, &[("kernel/a.c", &numbered(3))]).unwrap();
        assert_eq!(
            text(&out, "kernel/a.c").unwrap(),
            "line 1\ninserted\nline 2\nline 3\n"
        );
    }

    #[test]
    fn plain_diff_against_orig_file_patches_the_existing_one() {
        let patch = "\
--- linux/kernel/a.c.orig\t2024-01-01 10:00:00
+++ linux/kernel/a.c\t2024-01-02 10:00:00
@@ -1 +1 @@
-line 1
+first
";
        let out = apply_one(patch, &[("kernel/a.c", &numbered(2))]).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(text(&out, "kernel/a.c").unwrap(), "first\nline 2\n");
    }

    #[test]
    fn multiple_files_and_hunks() {
        let patch = "\
diff --git a/a.c b/a.c
--- a/a.c
+++ b/a.c
@@ -1,3 +1,3 @@
 line 1
-line 2
+two
 line 3
@@ -8,3 +8,4 @@
 line 8
 line 9
+nine and a half
 line 10
diff --git a/dir/b.h b/dir/b.h
--- a/dir/b.h
+++ b/dir/b.h
@@ -1 +1 @@
-line 1
+one
";
        let out = apply_one(patch, &[("a.c", &numbered(10)), ("dir/b.h", &numbered(1))]).unwrap();
        assert_eq!(out.len(), 2);
        let a = text(&out, "a.c").unwrap();
        assert!(a.starts_with("line 1\ntwo\nline 3\n"));
        assert!(a.ends_with("line 9\nnine and a half\nline 10\n"));
        assert_eq!(text(&out, "dir/b.h").unwrap(), "one\n");
    }

    fn apply_fuzzy(patch: &str, files: &[(&str, &str)], fuzz: usize) -> Result<Applied> {
        let p = parse(patch, origin())?;
        apply_with_fuzz(&[p], tree(files), fuzz)
    }

    #[test]
    fn hunk_found_at_offset_both_directions() {
        let patch = "\
--- a/f.c
+++ b/f.c
@@ -10,3 +10,3 @@
 line 20
-line 21
+twenty-one
 line 22
@@ -30,3 +30,3 @@
 line 25
-line 26
+twenty-six
 line 27
";
        // Stated at line 10 but the text is at 20: found by searching outward;
        // the second hunk is then looked for with the same offset, and found
        // before where that puts it.
        let applied = apply_fuzzy(patch, &[("f.c", &numbered(40))], 0).unwrap();
        let f = text(&applied.changes, "f.c").unwrap();
        assert!(f.contains("line 19\nline 20\ntwenty-one\nline 22\n"));
        assert!(f.contains("line 24\nline 25\ntwenty-six\nline 27\nline 28\n"));
        assert_eq!(f.lines().count(), 40);
        assert_eq!(
            applied.notes,
            [
                "f.c: hunk #1 applied at line 20 (offset 10 lines)",
                "f.c: hunk #2 applied at line 25 (offset -5 lines)",
            ]
        );
    }

    #[test]
    fn exact_landings_are_not_noted() {
        let patch = "--- a/f.c\n+++ b/f.c\n@@ -4,3 +4,3 @@\n line 4\n-line 5\n+five\n line 6\n";
        let applied = apply_fuzzy(patch, &[("f.c", &numbered(9))], 2).unwrap();
        assert!(applied.notes.is_empty(), "{:?}", applied.notes);
        let one_line_off = apply_fuzzy(patch, &[("f.c", &format!("x\n{}", numbered(9)))], 0);
        assert_eq!(
            one_line_off.unwrap().notes,
            ["f.c: hunk #1 applied at line 5 (offset 1 line)"]
        );
    }

    /// A hunk stated at line 10 whose text is at line 20, with `damaged`
    /// replacing one of its context lines (0-based among the hunk's lines).
    fn damaged_hunk(damaged: usize) -> String {
        let mut lines = [
            " line 20".to_string(),
            " line 21".into(),
            " line 22".into(),
            "-line 23".into(),
            "+twenty-three".into(),
            " line 24".into(),
            " line 25".into(),
            " line 26".into(),
        ];
        lines[damaged] = " not in the file".into();
        format!(
            "--- a/f.c\n+++ b/f.c\n@@ -10,7 +10,7 @@\n{}\n",
            lines.join("\n")
        )
    }

    #[test]
    fn fuzz_1_accepted_only_when_allowed() {
        let files = [("f.c", numbered(40))];
        let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (*p, c.as_str())).collect();
        for damaged in [0, 7] {
            let patch = damaged_hunk(damaged);
            let err = apply_fuzzy(&patch, &files, 0).unwrap_err().to_string();
            assert_eq!(
                err,
                "fix.patch: line 3: hunk #1 for f.c does not apply without fuzz: \
                 applies with fuzz 1 at line 20; rerun with --fuzz 1 to accept it"
            );
            for fuzz in [1, 2, 3] {
                let applied = apply_fuzzy(&patch, &files, fuzz).unwrap();
                let mut want: Vec<String> = (1..=40).map(|i| format!("line {i}\n")).collect();
                want[22] = "twenty-three\n".into();
                // The ignored context line is the file's, not the patch's.
                assert_eq!(text(&applied.changes, "f.c").unwrap(), want.concat());
                assert_eq!(
                    applied.notes,
                    ["f.c: hunk #1 applied at line 20 with fuzz 1 (offset 10 lines)"]
                );
            }
        }
    }

    #[test]
    fn fuzz_2_refused_with_the_fuzz_it_needs() {
        let files = [("f.c", numbered(40))];
        let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (*p, c.as_str())).collect();
        let patch = damaged_hunk(1);
        for (allowed, says) in [(0, "without fuzz"), (1, "with fuzz 1")] {
            let err = apply_fuzzy(&patch, &files, allowed)
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                format!(
                    "fix.patch: line 3: hunk #1 for f.c does not apply {says}: \
                     applies with fuzz 2 at line 20; rerun with --fuzz 2 to accept it"
                )
            );
        }
        let applied = apply_fuzzy(&patch, &files, 2).unwrap();
        let f = text(&applied.changes, "f.c").unwrap();
        assert!(
            f.contains("line 21\nline 22\ntwenty-three\nline 24\n"),
            "{f}"
        );
        assert_eq!(
            applied.notes,
            ["f.c: hunk #1 applied at line 20 with fuzz 2 (offset 10 lines)"]
        );
    }

    #[test]
    fn fuzz_hint_covers_the_files_later_hunks() {
        let patch = "\
--- a/f.c
+++ b/f.c
@@ -2,3 +2,3 @@
 damaged
-line 3
+three
 line 4
@@ -10,5 +10,5 @@
 damaged
 damaged
-line 12
+twelve
 line 13
 line 14
";
        let err = apply_fuzzy(patch, &[("f.c", &numbered(20))], 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(
                "hunk #1 for f.c does not apply without fuzz: applies with fuzz 1 at line 2; \
                 rerun with --fuzz 2 to accept it (the file's later hunks need fuzz 2)"
            ),
            "{err}"
        );
        let applied = apply_fuzzy(patch, &[("f.c", &numbered(20))], 2).unwrap();
        assert_eq!(
            applied.notes,
            [
                "f.c: hunk #1 applied at line 2 with fuzz 1",
                "f.c: hunk #2 applied at line 10 with fuzz 2",
            ]
        );
    }

    #[test]
    fn fuzz_never_ignores_changed_lines() {
        let patch = "\
--- a/f.c
+++ b/f.c
@@ -5,3 +5,3 @@
 line 5
-no such line
+six
 line 7
";
        for fuzz in [0, 1, 2, 100] {
            let err = apply_fuzzy(patch, &[("f.c", &numbered(10))], fuzz)
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                "fix.patch: line 3: hunk #1 for f.c does not apply: \
                 its context or removed lines are not in the file"
            );
        }
    }

    #[test]
    fn least_fuzz_wins_over_nearest_place() {
        // Near the stated line the hunk fits only with fuzz; far away exactly.
        let content = format!("{}line 4\nline 5\nother\n", numbered(30));
        let patch = "--- a/f\n+++ b/f\n@@ -4,3 +4,3 @@\n line 4\n-line 5\n+five\n other\n";
        let applied = apply_fuzzy(patch, &[("f", &content)], 1).unwrap();
        let f = text(&applied.changes, "f").unwrap();
        assert!(f.starts_with(&numbered(30)), "{f}");
        assert!(f.ends_with("line 30\nline 4\nfive\nother\n"), "{f}");
        assert_eq!(
            applied.notes,
            ["f: hunk #1 applied at line 31 (offset 27 lines)"]
        );
    }

    #[test]
    fn fuzzy_hunks_keep_their_order() {
        // The second hunk's text also appears before the first one's landing:
        // it may not land there.
        let patch = "\
--- a/f
+++ b/f
@@ -1,3 +1,3 @@
 a
-b
+B
 c
@@ -4,3 +4,3 @@
 a
-b
+B2
 c
";
        let content = "x\nb\nc\nx\nb\nc\n";
        let applied = apply_fuzzy(patch, &[("f", content)], 1).unwrap();
        assert_eq!(text(&applied.changes, "f").unwrap(), "x\nB\nc\nx\nB2\nc\n");
        let content = "x\nb\nc\n";
        let err = apply_fuzzy(patch, &[("f", content)], 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("hunk #2 for f does not apply: "), "{err}");
    }

    #[test]
    fn no_trailing_context_must_end_the_file() {
        // Context before the change and none after: the file ended there.
        let patch = "\
--- a/f
+++ b/f
@@ -3,3 +3,3 @@
 line 3
 line 4
-line 5
+five
";
        let out = apply_one(patch, &[("f", &numbered(5))]).unwrap();
        assert_eq!(
            text(&out, "f").unwrap(),
            "line 1\nline 2\nline 3\nline 4\nfive\n"
        );
        let grown = numbered(8);
        for fuzz in [0, 1] {
            let err = apply_fuzzy(patch, &[("f", &grown)], fuzz)
                .unwrap_err()
                .to_string();
            assert!(
                err.ends_with("applies with fuzz 2 at line 3; rerun with --fuzz 2 to accept it"),
                "{err}"
            );
        }
        let applied = apply_fuzzy(patch, &[("f", &grown)], 2).unwrap();
        assert!(text(&applied.changes, "f")
            .unwrap()
            .contains("line 4\nfive\nline 6\n"));
    }

    #[test]
    fn unequal_context_floats_and_fuzz_evens_it_first() {
        // Four lines before, two after, in the middle of the file.
        let hunk = |last: &str| {
            format!(
                "--- a/f\n+++ b/f\n@@ -5,7 +5,7 @@\n line 5\n line 6\n line 7\n line 8\n\
                 -line 9\n+nine\n line 10\n {last}\n"
            )
        };
        let files = [("f", numbered(20))];
        let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (*p, c.as_str())).collect();
        let exact = apply_fuzzy(&hunk("line 11"), &files, 0).unwrap();
        assert!(text(&exact.changes, "f")
            .unwrap()
            .contains("line 8\nnine\nline 10\nline 11\nline 12\n"));
        // Fuzz drops the longer side first: the last line only goes at fuzz 3.
        let damaged = hunk("not in the file");
        let err = apply_fuzzy(&damaged, &files, 2).unwrap_err().to_string();
        assert!(
            err.ends_with("applies with fuzz 3 at line 5; rerun with --fuzz 3 to accept it"),
            "{err}"
        );
        let applied = apply_fuzzy(&damaged, &files, 3).unwrap();
        assert_eq!(applied.notes, ["f: hunk #1 applied at line 5 with fuzz 3"]);
    }

    #[test]
    fn crlf_mismatch_is_named() {
        let lf_patch = "--- a/f\n+++ b/f\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n";
        let crlf_patch = lf_patch.replace('\n', "\r\n");
        let err = apply_one(&crlf_patch, &[("f", "a\nb\nc\n")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "fix.patch: line 3: hunk #1 for f does not apply: the patch has CRLF (DOS) line \
             endings but the file has LF; convert the patch with `dos2unix`"
        );
        let err = apply_fuzzy(lf_patch, &[("f", "a\r\nb\r\nc\r\n")], 3)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "fix.patch: line 3: hunk #1 for f does not apply: \
             the file has CRLF (DOS) line endings but the patch has LF"
        );
        // The same endings on both sides apply as usual.
        let out = apply_one(&crlf_patch, &[("f", "a\r\nb\r\nc\r\n")]).unwrap();
        assert_eq!(text(&out, "f").unwrap(), "a\r\nB\r\nc\r\n");
    }

    #[test]
    fn nearest_match_wins() {
        let content = "x\nx\nx\nx\nx\nx\nx\nx\n";
        let patch = "\
--- a/f
+++ b/f
@@ -5,1 +5,1 @@
-x
+y
";
        let out = apply_one(patch, &[("f", content)]).unwrap();
        assert_eq!(text(&out, "f").unwrap(), "x\nx\nx\nx\ny\nx\nx\nx\n");
    }

    #[test]
    fn mismatching_hunk_names_file_hunk_and_patch() {
        let patch = "\
--- a/f.c
+++ b/f.c
@@ -1,3 +1,3 @@
 line 1
-line 2
+two
 line 3
@@ -5,2 +5,2 @@
 line 5
-no such line
+six
";
        let err = apply_one(patch, &[("f.c", &numbered(8))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("fix.patch"), "{err}");
        assert!(err.contains("hunk #2"), "{err}");
        assert!(err.contains("f.c"), "{err}");
        assert!(
            err.starts_with("fix.patch: line 8: hunk #2 for f.c does not apply"),
            "{err}"
        );
    }

    #[test]
    fn no_fuzz_whitespace_must_match() {
        let patch = "--- a/f\n+++ b/f\n@@ -1 +1 @@\n-line 1 \n+x\n";
        assert!(apply_one(patch, &[("f", "line 1\n")]).is_err());
    }

    #[test]
    fn new_file_git_and_dev_null() {
        let patch = "\
diff --git a/new.c b/new.c
new file mode 100644
index 0000000..e69de29
--- /dev/null
+++ b/new.c
@@ -0,0 +1,2 @@
+int x;
+int y;
";
        let p = parse(patch, origin()).unwrap();
        assert_eq!(p.files[0].operation, Operation::Create);
        let out = apply_all(&[p], tree(&[])).unwrap();
        assert_eq!(text(&out, "new.c").unwrap(), "int x;\nint y;\n");
        // Creating a file that exists fails.
        assert!(apply_one(patch, &[("new.c", "")]).is_err());
    }

    #[test]
    fn empty_new_file_without_hunks() {
        let patch = "\
diff --git a/empty.txt b/empty.txt
new file mode 100644
index 0000000..e69de29
";
        let out = apply_one(patch, &[]).unwrap();
        assert_eq!(text(&out, "empty.txt").unwrap(), "");
    }

    #[test]
    fn new_file_diff_n_epoch() {
        let patch = "\
--- linux.orig/new.c\t1970-01-01 00:00:00.000000000 +0000
+++ linux/new.c\t2024-01-01 00:00:00.000000000 +0000
@@ -0,0 +1 @@
+hello
";
        let out = apply_one(patch, &[]).unwrap();
        assert_eq!(text(&out, "new.c").unwrap(), "hello\n");
    }

    #[test]
    fn deleted_file() {
        let patch = "\
diff --git a/gone.c b/gone.c
deleted file mode 100644
index e69de29..0000000
--- a/gone.c
+++ /dev/null
@@ -1,2 +0,0 @@
-line 1
-line 2
";
        let out = apply_one(patch, &[("gone.c", &numbered(2))]).unwrap();
        assert_eq!(out.get(Path::new("gone.c")), Some(&None));
        // Content the patch does not know about makes the deletion fail.
        assert!(apply_one(patch, &[("gone.c", &numbered(3))]).is_err());
        // So does a missing file.
        assert!(apply_one(patch, &[]).is_err());
    }

    #[test]
    fn no_newline_at_end_of_file() {
        let patch = "\
--- a/f
+++ b/f
@@ -1,2 +1,2 @@
 line 1
-line 2
\\ No newline at end of file
+line two
\\ No newline at end of file
";
        let out = apply_one(patch, &[("f", "line 1\nline 2")]).unwrap();
        assert_eq!(text(&out, "f").unwrap(), "line 1\nline two");
        // The old side has no newline: a file with one does not match.
        assert!(apply_one(patch, &[("f", "line 1\nline 2\n")]).is_err());

        let add_newline = "\
--- a/f
+++ b/f
@@ -1 +1 @@
-x
\\ No newline at end of file
+x
";
        let out = apply_one(add_newline, &[("f", "x")]).unwrap();
        assert_eq!(text(&out, "f").unwrap(), "x\n");
    }

    #[test]
    fn git_rename_with_changes() {
        let patch = "\
diff --git a/old.c b/new.c
similarity index 90%
rename from old.c
rename to new.c
index 1111111..2222222 100644
--- a/old.c
+++ b/new.c
@@ -1,2 +1,2 @@
-line 1
+one
 line 2
";
        let out = apply_one(patch, &[("old.c", &numbered(2))]).unwrap();
        assert_eq!(out.get(Path::new("old.c")), Some(&None));
        assert_eq!(text(&out, "new.c").unwrap(), "one\nline 2\n");
    }

    #[test]
    fn pure_rename_and_mode_change() {
        let patch = "\
diff --git a/old.c b/new.c
similarity index 100%
rename from old.c
rename to new.c
diff --git a/script.sh b/script.sh
old mode 100644
new mode 100755
";
        let out = apply_one(patch, &[("old.c", "x\n"), ("script.sh", "echo\n")]).unwrap();
        assert_eq!(text(&out, "new.c").unwrap(), "x\n");
        assert_eq!(out.get(Path::new("old.c")), Some(&None));
        assert!(!out.contains_key(Path::new("script.sh")));
    }

    #[test]
    fn later_patch_sees_earlier_results() {
        let first = parse(
            "--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n-line 1\n+one\n line 2\n",
            Path::new("1.patch"),
        )
        .unwrap();
        let second = parse(
            "--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n-one\n+uno\n line 2\n",
            Path::new("2.patch"),
        )
        .unwrap();
        let out = apply_all(
            &[first.clone(), second.clone()],
            tree(&[("f", &numbered(2))]),
        )
        .unwrap();
        assert_eq!(text(&out, "f").unwrap(), "uno\nline 2\n");
        // Alone, the second one does not apply, and the error names it.
        let err = apply_all(&[second], tree(&[("f", &numbered(2))]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("2.patch: line 3: hunk #1 for f"), "{err}");
    }

    #[test]
    fn rejects_binary_patches() {
        let git_binary = "\
diff --git a/blob.bin b/blob.bin
index 1111111..2222222 100644
GIT binary patch
literal 4
LcmZQzU|<9Q00aO5
";
        let err = parse(git_binary, origin()).unwrap_err().to_string();
        assert_eq!(err, "fix.patch: line 3: binary patches are not supported");
        let plain = "diff --git a/x b/x\nindex 1..2 100644\nBinary files a/x and b/x differ\n";
        let err = parse(plain, origin()).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("binary"), "{err}");
    }

    #[test]
    fn rejects_path_traversal_and_absolute_paths() {
        let dotdot = "--- a/../etc/passwd\n+++ b/../etc/passwd\n@@ -1 +1 @@\n-x\n+y\n";
        let err = parse(dotdot, origin()).unwrap_err().to_string();
        assert!(err.starts_with("fix.patch: line 1: "), "{err}");
        assert!(err.contains(".."), "{err}");
        let inner = "--- a/fs/../../x\n+++ b/fs/../../x\n@@ -1 +1 @@\n-x\n+y\n";
        assert!(parse(inner, origin()).is_err());
        let absolute = "--- /etc/passwd\n+++ /etc/passwd\n@@ -1 +1 @@\n-x\n+y\n";
        let err = parse(absolute, origin()).unwrap_err().to_string();
        assert!(err.contains("absolute"), "{err}");
        let rename = "diff --git a/x b/y\nrename from x\nrename to ../../y\n";
        let err = parse(rename, origin()).unwrap_err().to_string();
        assert!(err.starts_with("fix.patch: line 3: "), "{err}");
        let git_header = "diff --git a/../x b/../x\nnew file mode 100644\n";
        assert!(parse(git_header, origin()).is_err());
    }

    #[test]
    fn rejects_truncated_and_malformed_hunks() {
        let truncated = "--- a/f\n+++ b/f\n@@ -1,3 +1,3 @@\n line 1\n-line 2\n";
        let err = parse(truncated, origin()).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        let bad_header = "diff --git a/f b/f\n--- a/f\n+++ b/f\n@@ -x +1 @@\n";
        let err = parse(bad_header, origin()).unwrap_err().to_string();
        assert!(err.contains("line 4") && err.contains("malformed"), "{err}");
        assert!(parse("just some text\n", origin()).is_err());
        assert!(parse("", origin()).is_err());
    }

    #[test]
    fn quoted_git_names() {
        let patch = "\
diff --git \"a/sp ace\\303\\251.c\" \"b/sp ace\\303\\251.c\"
--- \"a/sp ace\\303\\251.c\"
+++ \"b/sp ace\\303\\251.c\"
@@ -1 +1 @@
-x
+y
";
        let out = apply_one(patch, &[("sp aceé.c", "x\n")]).unwrap();
        assert_eq!(text(&out, "sp aceé.c").unwrap(), "y\n");
    }

    #[test]
    fn empty_context_line_without_space() {
        let patch = "--- a/f\n+++ b/f\n@@ -1,3 +1,3 @@\n a\n\n-b\n+c\n";
        let out = apply_one(patch, &[("f", "a\n\nb\n")]).unwrap();
        assert_eq!(text(&out, "f").unwrap(), "a\n\nc\n");
    }

    #[test]
    fn hunk_anchored_at_start_of_file() {
        // No leading context at line 1: only the start of the file matches.
        let patch = "--- a/f\n+++ b/f\n@@ -1,2 +1,3 @@\n+start\n x\n y\n";
        let out = apply_one(patch, &[("f", "x\ny\n")]).unwrap();
        assert_eq!(text(&out, "f").unwrap(), "start\nx\ny\n");
        assert!(apply_one(patch, &[("f", "a\nx\ny\n")]).is_err());
    }

    /// Tiny xorshift generator: the property tests need no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Random edits diffed by the system's `diff -u` (with various context
    /// sizes) must apply back to exactly the edited file.
    #[test]
    fn applies_what_diff_produces() {
        let probe = std::process::Command::new("diff")
            .arg("--version")
            .output()
            .expect("`diff` (diffutils) must be installed for this test");
        assert!(probe.status.success(), "`diff --version` failed");
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for round in 0..200 {
            // Few distinct lines, so contexts repeat and offsets matter.
            let words = ["a", "b", "c", "{", "}", "", "x = 1;"];
            let n = rng.below(40);
            let mut old: Vec<String> = (0..n)
                .map(|_| words[rng.below(words.len())].to_string())
                .collect();
            let mut new = old.clone();
            for _ in 0..1 + rng.below(5) {
                let at = rng.below(new.len() + 1);
                match rng.below(3) {
                    0 => new.insert(at, format!("new {round}")),
                    1 if at < new.len() => {
                        new.remove(at);
                    }
                    _ if at < new.len() => new[at] = format!("changed {round}"),
                    _ => new.push("tail".into()),
                }
            }
            let join = |lines: &mut Vec<String>, newline_at_end: bool| {
                let mut text = lines.join("\n");
                if newline_at_end && !lines.is_empty() {
                    text.push('\n');
                }
                text
            };
            let old_text = join(&mut old, rng.below(4) != 0);
            let new_text = join(&mut new, rng.below(4) != 0);
            fs::create_dir_all(dir.path().join("a")).unwrap();
            fs::create_dir_all(dir.path().join("b")).unwrap();
            fs::write(dir.path().join("a/f.c"), &old_text).unwrap();
            fs::write(dir.path().join("b/f.c"), &new_text).unwrap();
            let context = ["-U0", "-U1", "-U3"][round % 3];
            let out = std::process::Command::new("diff")
                .arg(context)
                .arg("a/f.c")
                .arg("b/f.c")
                .current_dir(dir.path())
                .output()
                .unwrap();
            if out.stdout.is_empty() {
                continue; // no difference
            }
            let patch = parse_bytes(&out.stdout, origin())
                .unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&out.stdout)));
            let applied = apply_all(&[patch], tree(&[("f.c", &old_text)]))
                .unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&out.stdout)));
            assert_eq!(
                text(&applied, "f.c").unwrap(),
                new_text,
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }

    /// What any patch text must give: a parse error or apply error is one
    /// line naming the patch; a patch that applies without fuzz applies the
    /// same with fuzz allowed, and changes each file's line count by what
    /// its hunks add and remove.
    fn check_consistent(bytes: &[u8], read: &dyn Fn(&Path) -> Result<Option<Vec<u8>>>) {
        let one_line_naming_the_patch = |err: &anyhow::Error| {
            let message = err.to_string();
            assert!(
                message.len() > "fix.patch: ".len()
                    && message.starts_with("fix.patch: ")
                    && !message.contains('\n'),
                "{message:?} from {:?}",
                String::from_utf8_lossy(bytes)
            );
        };
        let patch = match parse_bytes(bytes, origin()) {
            Ok(patch) => patch,
            Err(err) => return one_line_naming_the_patch(&err),
        };
        for file in &patch.files {
            for hunk in &file.hunks {
                let count = |kind| hunk.lines.iter().filter(|l| l.kind != kind).count();
                assert_eq!(count(LineKind::Add), hunk.old_len);
                assert_eq!(count(LineKind::Remove), hunk.new_len);
            }
        }
        let exact = apply_all(std::slice::from_ref(&patch), read);
        let fuzzy = apply_with_fuzz(std::slice::from_ref(&patch), read, 3);
        let changes = match exact {
            Ok(changes) => changes,
            Err(err) => return one_line_naming_the_patch(&err),
        };
        assert_eq!(fuzzy.expect("applies without fuzz").changes, changes);
        if let [file] = &patch.files[..] {
            if file.operation == Operation::Modify && !file.hunks.is_empty() {
                let path = changes.keys().next().unwrap();
                let before = read(path).unwrap().unwrap();
                let after = changes[path].as_ref().unwrap();
                let grown: isize = file
                    .hunks
                    .iter()
                    .map(|h| h.new_len as isize - h.old_len as isize)
                    .sum();
                assert_eq!(
                    split_lines(after).count() as isize,
                    split_lines(&before).count() as isize + grown,
                    "{}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
    }

    #[test]
    fn garbage_gives_consistent_results() {
        let seeds = [
            GIT_PATCH,
            "--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n+c\n",
        ];
        let alphabet: &[u8] = b"-+ @\\\n,0123456789abdgitf/\"\t.";
        let files: Vec<(&str, String)> =
            vec![("fs/proc/version.c", numbered(6)), ("f", "a\nb".into())];
        let read = move |p: &Path| -> Result<Option<Vec<u8>>> {
            Ok(files
                .iter()
                .find(|(n, _)| Path::new(n) == p)
                .map(|(_, c)| c.as_bytes().to_vec()))
        };
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut applied = 0;
        for seed in seeds {
            check_consistent(seed.as_bytes(), &read);
            // Every truncation of a valid patch.
            for cut in 0..=seed.len() {
                check_consistent(&seed.as_bytes()[..cut], &read);
            }
            // Random mutations.
            for _ in 0..3000 {
                let mut bytes = seed.as_bytes().to_vec();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(bytes.len());
                    match rng.below(3) {
                        0 => bytes[at] = alphabet[rng.below(alphabet.len())],
                        1 => {
                            bytes.remove(at);
                        }
                        _ => bytes.insert(at, alphabet[rng.below(alphabet.len())]),
                    }
                }
                check_consistent(&bytes, &read);
                if let Ok(p) = parse_bytes(&bytes, origin()) {
                    applied += usize::from(apply_all(&[p], &read).is_ok());
                }
            }
        }
        // The mutations must reach the apply stage, not only the parser.
        assert!(applied > 100, "only {applied} mutated patches applied");
        // Pure noise.
        for _ in 0..2000 {
            let len = rng.below(200);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            check_consistent(&bytes, &read);
        }
    }
}
