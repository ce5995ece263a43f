//! The hazard archive's recipient: loading and validating the OpenPGP public key in
//! `hazard_encryption_key_path` (docs/design.md §5: "a key file holding an encryption-capable
//! OpenPGP public key").
//!
//! rPGP parses keys but leaves their semantics (which self-signature is current,
//! expiry, revocation, key flags) to the application, so that is done here, the way
//! GnuPG does it: only self-signatures that verify count, the newest one of each
//! component decides, and among the usable encryption (sub)keys the newest is taken.
//! Every reason a key cannot be used is a [`KeyError`] naming the file and the problem,
//! because a key that silently fails would turn every suspect file into a failed one.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pgp::composed::{Deserializable, SignedPublicKey, SignedSecretKey};
use pgp::packet::{PublicKey, PublicSubkey, Signature, SignatureType};
use pgp::types::{KeyDetails, Tag, Timestamp};

/// Key files are small; anything larger is not a single public key.
const MAX_KEY_FILE: u64 = 1 << 20;

/// Why the configured key cannot be used. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("hazard_encryption_key_path {0}: the key file does not exist")]
    Missing(PathBuf),
    #[error("hazard_encryption_key_path {path}: cannot read the key file: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("hazard_encryption_key_path {path}: not an OpenPGP public key ({reason})")]
    NotAKey { path: PathBuf, reason: String },
    #[error(
        "hazard_encryption_key_path {0}: holds an OpenPGP secret (private) key; put only the public key there (gpg --export KEYID): the private key must never be on this host"
    )]
    SecretKey(PathBuf),
    #[error(
        "hazard_encryption_key_path {path}: holds {count} OpenPGP keys; it must hold exactly one public key"
    )]
    Several { path: PathBuf, count: usize },
    #[error("hazard_encryption_key_path {path}: key {fingerprint} is revoked")]
    Revoked { path: PathBuf, fingerprint: String },
    #[error("hazard_encryption_key_path {path}: key {fingerprint} {what} expired on {when}")]
    Expired {
        path: PathBuf,
        fingerprint: String,
        what: &'static str,
        when: String,
    },
    #[error(
        "hazard_encryption_key_path {path}: key {fingerprint} has no usable encryption-capable (sub)key ({why})"
    )]
    NoEncryptionKey {
        path: PathBuf,
        fingerprint: String,
        why: String,
    },
}

/// The (sub)key suspect files are encrypted to.
#[derive(Debug, Clone)]
pub enum EncryptionKey {
    Primary(PublicKey),
    Subkey(PublicSubkey),
}

/// A validated recipient.
#[derive(Debug, Clone)]
pub struct Recipient {
    pub key: EncryptionKey,
    /// Fingerprint of the primary key (what `gpg --list-keys` shows), upper-case hex.
    pub fingerprint: String,
    /// Fingerprint of the (sub)key actually encrypted to.
    pub encryption_fingerprint: String,
    /// e.g. "ECDH", "RSA".
    pub algorithm: String,
    /// When the key or the encryption subkey expires, whichever is first.
    pub expires: Option<SystemTime>,
}

/// Loads `path` and picks the key to encrypt to, as of `now`.
pub fn load(path: &Path, now: SystemTime) -> Result<Recipient, KeyError> {
    let bytes = read_limited(path)?;
    let not_a_key = |reason: String| KeyError::NotAKey {
        path: path.to_path_buf(),
        reason,
    };
    let parsed = parse_public(&bytes);
    if !matches!(&parsed, Ok(k) if !k.is_empty()) && is_secret_key(&bytes) {
        // A secret key gets its own message: putting the private key on the
        // scanning host would defeat the point of encrypting the archive.
        return Err(KeyError::SecretKey(path.to_path_buf()));
    }
    let keys = match parsed {
        Ok(k) if !k.is_empty() => k,
        Ok(_) => return Err(not_a_key("no public key found in the file".into())),
        Err(e) => return Err(not_a_key(e)),
    };
    if keys.len() > 1 {
        return Err(KeyError::Several {
            path: path.to_path_buf(),
            count: keys.len(),
        });
    }
    let Some(key) = keys.into_iter().next() else {
        return Err(not_a_key("no key found in the file".into()));
    };
    select(path, &key, now)
}

fn read_limited(path: &Path) -> Result<Vec<u8>, KeyError> {
    let unreadable = |source| KeyError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyError::Missing(path.to_path_buf()));
        }
        Err(e) => return Err(unreadable(e)),
    };
    let meta = f.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(unreadable(std::io::Error::other("not a regular file")));
    }
    let mut bytes = Vec::new();
    f.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(KeyError::NotAKey {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_KEY_FILE} bytes"),
        });
    }
    Ok(bytes)
}

fn is_secret_key(bytes: &[u8]) -> bool {
    SignedSecretKey::from_reader_single(bytes).is_ok()
}

/// Parses every public key in an armored or binary file.
fn parse_public(bytes: &[u8]) -> Result<Vec<SignedPublicKey>, String> {
    let armored = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .is_some_and(|i| bytes[i..].starts_with(b"-----BEGIN PGP"));
    let keys: Vec<pgp::errors::Result<SignedPublicKey>> = if armored {
        SignedPublicKey::from_armor_many(bytes)
            .map_err(|e| e.to_string())?
            .0
            .collect()
    } else {
        SignedPublicKey::from_bytes_many(bytes)
            .map_err(|e| e.to_string())?
            .collect()
    };
    keys.into_iter()
        .map(|k| k.map_err(|e| e.to_string()))
        .collect()
}

fn secs(t: Timestamp) -> SystemTime {
    t.into()
}

fn fmt_time(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A self-signature counts if it is created in the past and has not itself expired.
fn sig_current(sig: &Signature, now: SystemTime) -> Option<SystemTime> {
    let created = secs(sig.created()?);
    if created > now {
        return None;
    }
    if let Some(d) = sig.signature_expiration_time().map(Duration::from)
        && !d.is_zero()
        && created + d <= now
    {
        return None;
    }
    Some(created)
}

/// The expiry a self-signature gives its key (None: never).
fn key_expiry(key_created: Timestamp, sig: &Signature) -> Option<SystemTime> {
    sig.key_expiration_time()
        .map(Duration::from)
        .filter(|d| !d.is_zero())
        .map(|d| secs(key_created) + d)
}

/// The newest of `sigs` that verifies, per `verify`.
fn newest<'s>(
    sigs: impl Iterator<Item = &'s Signature>,
    now: SystemTime,
    verify: impl Fn(&Signature) -> bool,
) -> Option<&'s Signature> {
    sigs.filter_map(|s| sig_current(s, now).map(|t| (t, s)))
        .filter(|(_, s)| verify(s))
        .max_by_key(|(t, _)| *t)
        .map(|(_, s)| s)
}

fn select(path: &Path, key: &SignedPublicKey, now: SystemTime) -> Result<Recipient, KeyError> {
    let primary = &key.primary_key;
    let fingerprint = format!("{:X}", primary.fingerprint());
    let path = path.to_path_buf();

    if key
        .details
        .revocation_signatures
        .iter()
        .any(|s| s.typ() == Some(SignatureType::KeyRevocation) && s.verify_key(primary).is_ok())
    {
        return Err(KeyError::Revoked { path, fingerprint });
    }

    // The primary key's current self-signature: a direct-key signature or a
    // certification of one of its own user ids, whichever is newest (as GnuPG does).
    let direct = newest(key.details.direct_signatures.iter(), now, |s| {
        s.typ() == Some(SignatureType::Key) && s.verify_key(primary).is_ok()
    });
    let mut self_sig = direct;
    for user in &key.details.users {
        let cert = newest(user.signatures.iter(), now, |s| {
            s.is_certification()
                && s.typ() != Some(SignatureType::CertRevocation)
                && s.verify_certification(primary, Tag::UserId, &user.id)
                    .is_ok()
        });
        if let Some(c) = cert
            && self_sig.is_none_or(|cur| c.created() > cur.created())
        {
            self_sig = Some(c);
        }
    }
    let Some(self_sig) = self_sig else {
        return Err(KeyError::NotAKey {
            path,
            reason: format!("key {fingerprint} carries no valid self-signature"),
        });
    };
    let primary_expires = key_expiry(primary.created_at(), self_sig);
    if let Some(exp) = primary_expires
        && exp <= now
    {
        return Err(KeyError::Expired {
            path,
            fingerprint,
            what: "(primary key)",
            when: fmt_time(exp),
        });
    }

    // Candidates: (created, key, expiry).
    let mut usable: Vec<(SystemTime, EncryptionKey, Option<SystemTime>)> = Vec::new();
    let mut rejected: Vec<String> = Vec::new();
    let mut expired: Option<SystemTime> = None;
    let flags = self_sig.key_flags();
    if (flags.encrypt_comms() || flags.encrypt_storage()) && primary.algorithm().can_encrypt() {
        usable.push((
            secs(primary.created_at()),
            EncryptionKey::Primary(primary.clone()),
            primary_expires,
        ));
    }
    for sub in &key.public_subkeys {
        let sfp = format!("{:X}", sub.key.fingerprint());
        let revoked = sub.signatures.iter().any(|s| {
            s.typ() == Some(SignatureType::SubkeyRevocation)
                && s.verify_subkey_binding(primary, &sub.key).is_ok()
        });
        let binding = newest(sub.signatures.iter(), now, |s| {
            s.typ() == Some(SignatureType::SubkeyBinding)
                && s.verify_subkey_binding(primary, &sub.key).is_ok()
        });
        let Some(binding) = binding else {
            rejected.push(format!("subkey {sfp} has no valid binding signature"));
            continue;
        };
        let f = binding.key_flags();
        if !(f.encrypt_comms() || f.encrypt_storage()) {
            continue;
        }
        if !sub.key.algorithm().can_encrypt() {
            rejected.push(format!(
                "subkey {sfp} is flagged for encryption but uses {:?}",
                sub.key.algorithm()
            ));
            continue;
        }
        if revoked {
            rejected.push(format!("encryption subkey {sfp} is revoked"));
            continue;
        }
        let exp = key_expiry(sub.key.created_at(), binding);
        if let Some(e) = exp
            && e <= now
        {
            rejected.push(format!(
                "encryption subkey {sfp} expired on {}",
                fmt_time(e)
            ));
            expired = expired.max(Some(e));
            continue;
        }
        let exp = match (exp, primary_expires) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        usable.push((
            secs(sub.key.created_at()),
            EncryptionKey::Subkey(sub.key.clone()),
            exp,
        ));
    }
    let Some((_, enc, expires)) = usable.into_iter().max_by_key(|(t, _, _)| *t) else {
        if let Some(when) = expired {
            return Err(KeyError::Expired {
                path,
                fingerprint,
                what: "(its only encryption subkey)",
                when: fmt_time(when),
            });
        }
        let why = if rejected.is_empty() {
            "it can only sign or certify; add an encryption subkey (gpg --quick-add-key FPR cv25519 encr)".to_string()
        } else {
            rejected.join("; ")
        };
        return Err(KeyError::NoEncryptionKey {
            path,
            fingerprint,
            why,
        });
    };
    let (encryption_fingerprint, algorithm) = match &enc {
        EncryptionKey::Primary(k) => (k.fingerprint(), k.algorithm()),
        EncryptionKey::Subkey(k) => (k.fingerprint(), k.algorithm()),
    };
    Ok(Recipient {
        key: enc,
        fingerprint,
        encryption_fingerprint: format!("{encryption_fingerprint:X}"),
        algorithm: format!("{algorithm:?}"),
        expires,
    })
}

impl Recipient {
    /// One line for `shuttle check` and the log.
    pub fn describe(&self) -> String {
        let exp = match self.expires {
            Some(t) => format!("expires {}", fmt_time(t)),
            None => "does not expire".into(),
        };
        format!(
            "key {} (encrypting to {} {}, {exp})",
            self.fingerprint, self.algorithm, self.encryption_fingerprint
        )
    }
}
