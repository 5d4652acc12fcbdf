//! JSON-RPC 2.0 as the MCP endpoint reads and writes it (DESIGN §17.2):
//! one message per request body, parsed strictly. Duplicate object keys
//! anywhere, a batch, a wrong `jsonrpc`, an `id` that is neither a string
//! nor an integer, non-object `params` and unknown members are refused with
//! the JSON-RPC error code a client expects; error texts never quote the
//! body (it may hold secrets in trigger variables).

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// 2026-07-28: a routing header disagrees with the body.
pub const HEADER_MISMATCH: i64 = -32020;
/// 2026-07-28: the request's protocol version is not served.
pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;

/// A request id: a string or an integer (never null, a fraction or a bool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Id {
    Number(i64),
    Text(String),
}

impl Id {
    pub fn to_value(&self) -> Value {
        match self {
            Id::Number(n) => Value::from(*n),
            Id::Text(s) => Value::from(s.as_str()),
        }
    }
}

/// One incoming message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `None`: a notification (no answer but 202).
    pub id: Option<Id>,
    pub method: String,
    pub params: Map<String, Value>,
}

/// A JSON-RPC error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// The request's id when it could be read (else `null` on the wire).
    pub id: Option<Id>,
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(id: Option<Id>, code: i64, message: impl Into<String>) -> Self {
        Self { id, code, message: message.into(), data: None }
    }

    /// Its short name, as the audit's `reason`.
    pub fn reason(&self) -> &'static str {
        match self.code {
            PARSE_ERROR => "parse_error",
            INVALID_REQUEST => "invalid_request",
            METHOD_NOT_FOUND => "method_not_found",
            INVALID_PARAMS => "invalid_params",
            HEADER_MISMATCH => "header_mismatch",
            UNSUPPORTED_PROTOCOL_VERSION => "unsupported_protocol_version",
            _ => "internal_error",
        }
    }

    /// The HTTP status it travels with: the 2026-07-28 transport's table
    /// (400, 404 for an unknown method); in the handshake revisions 400 only
    /// for a body that is no request, else 200 — their clients read a 404
    /// as "session gone" and never see the error. `era`: `None` when the
    /// request never got far enough to tell.
    pub fn http_status(&self, era: Option<super::Era>) -> u32 {
        match (era, self.code) {
            (_, PARSE_ERROR | INVALID_REQUEST) => 400,
            (Some(super::Era::Handshake), _) => 200,
            (_, METHOD_NOT_FOUND) => 404,
            (_, INTERNAL_ERROR) => 500,
            _ => 400,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut error = Map::new();
        error.insert("code".into(), Value::from(self.code));
        error.insert("message".into(), Value::from(self.message.as_str()));
        if let Some(d) = &self.data {
            error.insert("data".into(), d.clone());
        }
        let mut out = Map::new();
        out.insert("jsonrpc".into(), Value::from("2.0"));
        out.insert("id".into(), self.id.as_ref().map_or(Value::Null, Id::to_value));
        out.insert("error".into(), Value::Object(error));
        serde_json::to_vec(&Value::Object(out)).unwrap_or_default()
    }
}

/// The success answer to request `id`.
pub fn result_json(id: &Id, result: Value) -> Vec<u8> {
    let mut out = Map::new();
    out.insert("jsonrpc".into(), Value::from("2.0"));
    out.insert("id".into(), id.to_value());
    out.insert("result".into(), result);
    serde_json::to_vec(&Value::Object(out)).unwrap_or_default()
}

/// Parses one message. Errors carry the id when the body got that far.
pub fn parse(body: &[u8]) -> Result<Message, RpcError> {
    let value = strict_value(body).map_err(|why| RpcError::new(None, PARSE_ERROR, format!("the body is not JSON: {why}")))?;
    let Value::Object(mut object) = value else {
        return Err(RpcError::new(
            None,
            INVALID_REQUEST,
            if value.is_array() { "batches are not supported: send one JSON-RPC message per request" } else { "a JSON-RPC message is an object" },
        ));
    };
    let id = match object.remove("id") {
        None => None,
        Some(Value::String(s)) => Some(Id::Text(s)),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => Some(Id::Number(i)),
            None => return Err(RpcError::new(None, INVALID_REQUEST, "id must be a string or an integer")),
        },
        Some(_) => return Err(RpcError::new(None, INVALID_REQUEST, "id must be a string or an integer")),
    };
    let fail = |m: &str| Err(RpcError::new(id.clone(), INVALID_REQUEST, m));
    match object.remove("jsonrpc") {
        Some(Value::String(v)) if v == "2.0" => {}
        _ => return fail("jsonrpc must be \"2.0\""),
    }
    let method = match object.remove("method") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 128 => m,
        Some(Value::String(_)) => return fail("method must be 1-128 characters"),
        // A response (to a request this server never sent): the error
        // answer to it has no id.
        None if object.contains_key("result") || object.contains_key("error") => {
            return Err(RpcError::new(None, INVALID_REQUEST, "this server sends no requests, so it takes no responses"))
        }
        _ => return fail("method must be a string"),
    };
    let params = match object.remove("params") {
        None => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => return Err(RpcError::new(id, INVALID_PARAMS, "params must be an object")),
    };
    if !object.is_empty() {
        return fail("the message has a member JSON-RPC does not define");
    }
    Ok(Message { id, method, params })
}

/// A JSON value, refusing duplicate keys (serde_json keeps the last one,
/// another parser the first: the gateway and InfraBox must never read two
/// different requests from one body).
pub fn strict_value(bytes: &[u8]) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict::deserialize(&mut de).map_err(describe)?.0;
    de.end().map_err(describe)?;
    Ok(value)
}

/// The location and class of a JSON error, never its quoted input.
fn describe(e: serde_json::Error) -> String {
    let class = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "invalid data",
        serde_json::error::Category::Eof => "unexpected end",
    };
    if e.to_string().contains(DUPLICATE) {
        return format!("{DUPLICATE} at line {} column {}", e.line(), e.column());
    }
    format!("{class} at line {} column {}", e.line(), e.column())
}

const DUPLICATE: &str = "duplicate object key";

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if out.insert(key, v).is_some() {
                return Err(de::Error::custom(DUPLICATE));
            }
        }
        Ok(Value::Object(out))
    }
}

/// `value` with every object's keys sorted, compact: the canonical form
/// whose SHA-256 the audit keeps of tool arguments.
pub fn canonical(value: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::from(k.as_str()).to_string());
                    out.push(':');
                    if let Some(inner) = m.get(*k) {
                        write(inner, out);
                    }
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, inner) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(inner, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn strict_parsing_refuses_what_two_parsers_could_read_differently() {
        let ok = parse(br#"{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{}}"#);
        assert_eq!(ok.map(|m| (m.id, m.method)), Ok((Some(Id::Number(7)), "tools/list".into())));
        let cases: &[(&[u8], i64)] = &[
            (b"", PARSE_ERROR),
            (b"{", PARSE_ERROR),
            (b"{} x", PARSE_ERROR),
            (b"\xff\xfe", PARSE_ERROR),
            (br#"{"jsonrpc":"2.0","id":1,"method":"a","method":"b"}"#, PARSE_ERROR),
            (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#, PARSE_ERROR),
            (br#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"arguments":{"k":1,"k":2}}}"#, PARSE_ERROR),
            (br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#, INVALID_REQUEST),
            (br#""ping""#, INVALID_REQUEST),
            (br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#, INVALID_REQUEST),
            (br#"{"id":1,"method":"ping"}"#, INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#, INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#, INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":true,"method":"ping"}"#, INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":1,"method":7}"#, INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":1,"method":""}"#, INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":1,"result":{}}"#, INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":1,"method":"ping","extra":1}"#, INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":1,"method":"ping","params":[1]}"#, INVALID_PARAMS),
        ];
        for (body, code) in cases {
            let got = parse(body).map(|_| ()).map_err(|e| e.code);
            assert_eq!(got, Err(*code), "{}", String::from_utf8_lossy(body));
        }
        let Err(e) = parse(br#"{"jsonrpc":"2.0","id":"abc","method":"ping","params":"ib_mcp_secret"}"#) else {
            return;
        };
        assert_eq!(e.id, Some(Id::Text("abc".into())), "the id survives a later error");
        assert!(!e.message.contains("ib_mcp_"), "{}", e.message);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(parse(deep.as_bytes()).map_err(|e| e.code), Err(PARSE_ERROR), "deep nesting is an error, not a crash");
    }

    #[test]
    fn canonical_form_ignores_key_order_and_whitespace() -> Result<(), String> {
        let a = strict_value(br#"{"b":1,"a":{"y":[1,2],"x":"s"}}"#)?;
        let b = strict_value(b"{ \"a\" : {\"x\":\"s\",\"y\":[1, 2]}, \"b\":1 }")?;
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(canonical(&a), r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
        Ok(())
    }
}
