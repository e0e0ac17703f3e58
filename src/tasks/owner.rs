//! Who owns a task: a keyed hash of the auth context that created it.
//!
//! The owner kept with a task is `HMAC-SHA256(secret, context)` in hex, where the secret is made once
//! per store and kept with it ([`TaskStore::secret`](super::store::TaskStore::secret)): every process on
//! the same store derives the same owner from the same credential, a restarted one too, and a store
//! that leaks shows no credential and no way to test a guessed one without the secret.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Binds auth contexts to owners.
#[derive(Clone)]
pub struct OwnerKey {
    secret: [u8; 32],
}

impl std::fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnerKey(…)")
    }
}

impl OwnerKey {
    /// A key from a store's secret.
    pub fn new(secret: [u8; 32]) -> Self {
        OwnerKey { secret }
    }

    /// The owner of tasks created in `context` of `kind` (`credential` for an Authorization header,
    /// `session` for an HTTP session without one, `user` or `process` over stdio): `kind:` and the hex
    /// HMAC (the kind stays readable: the proxy treats session-bound tasks differently).
    pub fn owner(&self, kind: &str, context: &str) -> String {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(kind.as_bytes());
        mac.update(b"\0");
        mac.update(context.as_bytes());
        format!("{kind}:{}", hex(&mac.finalize().into_bytes()))
    }
}

/// A short, stable tag of an owner for logs and the admin command (never the credential, and not
/// enough of the owner to act as it).
pub fn owner_tag(owner: &str) -> String {
    hex(&Sha256::digest(owner.as_bytes())[..8])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The local user, for stdio owners: the login name, else the uid.
pub fn local_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid-{}", unsafe { libc::getuid() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_keyed_stable_and_distinct() {
        let a = OwnerKey::new([1; 32]);
        let b = OwnerKey::new([2; 32]);
        let owner = a.owner("credential", "Bearer secret-token");
        assert_eq!(owner, a.owner("credential", "Bearer secret-token"), "stable for one key");
        assert_ne!(owner, b.owner("credential", "Bearer secret-token"), "another key, another owner");
        assert_ne!(owner[11..], a.owner("session", "Bearer secret-token")[8..], "kinds never collide");
        assert!(owner.starts_with("credential:") && owner.len() == 11 + 64, "{owner}");
        assert!(!owner.contains("secret"));
        // RFC 4231 test case 2, to be sure this is HMAC-SHA256 and not a homemade mix.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(owner_tag(&owner).len(), 16);
    }
}
