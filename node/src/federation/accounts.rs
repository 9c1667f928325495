//! The accounts of this hub: one local tree of [`Account`]s (never
//! replicated: accounts, password hashes and OAuth links stay on their home
//! hub), username and password rules, and Argon2id hashing. Passwords are
//! verified only at login (`POST /token`), never per request: requests carry
//! the JWT. Hashing runs on the blocking pool behind a small semaphore, so
//! the memory Argon2 uses (19 MiB per hash) is bounded.
//!
//! ```no_run
//! # async fn demo(store: hubmesh_store::Store) -> Result<(), hubmesh_node::federation::accounts::AccountError> {
//! use hubmesh_node::federation::accounts::Accounts;
//! let accounts = Accounts::open(&store, 1000)?;
//! accounts.create("alice", Some("correct horse"), false).await?;
//! assert!(accounts.verify_password("alice", "correct horse").await?.is_some());
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use argon2::password_hash::SaltString;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use axum::http::StatusCode;
use hubmesh_store::{LocalTree, Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::now_ms;

/// Longest username (OAuth names `provider:login` included).
pub const MAX_USERNAME: usize = 128;
/// Longest username an operator or self-registration picks.
pub const MAX_LOCAL_USERNAME: usize = 64;
/// Shortest password.
pub const MIN_PASSWORD: usize = 8;
/// Longest password (bytes): bounds the hashing input.
pub const MAX_PASSWORD: usize = 1024;
/// Argon2 computations at once (2 cores; 19 MiB each).
const HASH_CONCURRENCY: usize = 2;
/// Most accounts one listing page returns.
pub const MAX_PAGE: usize = 1000;

/// An account, stored on its home hub only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Username (the JWT `sub`).
    pub username: String,
    /// Argon2id PHC string; `None` for accounts that only log in by OAuth.
    pub password_hash: Option<String>,
    /// Hub admin.
    pub admin: bool,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// The OAuth identity this account was created for, if any.
    pub oauth: Option<OAuthIdentity>,
    /// E-mail the OAuth provider reported, if any.
    pub email: Option<String>,
}

/// A provider's stable identity of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OAuthIdentity {
    /// Provider name (as configured).
    pub provider: String,
    /// The provider's subject id.
    pub subject: String,
}

/// What an account operation can fail on.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The username breaks the rules.
    #[error("invalid username: {0}")]
    InvalidUsername(String),
    /// The password breaks the rules.
    #[error("invalid password: {0}")]
    InvalidPassword(String),
    /// The username is taken.
    #[error("user {0:?} already exists")]
    Exists(String),
    /// No such account.
    #[error("no such user {0:?}")]
    NotFound(String),
    /// The hub holds its maximum number of accounts.
    #[error("account limit reached ({0})")]
    Full(usize),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Hashing failed (or its task did).
    #[error("password hashing: {0}")]
    Hash(String),
}

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> Self {
        match &e {
            AccountError::InvalidUsername(_) => ApiError::invalid_field("username", &e),
            AccountError::InvalidPassword(_) => ApiError::invalid_field("password", &e),
            AccountError::Exists(_) => ApiError::conflict("user_exists", e.to_string()),
            AccountError::NotFound(_) => ApiError::not_found(e.to_string()),
            AccountError::Full(_) => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "account_limit",
                e.to_string(),
            ),
            AccountError::Store(_) | AccountError::Hash(_) => ApiError::internal(e),
        }
    }
}

/// Checks a username an operator or a user picks: 1–64 of `[A-Za-z0-9._-]`,
/// starting with a letter or digit. (`:` is reserved for OAuth accounts,
/// named `provider:login`, so the two kinds never collide.)
pub fn check_username(name: &str) -> Result<(), AccountError> {
    let bad = |why: &str| Err(AccountError::InvalidUsername(why.into()));
    if name.is_empty() || name.len() > MAX_LOCAL_USERNAME {
        return bad("1-64 characters");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Checks any stored username (local or OAuth): 1–128 printable ASCII
/// characters without spaces, `/` or control characters.
pub fn check_any_username(name: &str) -> Result<(), AccountError> {
    if name.is_empty()
        || name.len() > MAX_USERNAME
        || !name.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    {
        return Err(AccountError::InvalidUsername(
            "1-128 printable characters without '/'".into(),
        ));
    }
    Ok(())
}

/// Checks a password: 8–1024 bytes.
pub fn check_password(pw: &str) -> Result<(), AccountError> {
    if pw.chars().count() < MIN_PASSWORD {
        return Err(AccountError::InvalidPassword(format!(
            "at least {MIN_PASSWORD} characters"
        )));
    }
    if pw.len() > MAX_PASSWORD {
        return Err(AccountError::InvalidPassword(format!(
            "at most {MAX_PASSWORD} bytes"
        )));
    }
    Ok(())
}

/// Argon2id (v19, m = 19 MiB, t = 2, p = 1: the crate's defaults, OWASP's
/// recommendation) of `pw` with a fresh salt, as a PHC string.
pub fn hash_password(pw: &str) -> Result<String, AccountError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

/// Whether `pw` matches the PHC string `phc`.
pub fn password_matches(phc: &str, pw: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default().verify_password(pw.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// The accounts of one hub.
#[derive(Clone)]
pub struct Accounts {
    store: Store,
    users: LocalTree<Account>,
    /// `provider/subject` → username.
    links: LocalTree<String>,
    max: usize,
    /// Number of accounts: counted once at open (sled's `len` is a scan),
    /// then kept by this handle, the tree's only writer.
    count: Arc<AtomicUsize>,
    hashing: Arc<Semaphore>,
    /// Hash of a random password, verified against when the user is unknown
    /// so that a login answers in the same time either way.
    dummy: Arc<String>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Accounts {
    /// The accounts in `store` (trees `accounts` and `oauth_links`), at most `max`.
    pub fn open(store: &Store, max: usize) -> Result<Accounts, AccountError> {
        use rand::RngCore;
        let mut pw = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut pw);
        let dummy = hash_password(&pw.iter().map(|b| format!("{b:02x}")).collect::<String>())?;
        let users = store.local::<Account>("accounts")?;
        Ok(Accounts {
            store: store.clone(),
            count: Arc::new(AtomicUsize::new(users.len()?)),
            users,
            links: store.local("oauth_links")?,
            max,
            hashing: Arc::new(Semaphore::new(HASH_CONCURRENCY)),
            dummy: Arc::new(dummy),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AccountError> {
        let _permit = self
            .hashing
            .acquire()
            .await
            .map_err(|_| AccountError::Hash("hashing stopped".into()))?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| AccountError::Hash(e.to_string()))
    }

    /// The account `username`.
    pub fn get(&self, username: &str) -> Result<Option<Account>, AccountError> {
        if check_any_username(username).is_err() {
            return Ok(None);
        }
        Ok(self.users.get(username)?)
    }

    /// Whether `username` exists.
    pub fn exists(&self, username: &str) -> Result<bool, AccountError> {
        Ok(self.get(username)?.is_some())
    }

    /// Number of accounts.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Up to `limit` (≤ [`MAX_PAGE`]) accounts after `after`, in name order.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Account>, AccountError> {
        Ok(self
            .users
            .scan("", after, limit.min(MAX_PAGE))?
            .into_iter()
            .map(|(_, a)| a)
            .collect())
    }

    async fn insert(&self, account: Account) -> Result<Account, AccountError> {
        // Reserve a slot first, so concurrent creations cannot overshoot.
        if self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(AccountError::Full(self.max));
        }
        let inserted = self.users.insert_new(&account.username, &account);
        if !matches!(inserted, Ok(Some(_))) {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        match inserted? {
            Some(ticket) => {
                self.store.durable(ticket).await?;
                Ok(account)
            }
            None => Err(AccountError::Exists(account.username)),
        }
    }

    /// Creates `username` (local rules) with `password` (`None`: no password
    /// login), durably.
    pub async fn create(
        &self,
        username: &str,
        password: Option<&str>,
        admin: bool,
    ) -> Result<Account, AccountError> {
        check_username(username)?;
        if let Some(pw) = password {
            check_password(pw)?;
        }
        if self.exists(username)? {
            return Err(AccountError::Exists(username.to_owned()));
        }
        let password_hash = match password {
            Some(pw) => {
                let pw = pw.to_owned();
                Some(self.blocking(move || hash_password(&pw)).await??)
            }
            None => None,
        };
        self.insert(Account {
            username: username.to_owned(),
            password_hash,
            admin,
            created_ms: now_ms(),
            oauth: None,
            email: None,
        })
        .await
    }

    /// Removes `username` (and its OAuth link), durably.
    pub async fn remove(&self, username: &str) -> Result<(), AccountError> {
        let account = self
            .get(username)?
            .ok_or_else(|| AccountError::NotFound(username.to_owned()))?;
        if let Some(id) = &account.oauth {
            let (_, ticket) = self.links.remove(&link_key(id))?;
            self.store.durable(ticket).await?;
        }
        let (was, ticket) = self.users.remove(username)?;
        if was {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        self.store.durable(ticket).await?;
        Ok(())
    }

    /// Sets the password of `username`, durably. Tokens already issued stay
    /// valid until they expire or are logged out.
    pub async fn set_password(&self, username: &str, password: &str) -> Result<(), AccountError> {
        check_password(password)?;
        let mut account = self
            .get(username)?
            .ok_or_else(|| AccountError::NotFound(username.to_owned()))?;
        let pw = password.to_owned();
        account.password_hash = Some(self.blocking(move || hash_password(&pw)).await??);
        let ticket = self.users.put(username, &account)?;
        self.store.durable(ticket).await?;
        Ok(())
    }

    /// The account if `password` is its password. Unknown users cost the
    /// same Argon2 verification as known ones (no user enumeration by timing).
    pub async fn verify_password(
        &self,
        username: &str,
        password: &str,
    ) -> Result<Option<Account>, AccountError> {
        if password.len() > MAX_PASSWORD {
            return Ok(None);
        }
        let account = self.get(username)?;
        let phc = match account.as_ref().and_then(|a| a.password_hash.clone()) {
            Some(h) => h,
            None => self.dummy.as_ref().clone(),
        };
        let pw = password.to_owned();
        let ok = self.blocking(move || password_matches(&phc, &pw)).await?;
        Ok(account.filter(|a| ok && a.password_hash.is_some()))
    }

    /// The account linked to a provider identity, creating it (named
    /// `provider:login`, else `provider:subject` when that is taken or the
    /// login is unusable) on first login.
    pub async fn login_oauth(
        &self,
        id: &OAuthIdentity,
        login: Option<&str>,
        email: Option<&str>,
    ) -> Result<Account, AccountError> {
        if let Some(name) = self.links.get(&link_key(id))?
            && let Some(account) = self.get(&name)?
        {
            return Ok(account);
        }
        let mut candidates = Vec::new();
        if let Some(l) = login {
            candidates.push(format!("{}:{l}", id.provider));
        }
        candidates.push(format!("{}:{}", id.provider, id.subject));
        let mut last = AccountError::InvalidUsername("no usable name".into());
        for name in candidates {
            if let Err(e) = check_any_username(&name) {
                last = e;
                continue;
            }
            let account = Account {
                username: name.clone(),
                password_hash: None,
                admin: false,
                created_ms: now_ms(),
                oauth: Some(id.clone()),
                email: email.filter(|e| e.len() <= 254).map(str::to_owned),
            };
            match self.insert(account).await {
                Ok(a) => {
                    let ticket = self.links.put(&link_key(id), &name)?;
                    self.store.durable(ticket).await?;
                    return Ok(a);
                }
                Err(e @ AccountError::Exists(_)) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}

fn link_key(id: &OAuthIdentity) -> String {
    format!("{}/{}", id.provider, id.subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_rules() {
        assert!(check_username("alice").is_ok());
        assert!(check_username("a.b-c_9").is_ok());
        for bad in ["", "-x", "a b", "gh:x", "é", &"a".repeat(65)] {
            assert!(check_username(bad).is_err(), "{bad:?}");
        }
        assert!(check_any_username("github:octo").is_ok());
        assert!(check_any_username("a/b").is_err());
        assert!(check_password("short").is_err());
        assert!(check_password(&"x".repeat(1025)).is_err());
    }

    #[tokio::test]
    async fn create_verify_passwd_remove() {
        let store = Store::memory();
        let a = Accounts::open(&store, 2).unwrap();
        a.create("alice", Some("password-1"), true).await.unwrap();
        let stored = a.get("alice").unwrap().unwrap();
        assert!(
            stored
                .password_hash
                .as_deref()
                .unwrap()
                .starts_with("$argon2id$")
        );
        assert!(matches!(
            a.create("alice", Some("password-1"), false).await,
            Err(AccountError::Exists(_))
        ));
        assert!(
            a.verify_password("alice", "password-1")
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            a.verify_password("alice", "password-2")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            a.verify_password("bob", "password-1")
                .await
                .unwrap()
                .is_none()
        );
        a.set_password("alice", "password-2").await.unwrap();
        assert!(
            a.verify_password("alice", "password-2")
                .await
                .unwrap()
                .is_some()
        );
        let id = OAuthIdentity {
            provider: "gh".into(),
            subject: "42".into(),
        };
        let o = a.login_oauth(&id, Some("octo"), None).await.unwrap();
        assert_eq!(o.username, "gh:octo");
        assert_eq!(
            a.login_oauth(&id, Some("renamed"), None)
                .await
                .unwrap()
                .username,
            "gh:octo"
        );
        assert!(
            a.verify_password("gh:octo", "anything-at-all")
                .await
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            a.create("carol", None, false).await,
            Err(AccountError::Full(2))
        ));
        a.remove("gh:octo").await.unwrap();
        assert!(matches!(
            a.remove("gh:octo").await,
            Err(AccountError::NotFound(_))
        ));
        assert_eq!(a.list(None, 10).unwrap().len(), 1);
    }
}
