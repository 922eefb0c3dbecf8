//! Keyed hashing of client IPs, so that unique counts work without storing any raw IP.
//!
//! The key comes from `IP_HASH_KEY` or from a file under `DATA_DIR`, generated on first start, so
//! the same IP hashes the same way across restarts (uniques stay stable) yet nobody without the key
//! can test a guessed IP against stored hashes.

use std::{
    hash::Hasher,
    io::Write,
    net::{IpAddr, Ipv6Addr},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use siphasher::sip::SipHasher13;

/// File under `DATA_DIR` holding the generated key as 32 hex digits.
pub const KEY_FILE: &str = "ip_hash.key";

/// Hashes IPs with a secret 128-bit key (SipHash-1-3).
#[derive(Clone)]
pub struct IpHasher {
    key: [u8; 16],
}

impl std::fmt::Debug for IpHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IpHasher(<key>)")
    }
}

impl IpHasher {
    /// A hasher with the given key.
    pub fn new(key: [u8; 16]) -> Self {
        Self { key }
    }

    /// Uses `configured`, else the key file under `data_dir`, else generates and persists a new key.
    pub fn load_or_create(data_dir: &Path, configured: Option<[u8; 16]>) -> std::io::Result<Self> {
        if let Some(key) = configured {
            return Ok(Self::new(key));
        }
        let path = data_dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                // Owner-only, as this process writes it: with the key, anyone can test every
                // IPv4 address against the stored hashes. (A key file written by an earlier
                // version was readable by all.)
                if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot make the IP-hash key readable by its owner only");
                }
                let key = decode_key(text.trim()).ok_or_else(|| {
                    std::io::Error::other(format!(
                        "{} is not 32 hex digits; restore it or remove it to start new unique counts",
                        path.display()
                    ))
                })?;
                Ok(Self::new(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)?;
                let key = *uuid::Uuid::new_v4().as_bytes();
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                // Write then rename, so a crash never leaves a half-written key behind.
                let tmp = data_dir.join(format!("{KEY_FILE}.tmp"));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                file.write_all(hex.as_bytes())?;
                file.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(data_dir)?.sync_all()?;
                tracing::info!(path = %path.display(), "generated a new IP-hash key");
                Ok(Self::new(key))
            }
            Err(e) => Err(e),
        }
    }

    /// The hash of `ip`. IPv4 and its IPv6-mapped form hash alike; an IPv6 address hashes as
    /// its /64 network, the block one home or phone gets: its device picks the rest of the
    /// address, and changes it over the day (privacy extensions), so per address one viewer
    /// would count as many unique clickers, and a script on one line as any number.
    pub fn hash(&self, ip: IpAddr) -> u64 {
        let v6: Ipv6Addr = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX)),
        };
        let mut h = SipHasher13::new_with_key(&self.key);
        h.write(&v6.octets());
        h.finish()
    }
}

/// Decodes a key written as 32 hex digits.
pub fn decode_key(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut key = [0u8; 16];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_persists_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let a = IpHasher::load_or_create(dir.path(), None).unwrap().hash(ip);
        let b = IpHasher::load_or_create(dir.path(), None).unwrap().hash(ip);
        assert_eq!(a, b);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(a, IpHasher::load_or_create(other.path(), None).unwrap().hash(ip));
    }

    #[test]
    fn the_key_file_is_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        IpHasher::load_or_create(dir.path(), None).unwrap();
        assert_eq!(mode(&path), 0o600, "generated");
        // A key an earlier version left readable by all is made owner-only at start.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        IpHasher::load_or_create(dir.path(), None).unwrap();
        assert_eq!(mode(&path), 0o600, "tightened");
    }

    #[test]
    fn mapped_v4_hashes_like_v4() {
        let h = IpHasher::new([7; 16]);
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(h.hash(v4), h.hash(mapped));
        assert_ne!(h.hash(v4), h.hash("192.0.2.2".parse().unwrap()));
    }

    #[test]
    fn an_ipv6_address_hashes_as_its_64() {
        let h = IpHasher::new([7; 16]);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(h.hash(ip("2001:db8:1:2::5")), h.hash(ip("2001:db8:1:2:abcd:ef01:2345:6789")));
        assert_ne!(h.hash(ip("2001:db8:1:2::5")), h.hash(ip("2001:db8:1:3::5")));
        // IPv4 addresses (all in ::ffff:0:0/96 when mapped) stay apart from each other.
        assert_ne!(h.hash(ip("192.0.2.1")), h.hash(ip("198.51.100.1")));
        assert_eq!(h.hash(ip("::ffff:192.0.2.1")), h.hash(ip("192.0.2.1")));
    }
}
