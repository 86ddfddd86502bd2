//! The integrity digest of a message's raw bytes, the `raw_digest` column: what proves that a body
//! read back (from the bodies file, a backup, a `store copy`) is the one that was stored.
//!
//! Rows written now carry `xxh3-128:<32 hex digits>`; rows written before migration
//! `0010_raw_digest` carry a bare SHA-256 in 64 hex digits and are still checked as such.
//!
//! Why not SHA-256 any more: the digest guards against damage (a torn or truncated file, a bodies
//! file restored beside the wrong database), not against an adversary, who could rewrite the
//! column as easily as the file. XXH3-128 detects such damage as surely and ran at ~20 times
//! the speed of SHA-256 on this machine's SHA extensions, where SHA-256 was 9-10% of an IMAP
//! sync's CPU time (bench/README.md, session 14).

use xxhash_rust::xxh3::xxh3_128;

/// The algorithm tag of the digests written now.
const XXH3_128: &str = "xxh3-128:";

/// A body's digest, taken before the transaction that stores it (off the writer's thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyDigest(u128);

impl BodyDigest {
    /// The digest of `raw`.
    pub(crate) fn of(raw: &[u8]) -> BodyDigest {
        BodyDigest(xxh3_128(raw))
    }

    /// The column's text for this digest.
    pub(crate) fn to_column(self) -> String {
        format!("{XXH3_128}{:032x}", self.0)
    }
}

/// Whether `raw` matches the stored digest `column`; `Err` names a digest this version cannot
/// read (a row written by a newer version, or a damaged column).
pub(crate) fn matches(raw: &[u8], column: &str) -> Result<bool, String> {
    if let Some(hex) = column.strip_prefix(XXH3_128) {
        return match u128::from_str_radix(hex, 16) {
            Ok(want) if is_hex(hex, 32) => Ok(BodyDigest::of(raw).0 == want),
            _ => Err(format!("a malformed XXH3-128 digest {column:?}")),
        };
    }
    if is_hex(column, 64) {
        use sha2::Digest;
        return Ok(hex::encode(sha2::Sha256::digest(raw)).eq_ignore_ascii_case(column));
    }
    Err(format!("an unknown digest {column:?}"))
}

/// Whether `s` is exactly `len` hex digits (`from_str_radix` alone would take a leading `+`).
fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_written_now_checks_its_own_bytes_and_no_others() {
        let column = BodyDigest::of(b"hello").to_column();
        assert!(column.starts_with("xxh3-128:"));
        assert_eq!(column.len(), "xxh3-128:".len() + 32);
        assert_eq!(matches(b"hello", &column), Ok(true));
        assert_eq!(matches(b"hellp", &column), Ok(false));
        assert_eq!(matches(b"", &column), Ok(false));
    }

    #[test]
    fn the_digest_is_xxh3_128_of_the_bytes() {
        // XXH3-128 of the empty input, from the reference implementation (xxhsum -H2)
        assert_eq!(
            BodyDigest::of(b"").to_column(),
            "xxh3-128:99aa06d3014798d86001c324468d497f"
        );
    }

    #[test]
    fn a_sha256_written_before_the_change_still_checks() {
        // SHA-256("abc"), FIPS 180-2's example
        let old = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(matches(b"abc", old), Ok(true));
        assert_eq!(matches(b"abc", &old.to_uppercase()), Ok(true));
        assert_eq!(matches(b"abd", old), Ok(false));
    }

    #[test]
    fn an_unreadable_digest_is_an_error_not_a_mismatch() {
        for column in [
            "",
            "md5:900150983cd24fb0d6963f7d28e17f72",
            "xxh3-128:zz",
            "xxh3-128:99aa06d3014798d86001c324468d497",
            "xxh3-128:+9aa06d3014798d86001c324468d497f",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015",
        ] {
            assert!(matches(b"abc", column).is_err(), "{column:?}");
        }
    }
}
