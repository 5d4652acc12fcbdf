//! Snapshot body → [`Policy`] in one pass: serde visitors write every token
//! straight into the policy's tables (no intermediate `Snapshot`, no
//! per-token strings), from a whole body or from a reader fed in chunks.
//!
//! A token is accepted in both wire forms the control plane may send: the
//! compact array `[token_id, token_hash, user_id, expires_at, allow_trigger,
//! projects]` and the object with those keys. Anything malformed refuses the
//! whole snapshot with a message that names where, never what (a value could
//! be a credential).

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::cursor::ValueCursor;
use super::shard::{scope_expiry, Scope, Shard, SHARDS};
use super::{Grant, Policy, Projects, User, UserIx, Users, TRIGGER_BIT};
use crate::route::Class;
use crate::snapshot::{Limits, SnapshotError, SnapshotUser, SCHEMA};
use crate::token;

/// Largest `token_count` hint honoured when reserving space.
const MAX_RESERVE: u64 = 1_000_000;

/// Parses a whole body (the same path as [`from_reader`]).
pub fn from_slice(body: &[u8]) -> Result<Policy, SnapshotError> {
    from_reader(body)
}

/// Parses a body read piece by piece: the top-level object and the
/// `tokens` array are walked by [`ValueCursor`], each member and each token
/// decoded on its own, straight into the policy's shards.
pub fn from_reader<R: Read>(body: R) -> Result<Policy, SnapshotError> {
    let p = parse_body(body)?;
    if p.delta.is_some() {
        return Err(SnapshotError("a delta (it has a base) where a full snapshot was expected".into()));
    }
    p.builder.into_policy(p.version, p.generated_at, p.limits)
}

/// Applies a [`SnapshotDelta`](crate::snapshot::SnapshotDelta) body to
/// `old`, which must be its `base`. Only the shards holding a token the
/// delta replaces or removes, or receiving one it adds, are rebuilt; the
/// others are shared with `old`, as are the user and project tables unless
/// the delta changes them. `old` stays as it is; anything that does not add
/// up refuses the delta, and the VM asks for the full snapshot.
pub fn apply_delta<R: Read>(old: &Policy, body: R) -> Result<Policy, SnapshotError> {
    let p = parse_body(body)?;
    let Some(delta) = p.delta else {
        return Err(SnapshotError("not a delta: base is missing".into()));
    };
    if delta.base != old.version {
        return Err(SnapshotError(format!("a delta from version {} to a policy of version {}", delta.base, old.version)));
    }
    let d = p.builder;
    // Every id the delta replaces or removes (sorted); none of its tokens twice.
    let mut touched: Vec<[u8; 8]> = d.shards.iter().flat_map(|s| s.grants.iter().map(|g| g.token_id)).collect();
    let added = touched.len();
    touched.sort_unstable();
    if touched.windows(2).any(|w| w.first() == w.get(1)) {
        return Err(SnapshotError("a delta names a token twice".into()));
    }
    touched.extend(delta.removed.iter().map(super::id_bytes));
    touched.sort_unstable();
    touched.dedup();
    let is_touched = |g: &Grant| touched.binary_search(&g.token_id).is_ok();

    // Projects: the held table, extended only if the delta brings new ones.
    let mut projects = Arc::clone(&old.projects);
    let project_map: Vec<u32> = d
        .projects
        .names
        .iter()
        .map(|name| match projects.ix.get(name) {
            Some(ix) => *ix,
            None => Arc::make_mut(&mut projects).intern(name),
        })
        .collect();

    // Users: the delta's users found among the held ones by id (one pass
    // over the held table), credentials replaced for those it lists; a new
    // user gets a slot only if one of the delta's tokens needs it.
    let mut users = Arc::clone(&old.users);
    let table = Arc::make_mut(&mut users);
    let wanted: HashMap<&str, usize> = d.users.iter().enumerate().map(|(ix, u)| (&*u.id, ix)).collect();
    let mut resolved: Vec<Option<UserIx>> = vec![None; d.users.len()];
    if !wanted.is_empty() {
        for (ix, slot) in old.users.slots.iter().enumerate() {
            if let Some(at) = slot.as_ref().and_then(|u| wanted.get(&*u.id)).and_then(|di| resolved.get_mut(*di)) {
                *at = Some(ix as UserIx);
            }
        }
    }
    let mut needed = vec![false; d.users.len()];
    for g in d.shards.iter().flat_map(|s| s.grants.iter()) {
        if let Some(n) = needed.get_mut(g.user as usize) {
            *n = true;
        }
    }
    let mut concerned = Vec::new();
    for (di, u) in d.users.iter().enumerate() {
        let listed = d.listed.get(di).copied().unwrap_or(false);
        let need = needed.get(di).copied().unwrap_or(false);
        if !listed {
            if need {
                return Err(SnapshotError("a delta token whose user the delta does not describe".into()));
            }
            continue;
        }
        let slot = resolved.get_mut(di).ok_or_else(|| SnapshotError("a delta user out of range".into()))?;
        match *slot {
            Some(ix) => {
                if let Some(s) = table.slots.get_mut(ix as usize) {
                    *s = Some(Arc::new(u.clone()));
                }
                concerned.push(ix);
            }
            None if need => *slot = Some(table.add(Arc::new(u.clone()))),
            None => {}
        }
    }

    // Shards: untouched ones shared, the others rebuilt.
    let empty = Shard::default();
    let mut shards = Vec::with_capacity(SHARDS);
    let mut removed = 0usize;
    let mut scope = Vec::new();
    for s in 0..SHARDS {
        let held = old.shards.get(s);
        let held_shard = held.map_or(&empty, |h| &**h);
        let incoming = d.shards.get(s).filter(|i| !i.grants.is_empty());
        let hit = held_shard.grants.iter().any(is_touched);
        if !hit && incoming.is_none() {
            shards.push(held.map_or_else(|| Arc::new(Shard::default()), Arc::clone));
            continue;
        }
        let mut fresh = Shard::default();
        fresh.grants.reserve_exact(held_shard.grants.len() + incoming.map_or(0, |i| i.grants.len()));
        fresh.scopes.reserve_exact(held_shard.scopes.len() + incoming.map_or(0, |i| i.scopes.len()));
        for g in &held_shard.grants {
            if is_touched(g) {
                table.count(g.user, false);
                concerned.push(g.user);
                removed += 1;
            } else {
                fresh.push(*g, held_shard.scope(g))?;
            }
        }
        for g in incoming.map(|i| i.grants.as_slice()).unwrap_or_default() {
            let user = resolved
                .get(g.user as usize)
                .copied()
                .flatten()
                .ok_or_else(|| SnapshotError("a delta token whose user the delta does not describe".into()))?;
            scope.clear();
            for (project, expiry) in incoming.map(|i| i.scope(g)).unwrap_or_default() {
                let project = *project_map.get(*project as usize).ok_or_else(|| SnapshotError("a scope without its project".into()))?;
                scope.push((project, *expiry));
            }
            table.count(user, true);
            fresh.push(Grant { user, ..*g }, &scope)?;
        }
        fresh.seal().map_err(|_| SnapshotError("a delta token's token_hash is held by another token".into()))?;
        shards.push(Arc::new(fresh));
    }
    let total = old.tokens.saturating_sub(removed) + added;
    if total != delta.total {
        return Err(SnapshotError(format!("the delta gives {total} tokens, not the {} it announces", delta.total)));
    }
    // Users the delta describes but no token uses are not kept (as a full
    // snapshot lists only users with a live token, nothing refers to them).
    for ix in concerned {
        table.release_if_unused(ix);
    }
    Ok(Policy { version: p.version, generated_at: p.generated_at, limits: p.limits, shards, users, projects, tokens: total })
}

/// What makes a body a delta.
struct DeltaFields {
    base: String,
    total: usize,
    removed: Vec<[u8; token::TOKEN_ID_LEN]>,
}

/// A body's members, full snapshot or delta.
struct Parsed {
    version: String,
    generated_at: i64,
    limits: Limits,
    builder: Builder,
    delta: Option<DeltaFields>,
}

fn parse_body<R: Read>(body: R) -> Result<Parsed, SnapshotError> {
    let mut c = ValueCursor::new(body);
    let mut b = Builder::default();
    let mut schema = None;
    let mut version: Option<String> = None;
    let mut generated_at: Option<i64> = None;
    let mut limits: Option<Limits> = None;
    let mut base: Option<String> = None;
    let mut total: Option<usize> = None;
    let mut removed: Option<Vec<[u8; token::TOKEN_ID_LEN]>> = None;
    let (mut tokens, mut users) = (false, false);
    c.consume(b'{', "a snapshot object")?;
    let mut done = c.close_if(b'}')?;
    while !done {
        let key: Key = decode(c.value()?, "snapshot key")?;
        c.consume(b':', ":")?;
        match key {
            Key::Schema if schema.is_none() => schema = Some(decode::<u32>(c.value()?, "schema")?),
            Key::Version if version.is_none() => version = Some(decode(c.value()?, "version")?),
            Key::GeneratedAt if generated_at.is_none() => generated_at = Some(decode(c.value()?, "generated_at")?),
            Key::Limits if limits.is_none() => limits = Some(decode(c.value()?, "limits")?),
            Key::Base if base.is_none() => base = Some(decode(c.value()?, "base")?),
            Key::Total if total.is_none() => total = Some(decode(c.value()?, "total")?),
            Key::Removed if removed.is_none() => {
                let ids: Vec<String> = decode(c.value()?, "removed")?;
                let parsed: Option<Vec<[u8; token::TOKEN_ID_LEN]>> =
                    ids.iter().map(|id| if token::is_token_id(id) { id.as_bytes().try_into().ok() } else { None }).collect();
                removed = Some(parsed.ok_or_else(|| SnapshotError("removed: a token_id is not 16 lowercase hex".into()))?);
            }
            Key::TokenCount => {
                let hint = decode::<u64>(c.value()?, "token_count")?.min(MAX_RESERVE) as usize;
                b.make_shards(hint);
            }
            Key::Tokens if !tokens => {
                tokens = true;
                c.consume(b'[', "tokens as an array")?;
                let mut last = c.close_if(b']')?;
                while !last {
                    let n = b.tokens;
                    decode_seed(TokenSeed(&mut b), c.value()?, || format!("tokens[{n}]"))?;
                    last = c.next_or_close(b']')?;
                }
            }
            Key::Users if !users => {
                users = true;
                decode_seed(UsersSeed(&mut b), c.value()?, || "users".into())?;
            }
            Key::Other => {
                c.value()?;
            }
            Key::Schema => return Err(duplicate("schema")),
            Key::Version => return Err(duplicate("version")),
            Key::GeneratedAt => return Err(duplicate("generated_at")),
            Key::Limits => return Err(duplicate("limits")),
            Key::Base => return Err(duplicate("base")),
            Key::Total => return Err(duplicate("total")),
            Key::Removed => return Err(duplicate("removed")),
            Key::Tokens => return Err(duplicate("tokens")),
            Key::Users => return Err(duplicate("users")),
        }
        done = c.next_or_close(b'}')?;
    }
    c.end()?;
    let missing = |field: &str| SnapshotError(format!("{field} is missing"));
    let schema = schema.unwrap_or(SCHEMA);
    if schema != SCHEMA {
        return Err(SnapshotError(format!("unsupported schema {schema}")));
    }
    let version = version.ok_or_else(|| missing("version"))?;
    let generated_at = generated_at.ok_or_else(|| missing("generated_at"))?;
    let limits = limits.ok_or_else(|| missing("limits"))?;
    if !tokens {
        return Err(missing("tokens"));
    }
    if !users {
        return Err(missing("users"));
    }
    check(&version, &limits).map_err(SnapshotError)?;
    let delta = match (base, total, removed) {
        (None, None, None) => None,
        (Some(base), Some(total), Some(removed)) => Some(DeltaFields { base, total, removed }),
        (None, ..) => return Err(missing("base")),
        (_, None, _) => return Err(missing("total")),
        (_, _, None) => return Err(missing("removed")),
    };
    Ok(Parsed { version, generated_at, limits, builder: b, delta })
}

fn duplicate(field: &str) -> SnapshotError {
    SnapshotError(format!("duplicate field {field}"))
}

/// Decodes one value; errors name `what` (never the value).
fn decode<'a, T: Deserialize<'a>>(v: &'a [u8], what: &str) -> Result<T, SnapshotError> {
    serde_json::from_slice(v).map_err(|e| SnapshotError(format!("{what}: {}", describe(e).0)))
}

/// Decodes one value with `seed`; `what` names it in an error (built only then).
fn decode_seed<'a, S: DeserializeSeed<'a>>(seed: S, v: &'a [u8], what: impl FnOnce() -> String) -> Result<S::Value, SnapshotError> {
    let mut de = serde_json::Deserializer::from_slice(v);
    let out = seed.deserialize(&mut de).and_then(|out| de.end().map(|()| out));
    out.map_err(|e| SnapshotError(format!("{}: {}", what(), describe(e).0)))
}

/// serde_json quotes offending values (which may be credentials): keep its
/// message only when it quotes nothing.
fn describe(e: serde_json::Error) -> SnapshotError {
    let msg = e.to_string();
    if msg.contains('"') || msg.contains('`') {
        SnapshotError(format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()))
    } else {
        SnapshotError(msg)
    }
}

/// The tables being filled.
#[derive(Default)]
struct Builder {
    /// [`SHARDS`] once the first token (or the count hint) arrives.
    shards: Vec<Shard>,
    tokens: usize,
    /// The scope of the token being decoded.
    pending_scope: Vec<Scope>,
    users: Vec<User>,
    user_ix: HashMap<Box<str>, UserIx>,
    /// Per user: named in `users` (credentials given), not only by a token.
    listed: Vec<bool>,
    projects: Projects,
}

impl Builder {
    /// Makes the shards, each with room for its share of `hint` tokens
    /// (hashes are uniform: a shard rarely exceeds its share by 8 %).
    fn make_shards(&mut self, hint: usize) {
        if self.shards.is_empty() {
            let each = hint / SHARDS;
            let room = if each == 0 { 0 } else { each + each / 12 + 4 };
            self.shards = (0..SHARDS).map(|_| Shard::with_room(room)).collect();
        }
    }

    /// Adds a decoded token, with the scope decoded with it.
    fn push(&mut self, grant: Grant) -> Result<(), SnapshotError> {
        self.make_shards(0);
        let shard = self.shards.get_mut(grant.shard()).ok_or_else(|| SnapshotError("no shard".into()))?;
        shard.push(grant, &self.pending_scope)?;
        self.pending_scope.clear();
        self.tokens += 1;
        Ok(())
    }

    /// The policy these tables make: shards sorted and checked, the users
    /// no token refers to left out.
    fn into_policy(mut self, version: String, generated_at: i64, limits: Limits) -> Result<Policy, SnapshotError> {
        self.make_shards(0);
        let mut users = Users { slots: Vec::with_capacity(self.users.len()), tokens: vec![0; self.users.len()], free: Vec::new() };
        for shard in &mut self.shards {
            shard.seal()?;
            for g in &shard.grants {
                users.count(g.user, true);
            }
        }
        users.slots.extend(self.users.into_iter().map(|u| Some(Arc::new(u))));
        for ix in 0..users.slots.len() {
            users.release_if_unused(ix as UserIx);
        }
        Ok(Policy {
            version,
            generated_at,
            limits,
            shards: self.shards.into_iter().map(Arc::new).collect(),
            users: Arc::new(users),
            projects: Arc::new(self.projects),
            tokens: self.tokens,
        })
    }

    fn intern_user(&mut self, id: &str) -> UserIx {
        if let Some(ix) = self.user_ix.get(id) {
            return *ix;
        }
        let ix = self.users.len() as UserIx;
        self.users.push(User { id: id.into(), ..Default::default() });
        self.user_ix.insert(id.into(), ix);
        ix
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Key {
    Schema,
    Version,
    GeneratedAt,
    Limits,
    TokenCount,
    Tokens,
    Users,
    Base,
    Total,
    Removed,
    #[serde(other)]
    Other,
}

fn check(version: &str, limits: &Limits) -> Result<(), String> {
    if version.is_empty() || version.len() > 128 || version.contains('"') {
        return Err("version must be 1-128 characters without quotes".into());
    }
    if limits.window_seconds == 0 {
        return Err("limits.window_seconds must be positive".into());
    }
    for class in Class::ALL {
        if !limits.classes.contains_key(&class) {
            return Err(format!("limits.classes has no {} entry", class.as_str()));
        }
    }
    Ok(())
}

/// One token, compact array or object; appended to the grants.
struct TokenSeed<'b>(&'b mut Builder);

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum TokenKey {
    TokenId,
    TokenHash,
    UserId,
    ExpiresAt,
    AllowTrigger,
    Projects,
    #[serde(other)]
    Other,
}

/// A token's fields as they arrive.
#[derive(Default)]
struct Fields {
    token_id: Option<[u8; token::TOKEN_ID_LEN]>,
    hash: Option<token::TokenHash>,
    user: Option<UserIx>,
    expires_at: Option<i64>,
    allow_trigger: Option<bool>,
    /// Whether `projects` came (its entries wait in the builder).
    scope: bool,
}

impl<'de> DeserializeSeed<'de> for TokenSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl TokenSeed<'_> {
    fn push<E: de::Error>(self, f: Fields) -> Result<(), E> {
        let missing = |field: &str| E::custom(format!("{field} is missing"));
        let token_id = f.token_id.ok_or_else(|| missing("token_id"))?;
        let hash = f.hash.ok_or_else(|| missing("token_hash"))?;
        let allow_trigger = f.allow_trigger.ok_or_else(|| missing("allow_trigger"))?;
        let grant = Grant {
            hash: super::hash_prefix(&hash),
            token_id: super::id_bytes(&token_id),
            user: f.user.ok_or_else(|| missing("user_id"))?,
            expires_at: f.expires_at.ok_or_else(|| missing("expires_at"))?.clamp(0, i64::from(u32::MAX)) as u32,
            scope_start: 0,
            trigger_and_scope_len: if allow_trigger { TRIGGER_BIT } else { 0 },
        };
        if !f.scope {
            return Err(missing("projects"));
        }
        self.0.push(grant).map_err(|e| E::custom(e.0))
    }
}

impl<'de> Visitor<'de> for TokenSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a token as an array or object")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let b = &mut *self.0;
        let f = Fields {
            token_id: seq.next_element_seed(TokenIdSeed)?,
            hash: seq.next_element_seed(HashSeed)?,
            user: seq.next_element_seed(user_id(&mut *b))?,
            expires_at: seq.next_element()?,
            allow_trigger: seq.next_element()?,
            scope: seq.next_element_seed(ScopeSeed(&mut *b))?.is_some(),
        };
        // Fields a later schema may append.
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.push(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let b = &mut *self.0;
        let mut f = Fields::default();
        let dup = |field: &str| de::Error::custom(format!("duplicate field {field}"));
        while let Some(key) = map.next_key::<TokenKey>()? {
            match key {
                TokenKey::TokenId if f.token_id.is_none() => f.token_id = Some(map.next_value_seed(TokenIdSeed)?),
                TokenKey::TokenHash if f.hash.is_none() => f.hash = Some(map.next_value_seed(HashSeed)?),
                TokenKey::UserId if f.user.is_none() => f.user = Some(map.next_value_seed(user_id(&mut *b))?),
                TokenKey::ExpiresAt if f.expires_at.is_none() => f.expires_at = Some(map.next_value()?),
                TokenKey::AllowTrigger if f.allow_trigger.is_none() => f.allow_trigger = Some(map.next_value()?),
                TokenKey::Projects if !f.scope => {
                    map.next_value_seed(ScopeSeed(&mut *b))?;
                    f.scope = true;
                }
                TokenKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
                TokenKey::TokenId => return Err(dup("token_id")),
                TokenKey::TokenHash => return Err(dup("token_hash")),
                TokenKey::UserId => return Err(dup("user_id")),
                TokenKey::ExpiresAt => return Err(dup("expires_at")),
                TokenKey::AllowTrigger => return Err(dup("allow_trigger")),
                TokenKey::Projects => return Err(dup("projects")),
            }
        }
        self.push(f)
    }
}

/// `token_id`: 16 lowercase hex.
struct TokenIdSeed;

impl<'de> DeserializeSeed<'de> for TokenIdSeed {
    type Value = [u8; token::TOKEN_ID_LEN];
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for TokenIdSeed {
    type Value = [u8; token::TOKEN_ID_LEN];
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("token_id as 16 lowercase hex")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let bad = || E::custom("token_id is not 16 lowercase hex");
        if !token::is_token_id(v) {
            return Err(bad());
        }
        v.as_bytes().try_into().map_err(|_| bad())
    }
}

/// `token_hash`: 64 lowercase hex.
struct HashSeed;

impl<'de> DeserializeSeed<'de> for HashSeed {
    type Value = token::TokenHash;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        // As bytes: serde_json then skips UTF-8 validation (hex is ASCII or invalid anyway).
        d.deserialize_bytes(self)
    }
}

impl Visitor<'_> for HashSeed {
    type Value = token::TokenHash;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("token_hash as 64 lowercase hex")
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        token::parse_hash_hex_bytes(v).ok_or_else(|| E::custom("token_hash is not 64 lowercase hex"))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.visit_bytes(v.as_bytes())
    }
}

/// A user or project id string, interned into the builder's table of that kind.
struct Intern<'b> {
    builder: &'b mut Builder,
    kind: IdKind,
}

#[derive(Clone, Copy)]
enum IdKind {
    User,
    Project,
}

fn user_id(builder: &mut Builder) -> Intern<'_> {
    Intern { builder, kind: IdKind::User }
}

fn project_id(builder: &mut Builder) -> Intern<'_> {
    Intern { builder, kind: IdKind::Project }
}

impl<'de> DeserializeSeed<'de> for Intern<'_> {
    type Value = u32;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u32, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Intern<'_> {
    type Value = u32;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            IdKind::User => "a user id string",
            IdKind::Project => "a project id string",
        })
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<u32, E> {
        Ok(match self.kind {
            IdKind::User => self.builder.intern_user(v),
            IdKind::Project => self.builder.projects.intern(v),
        })
    }
}

/// `projects`: `{project id: expiry or null}`, held in the builder until
/// the token is complete.
struct ScopeSeed<'b>(&'b mut Builder);

impl<'de> DeserializeSeed<'de> for ScopeSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ScopeSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of project ids to expiry or null")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.pending_scope.clear();
        while let Some(project) = map.next_key_seed(project_id(&mut *self.0))? {
            let expiry: Option<i64> = map.next_value()?;
            self.0.pending_scope.push((project, scope_expiry(expiry)));
        }
        Ok(())
    }
}

/// `users`: `{user id: credentials}`.
struct UsersSeed<'b>(&'b mut Builder);

impl<'de> DeserializeSeed<'de> for UsersSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for UsersSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of user ids to credentials")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(ix) = map.next_key_seed(user_id(&mut *self.0))? {
            let creds: SnapshotUser = map.next_value()?;
            if self.0.listed.len() <= ix as usize {
                self.0.listed.resize(ix as usize + 1, false);
            }
            if let Some(listed) = self.0.listed.get_mut(ix as usize) {
                *listed = true;
            }
            if let Some(user) = self.0.users.get_mut(ix as usize) {
                user.read_credential = creds.read_credential.map(Into::into);
                user.write_credential = creds.write_credential.map(Into::into);
            }
        }
        Ok(())
    }
}
