//! Just enough YAML to find one file in a cloud-config's `write_files` list.
//!
//! A NoCloud `user-data` looks like
//!
//! ```yaml
//! #cloud-config
//! write_files:
//!   - path: /etc/cloud/environment
//!     permissions: '0644'
//!     content: |
//!       FOO=bar
//!       VM_INIT_EXIT=3
//! ```
//!
//! [`file_content`] returns the `content` of the entry whose `path` matches. Supported:
//! list items at any indentation (also flush with `write_files:`), keys in any order,
//! block scalars (`|`, `|-`, `|+`, with an optional indentation digit), plain, single-
//! and double-quoted scalars (`\n \t \" \\` escapes), and `encoding: b64`/`base64`.
//! Anything else in the document is skipped. Not a YAML parser: flow collections,
//! anchors and folded scalars (`>`) are refused or ignored.

use std::fmt;

/// Why the user-data could not be read.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError(String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

fn err(line: usize, what: impl fmt::Display) -> ParseError {
    ParseError(format!("user-data line {}: {what}", line + 1))
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// The content of the `write_files` entry whose `path` is `wanted`; `None` when the
/// document has no such entry.
pub fn file_content(user_data: &str, wanted: &str) -> Result<Option<String>, ParseError> {
    let lines: Vec<&str> = user_data.lines().collect();
    let Some(start) = lines
        .iter()
        .position(|l| indent(l) == 0 && l.trim_end() == "write_files:")
    else {
        return Ok(None);
    };
    for item in list_items(&lines, start + 1) {
        let fields = mapping(&item)?;
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        if get("path") != Some(wanted) {
            continue;
        }
        let content = get("content").unwrap_or_default();
        return match get("encoding") {
            None | Some("text/plain") => Ok(Some(content.to_owned())),
            Some("b64" | "base64") => base64(content)
                .ok_or_else(|| ParseError(format!("{wanted}: content is not valid base64")))
                .and_then(|bytes| {
                    String::from_utf8(bytes)
                        .map_err(|_| ParseError(format!("{wanted}: content is not UTF-8")))
                })
                .map(Some),
            Some(other) => Err(ParseError(format!(
                "{wanted}: unsupported encoding {other:?}"
            ))),
        };
    }
    Ok(None)
}

/// One list item: (line number, text) with the item's `- ` replaced by spaces, so all of
/// the item's keys start in the same column.
type Item = Vec<(usize, String)>;

/// The items of the block sequence starting at line `from`.
fn list_items(lines: &[&str], from: usize) -> Vec<Item> {
    let mut items: Vec<Item> = Vec::new();
    let mut dash_column = None;
    for (n, line) in lines.iter().enumerate().skip(from) {
        if is_blank(line) {
            if let Some(item) = items.last_mut() {
                item.push((n, (*line).to_owned()));
            }
            continue;
        }
        let col = indent(line);
        let rest = &line[col..];
        let starts_item = rest == "-" || rest.starts_with("- ");
        match dash_column {
            None if starts_item => dash_column = Some(col),
            None => break,
            Some(d) if col < d || (col == d && !starts_item) => break,
            Some(_) => {}
        }
        if starts_item && Some(col) == dash_column {
            items.push(vec![(
                n,
                format!("{} {}", " ".repeat(col), rest.get(1..).unwrap_or("")),
            )]);
        } else if let Some(item) = items.last_mut() {
            item.push((n, (*line).to_owned()));
        }
    }
    items
}

/// The `key: value` pairs of one item (nested mappings and lists are skipped).
fn mapping(item: &Item) -> Result<Vec<(String, String)>, ParseError> {
    let Some(column) = item
        .iter()
        .find(|(_, l)| !is_blank(l))
        .map(|(_, l)| indent(l))
    else {
        return Ok(Vec::new());
    };
    let mut fields = Vec::new();
    let mut i = 0;
    while let Some((n, line)) = item.get(i) {
        i += 1;
        if is_blank(line) || indent(line) > column {
            continue; // nested values of a key we do not read
        }
        if indent(line) < column {
            return Err(err(*n, "unexpected indentation"));
        }
        let text = &line[column..];
        let (key, raw) = match text.split_once(':') {
            Some((k, v)) if v.is_empty() || v.starts_with(' ') => (k.trim(), v.trim()),
            _ => return Err(err(*n, "expected `key: value`")),
        };
        let value = if let Some(header) = raw.strip_prefix('|') {
            let end = item
                .iter()
                .skip(i)
                .position(|(_, l)| !l.trim().is_empty() && indent(l) <= column)
                .map_or(item.len(), |p| i + p);
            let block = item.get(i..end).unwrap_or_default();
            i = end;
            block_scalar(header, block).map_err(|what| err(*n, what))?
        } else if raw.starts_with('>') || raw.starts_with('[') || raw.starts_with('{') {
            return Err(err(*n, format!("unsupported YAML value for {key:?}")));
        } else {
            scalar(raw).map_err(|what| err(*n, what))?
        };
        fields.push((key.to_owned(), value));
    }
    Ok(fields)
}

/// The text of a literal block scalar; `header` is what follows the `|`.
fn block_scalar(header: &str, block: &[(usize, String)]) -> Result<String, String> {
    let header = header.split('#').next().unwrap_or("").trim();
    let chomp = header.chars().find(|c| matches!(c, '-' | '+'));
    if header.chars().any(|c| !matches!(c, '-' | '+' | '1'..='9')) {
        return Err(format!("bad block scalar header {header:?}"));
    }
    let body_indent = block
        .iter()
        .find(|(_, l)| !l.trim().is_empty())
        .map_or(0, |(_, l)| indent(l));
    let mut text = String::new();
    for (_, line) in block {
        text.push_str(line.get(body_indent..).unwrap_or(""));
        text.push('\n');
    }
    match chomp {
        Some('+') => {}
        Some(_) => text.truncate(text.trim_end_matches('\n').len()),
        None => {
            text.truncate(text.trim_end_matches('\n').len());
            if !text.is_empty() {
                text.push('\n');
            }
        }
    }
    Ok(text)
}

/// A plain or quoted one-line scalar.
fn scalar(raw: &str) -> Result<String, String> {
    if let Some(body) = raw.strip_prefix('\'') {
        let end = body
            .rfind('\'')
            .ok_or("unterminated single-quoted string")?;
        return Ok(body.get(..end).unwrap_or("").replace("''", "'"));
    }
    if let Some(body) = raw.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Ok(out),
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('0') => out.push('\0'),
                    Some(c @ ('"' | '\\' | '/' | ' ')) => out.push(c),
                    Some(c) => return Err(format!("unsupported escape \\{c}")),
                    None => break,
                },
                c => out.push(c),
            }
        }
        return Err("unterminated double-quoted string".to_owned());
    }
    let plain = match raw.find(" #") {
        Some(p) => raw.get(..p).unwrap_or(raw),
        None => raw,
    };
    Ok(plain.trim().to_owned())
}

/// Standard base64 (padding and whitespace allowed).
fn base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "/etc/cloud/environment";

    #[test]
    fn block_content() {
        let doc = "#cloud-config\nwrite_files:\n  - path: /etc/other\n    content: |\n      X=1\n  - path: /etc/cloud/environment\n    permissions: '0644'\n    content: |\n      FOO=bar\n      VM_INIT_EXIT=3\nruncmd:\n  - echo\n";
        assert_eq!(
            file_content(doc, ENV).unwrap().as_deref(),
            Some("FOO=bar\nVM_INIT_EXIT=3\n")
        );
        assert_eq!(
            file_content(doc, "/etc/other").unwrap().as_deref(),
            Some("X=1\n")
        );
        assert_eq!(file_content(doc, "/nope").unwrap(), None);
    }

    /// The exact layout of kestrel's seed (`seed/src/lib.rs`: `content: |+`, every line
    /// indented by six spaces, values verbatim, multi-line values continue).
    #[test]
    fn kestrel_seed_layout() {
        let doc = "#cloud-config\n# kestrel: the container environment, one NAME=VALUE line each\nwrite_files:\n  - path: /etc/cloud/environment\n    content: |+\n      FOO=bar\n      Q=a b: #c 'd' \"e\"\n      ML=one\n      - two\n      \n      # three\n      EMPTY=\n    permissions: '0644'\n";
        assert_eq!(
            file_content(doc, ENV).unwrap().as_deref(),
            Some("FOO=bar\nQ=a b: #c 'd' \"e\"\nML=one\n- two\n\n# three\nEMPTY=\n")
        );
        let doc = "#cloud-config\nwrite_files:\n  - path: /etc/cloud/environment\n    content: |+\n    permissions: '0644'\n";
        assert_eq!(file_content(doc, ENV).unwrap().as_deref(), Some(""));
    }

    #[test]
    fn content_first_flush_list_and_blank_lines() {
        let doc = "write_files:\n- content: |-\n    A=1\n\n    B=two words\n  path: \"/etc/cloud/environment\"\n- path: x\n";
        assert_eq!(
            file_content(doc, ENV).unwrap().as_deref(),
            Some("A=1\n\nB=two words")
        );
    }

    #[test]
    fn quoted_and_base64() {
        let doc = "write_files:\n  - path: '/etc/cloud/environment'\n    content: \"A=1\\nB=\\\"q\\\"\\n\"\n";
        assert_eq!(
            file_content(doc, ENV).unwrap().as_deref(),
            Some("A=1\nB=\"q\"\n")
        );
        let doc = "write_files:\n  - encoding: b64\n    path: /etc/cloud/environment\n    content: Rk9PPWJhcgo=\n";
        assert_eq!(
            file_content(doc, ENV).unwrap().as_deref(),
            Some("FOO=bar\n")
        );
    }

    #[test]
    fn empty_and_missing() {
        assert_eq!(file_content("#cloud-config\n", ENV).unwrap(), None);
        assert_eq!(file_content("write_files:\nother: 1\n", ENV).unwrap(), None);
        let doc = "write_files:\n  - path: /etc/cloud/environment\n    content: |\n";
        assert_eq!(file_content(doc, ENV).unwrap().as_deref(), Some(""));
        let doc = "write_files:\n  - path: /etc/cloud/environment\n";
        assert_eq!(file_content(doc, ENV).unwrap().as_deref(), Some(""));
    }

    #[test]
    fn refused() {
        let doc = "write_files:\n  - path: /etc/cloud/environment\n    content: >\n      x\n";
        assert!(file_content(doc, ENV).is_err());
        let doc =
            "write_files:\n  - path: /etc/cloud/environment\n    encoding: gzip\n    content: x\n";
        assert!(file_content(doc, ENV).is_err());
        let doc = "write_files:\n  - path: /etc/cloud/environment\n    content: \"x\n";
        assert!(file_content(doc, ENV).is_err());
    }
}
