//! Response shaping (DESIGN §5): the project list keeps only the token's
//! effective projects, and the console log keeps only its tail.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Keeps the elements of a JSON array of objects whose `id` passes
/// `in_scope`; every kept element stays byte for byte as InfraBox sent it.
pub fn filter_project_list(body: &[u8], in_scope: impl Fn(&str) -> bool) -> Result<Vec<u8>, String> {
    #[derive(Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: Option<std::borrow::Cow<'a, str>>,
    }
    let items: Vec<&RawValue> =
        serde_json::from_slice(body).map_err(|e| format!("project list is not a JSON array: {}", e.classify_str()))?;
    let mut out = Vec::with_capacity(body.len());
    out.push(b'[');
    let mut first = true;
    for item in items {
        let id: Id = serde_json::from_str(item.get()).map_err(|_| "project list element is not an object".to_string())?;
        if id.id.as_deref().is_some_and(&in_scope) {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(item.get().as_bytes());
        }
    }
    out.push(b']');
    Ok(out)
}

trait ClassifyStr {
    fn classify_str(&self) -> &'static str;
}

impl ClassifyStr for serde_json::Error {
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected shape",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// How many bytes to drop from the front of a buffer of `buffered` bytes so
/// that at most `max` remain.
pub fn tail_excess(buffered: usize, max: u64) -> usize {
    buffered.saturating_sub(usize::try_from(max).unwrap_or(usize::MAX))
}

/// Streaming tail of a body of known length: how many bytes at the front of
/// a chunk that starts `seen` bytes into the body fall before the last
/// `max` bytes of a `total`-byte body (and are dropped). Nothing is
/// buffered: memory stays flat whatever the console's size.
pub fn tail_drop(total: u64, max: u64, seen: u64, chunk: usize) -> usize {
    let skip = total.saturating_sub(max);
    let before = skip.saturating_sub(seen);
    usize::try_from(before).unwrap_or(usize::MAX).min(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

    proptest::proptest! {
        #[test]
        fn streamed_chunks_keep_exactly_the_tail(
            total in 0usize..5000,
            max in 1u64..3000,
            cuts in proptest::collection::vec(1usize..700, 0..20),
        ) {
            let body: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
            let mut kept = Vec::new();
            let mut seen = 0usize;
            let mut cuts = cuts.into_iter();
            while seen < total {
                let size = cuts.next().unwrap_or(total - seen).min(total - seen);
                let chunk = &body[seen..seen + size];
                let drop = tail_drop(total as u64, max, seen as u64, chunk.len());
                kept.extend_from_slice(&chunk[drop..]);
                seen += size;
            }
            let want = &body[total.saturating_sub(max as usize)..];
            proptest::prop_assert_eq!(&kept[..], want);
        }
    }

    #[test]
    fn keeps_only_projects_in_scope_byte_for_byte() -> TestResult {
        let body = br#"[{"id":"a","name":"A","type":"upload","public":false,"userrole":"Owner"}, {"name":"B","id":"b"},{"id":"c","x":{"nested":[1,2]}}]"#;
        let out = filter_project_list(body, |id| id != "b")?;
        assert_eq!(
            std::str::from_utf8(&out)?,
            r#"[{"id":"a","name":"A","type":"upload","public":false,"userrole":"Owner"},{"id":"c","x":{"nested":[1,2]}}]"#
        );
        assert_eq!(filter_project_list(b"[]", |_| true)?, b"[]");
        assert_eq!(filter_project_list(br#"[{"id":"a"}]"#, |_| false)?, b"[]");
        assert!(filter_project_list(b"{}", |_| true).is_err());
        assert!(filter_project_list(b"[1]", |_| true).is_err());
        assert!(filter_project_list(b"[", |_| true).is_err());
        Ok(())
    }

    #[test]
    fn tail() -> TestResult {
        assert_eq!(tail_excess(10, 4), 6);
        assert_eq!(tail_excess(3, 4), 0);
        Ok(())
    }
}
