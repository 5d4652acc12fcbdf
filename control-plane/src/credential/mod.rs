//! Upstream InfraBox credentials (DESIGN §7): per user, a read global token
//! (`scope_push=false`) and, only while one of the user's live MCP tokens
//! may trigger, a write one (`scope_push=true`). They are minted in InfraBox
//! with the user's own session, stored AES-256-GCM encrypted, outlive every
//! live MCP token that needs them, and are deleted in InfraBox once no live
//! token needs them. They reach the filter only in the snapshot.
//!
//! - [`cipher`]: the encryption at rest.
//! - [`infrabox`]: the two InfraBox calls (create and delete a global token).
//! - [`upstream`]: when to mint, replace and retire, against the database.

pub mod cipher;
pub mod infrabox;
pub mod upstream;

/// Which of a user's two credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// `scope_push=false`: every read route.
    Read,
    /// `scope_push=true`: trigger, restart, rerun, abort.
    Write,
}

impl CredentialKind {
    pub const ALL: [CredentialKind; 2] = [CredentialKind::Read, CredentialKind::Write];

    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Read => "read",
            CredentialKind::Write => "write",
        }
    }

    /// InfraBox's `scope_push` for this kind.
    pub fn scope_push(self) -> bool {
        self == CredentialKind::Write
    }
}
