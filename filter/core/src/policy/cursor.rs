//! [`ValueCursor`]: walks a JSON document read piece by piece and hands out
//! one complete value at a time as a contiguous slice, so a snapshot of any
//! size is parsed holding only the value at hand (one token, the users map)
//! and a 64 KiB window of the body, never the whole body.
//!
//! It only finds where values end (strings, escapes, nesting); the slices
//! are then decoded, and so validated, by `serde_json`.

use std::io::{ErrorKind, Read};

use crate::snapshot::SnapshotError;

/// How much is read from the source at a time.
pub const CHUNK: usize = 64 * 1024;

pub struct ValueCursor<R> {
    source: R,
    buf: Vec<u8>,
    /// Next unread byte in `buf`.
    pos: usize,
    eof: bool,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn err(msg: &str) -> SnapshotError {
    SnapshotError(msg.to_owned())
}

impl<R: Read> ValueCursor<R> {
    pub fn new(source: R) -> Self {
        Self { source, buf: Vec::with_capacity(2 * CHUNK), pos: 0, eof: false }
    }

    /// Appends the next piece of the source; `false` at its end.
    fn fill(&mut self) -> Result<bool, SnapshotError> {
        if self.eof {
            return Ok(false);
        }
        let old = self.buf.len();
        self.buf.resize(old + CHUNK, 0);
        let n = loop {
            match self.source.read(self.buf.get_mut(old..).unwrap_or_default()) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(SnapshotError(format!("cannot read the body: {e}")));
                }
            }
        };
        self.buf.truncate(old + n);
        self.eof = n == 0;
        Ok(n > 0)
    }

    /// The next byte that is not whitespace, not consumed; `None` at the end.
    pub fn peek(&mut self) -> Result<Option<u8>, SnapshotError> {
        loop {
            while let Some(&b) = self.buf.get(self.pos) {
                if !is_ws(b) {
                    return Ok(Some(b));
                }
                self.pos += 1;
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// Consumes `want` (after whitespace) or fails.
    pub fn consume(&mut self, want: u8, what: &str) -> Result<(), SnapshotError> {
        match self.peek()? {
            Some(b) if b == want => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => Err(SnapshotError(format!("expected {what}"))),
            None => Err(SnapshotError(format!("body ended where {what} was expected"))),
        }
    }

    /// Consumes `close` if it comes next: an empty object or array.
    pub fn close_if(&mut self, close: u8) -> Result<bool, SnapshotError> {
        if self.peek()? == Some(close) {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// After a member or element: `,` (more follow: `false`) or `close`
    /// (the container ended: `true`).
    pub fn next_or_close(&mut self, close: u8) -> Result<bool, SnapshotError> {
        match self.peek()? {
            Some(b',') => {
                self.pos += 1;
                Ok(false)
            }
            Some(b) if b == close => {
                self.pos += 1;
                Ok(true)
            }
            Some(_) => Err(SnapshotError(format!("expected , or {}", close as char))),
            None => Err(err("body ended inside a container")),
        }
    }

    /// Only whitespace may follow the document.
    pub fn end(&mut self) -> Result<(), SnapshotError> {
        match self.peek()? {
            None => Ok(()),
            Some(_) => Err(err("trailing characters after the snapshot")),
        }
    }

    /// The next complete value (string, number, literal, object or array).
    pub fn value(&mut self) -> Result<&[u8], SnapshotError> {
        if self.peek()?.is_none() {
            return Err(err("body ended where a value was expected"));
        }
        // Drop what was consumed once it is more than a chunk: the window
        // stays small and the move is paid once per chunk, not per value.
        if self.pos >= CHUNK {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let start = self.pos;
        let mut i = start;
        let mut depth = 0usize;
        let mut in_string = false;
        loop {
            let Some(rest) = self.buf.get(i..).filter(|r| !r.is_empty()) else {
                if self.fill()? {
                    continue;
                }
                break;
            };
            if in_string {
                match rest.iter().position(|b| *b == b'"' || *b == b'\\') {
                    None => i += rest.len(),
                    Some(at) if rest.get(at) == Some(&b'\\') => {
                        // Skip the escaped byte too (it may need the next piece).
                        if rest.len() < at + 2 && self.fill()? {
                            continue;
                        }
                        i += at + 2;
                    }
                    Some(at) => {
                        in_string = false;
                        i += at + 1;
                        if depth == 0 {
                            break;
                        }
                    }
                }
                continue;
            }
            let b = rest.first().copied().unwrap_or_default();
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth == 0 => break,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                b',' if depth == 0 => break,
                b if depth == 0 && is_ws(b) => break,
                _ => {}
            }
            i += 1;
        }
        if in_string || depth > 0 {
            return Err(err("body ended inside a value"));
        }
        let i = i.min(self.buf.len());
        self.pos = i;
        self.buf.get(start..i).ok_or_else(|| err("value out of range"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// Every value of a top-level array, reading `step` bytes at a time.
    fn values(doc: &str, step: usize) -> Result<Vec<String>, SnapshotError> {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.1.min(buf.len()).min(self.0.len());
                let (head, rest) = self.0.split_at(n);
                if let Some(dst) = buf.get_mut(..n) {
                    dst.copy_from_slice(head);
                }
                self.0 = rest;
                Ok(n)
            }
        }
        let mut c = ValueCursor::new(Trickle(doc.as_bytes(), step));
        let mut out = Vec::new();
        c.consume(b'[', "[")?;
        if !c.close_if(b']')? {
            loop {
                out.push(String::from_utf8_lossy(c.value()?).into_owned());
                if c.next_or_close(b']')? {
                    break;
                }
            }
        }
        c.end()?;
        Ok(out)
    }

    #[test]
    fn finds_value_boundaries_across_any_split() -> Result<(), SnapshotError> {
        let doc = r#" [ "a,]\"}" , 12.5e3,true,null,{"k":[1,{"x":"]"}]},[[]] ,"\\" ,{}] "#;
        let want = vec![r#""a,]\"}""#, "12.5e3", "true", "null", r#"{"k":[1,{"x":"]"}]}"#, "[[]]", r#""\\""#, "{}"];
        for step in [1, 2, 3, 5, 64, CHUNK] {
            assert_eq!(values(doc, step)?, want, "step {step}");
        }
        assert_eq!(values("[]", 1)?, Vec::<String>::new());
        Ok(())
    }

    #[test]
    fn values_longer_than_a_chunk_stay_whole() -> Result<(), SnapshotError> {
        let long = format!("\"{}\"", "x".repeat(3 * CHUNK + 17));
        let doc = format!("[{long},{}, 1]", format!("[{}0]", "1,".repeat(CHUNK)));
        let got = values(&doc, 4096)?;
        assert_eq!(got.len(), 3);
        assert_eq!(got.first(), Some(&long));
        assert_eq!(got.get(1).map(String::len), Some(2 * CHUNK + 3));
        Ok(())
    }

    #[test]
    fn truncated_or_malformed_documents_fail() {
        for doc in [r#"["abc"#, "[{\"a\":[1,2}", "[1,2", "[1 2]", "[1] x", "", "[\"\\"] {
            assert!(values(doc, 3).is_err(), "{doc:?} was accepted");
        }
    }
}
