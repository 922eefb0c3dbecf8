//! An ad in the catalog.

use time::OffsetDateTime;
use uuid::Uuid;

/// One ad as the catalog holds it (the newest version).
#[derive(Debug, Clone, PartialEq)]
pub struct Ad {
    /// Stable id, used in every event.
    pub id: Uuid,
    /// Human name, 1–200 characters.
    pub name: String,
    /// The creative: a URL or a path.
    pub video_url: String,
    /// Where a click-through leads.
    pub target_url: String,
    /// Inactive ads leave `GET /ads` but their events still count.
    pub active: bool,
    /// When the ad was created.
    pub created_at: OffsetDateTime,
    /// When the ad last changed.
    pub updated_at: OffsetDateTime,
    /// Increases with every change; the highest wins.
    pub version: u64,
}

/// The longest URL an ad may hold: 2,048 characters, as browsers and CDNs take everywhere. A
/// longer `target_url` would make the click-through's `Location` header outgrow a proxy's
/// header buffer (nginx's is 4 to 8 KiB by default: a 502 for every click).
pub const MAX_URL_LEN: usize = 2048;

/// An absolute http(s) URL with a host, no user name or password, at most [`MAX_URL_LEN`]
/// characters and no spaces or control characters: what an ad's `target_url` must be, since the
/// click-through redirects there (`https://www.shop.com@evil.example/` names the host
/// evil.example: a viewer reading the ad's URL would be misled). Its host and port as HTTP reads
/// them, checked when an ad is written; the click-through checks the stored URL with
/// [`is_sent_url`], the check before this one, so that an ad stored then keeps redirecting.
pub fn is_http_url(url: &str) -> bool {
    is_sent_url(url) && authority(url).is_some_and(authority_ok)
}

/// The check of a stored `target_url` before the click-through redirects to it: an absolute
/// http(s) URL with a host, no user name, at most [`MAX_URL_LEN`] characters, no spaces or
/// control characters.
pub fn is_sent_url(url: &str) -> bool {
    let Some(authority) = authority(url) else {
        return false;
    };
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    !host.is_empty()
        && !authority.contains('@')
        && url.len() <= MAX_URL_LEN
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The authority of an http(s) URL: what lies between the scheme and the path.
fn authority(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    rest.split(['/', '?', '#']).next()
}

/// A host as HTTP reads it (a name of the characters a URI allows, or an IPv6 address in
/// brackets and nothing else in brackets), then nothing or a port: `:` and at most five ASCII
/// digits, 1 to 65535 (or none: an empty port means the scheme's).
fn authority_ok(authority: &str) -> bool {
    let (host, rest) = match authority.strip_prefix('[') {
        Some(inner) => match inner.split_once(']') {
            Some((address, rest)) if address.parse::<std::net::Ipv6Addr>().is_ok() => (address, rest),
            _ => return false,
        },
        None => match authority.find(':') {
            Some(at) => authority.split_at(at),
            None => (authority, ""),
        },
    };
    let port_ok = match rest.strip_prefix(':') {
        Some("") => true,
        Some(port) => {
            port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => rest.is_empty(),
    };
    !host.is_empty()
        && !host.contains(['[', ']'])
        && port_ok
        && authority.parse::<poem::http::uri::Authority>().is_ok()
}

/// The three demo ads of the service adbeacon replaces, seeded into an empty catalog.
pub fn demo_ads(now: OffsetDateTime) -> Vec<Ad> {
    let ad = |id: &str, name: &str, slug: &str| Ad {
        id: Uuid::parse_str(id).expect("static id"),
        name: name.to_string(),
        video_url: format!("https://cdn.example.com/videos/{slug}.mp4"),
        target_url: format!("https://www.example.com/{slug}"),
        active: true,
        created_at: now,
        updated_at: now,
        version: 1,
    };
    vec![
        ad("11111111-1111-1111-1111-111111111111", "Summer Sale", "summer-sale"),
        ad("22222222-2222-2222-2222-222222222222", "New Phone Launch", "new-phone"),
        ad("33333333-3333-3333-3333-333333333333", "Travel Deals", "travel-deals"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absolute_http_urls_pass() {
        for good in [
            "https://example.com/x?y=1",
            "http://example.com",
            "https://example.com:8443/x",
            "https://[2001:db8::1]:8080/x",
            "https://example.com/a@b?c=d@e",
            "https://example.com:65535",
            "https://example.com/søg?q=ü",
            "https://x:/",
            "https://[::1]/",
            "https://example.com:080/x",
        ] {
            assert!(is_http_url(good), "{good}");
        }
        // Stored before the host and port were checked as HTTP reads them: refused now, and still
        // redirected to.
        for stored in ["https://www.müller.de/x", "https://[::1", "https://x:99999999999999999999"] {
            assert!(!is_http_url(stored) && is_sent_url(stored), "{stored}");
        }
        let long = format!("https://example.com/{}", "x".repeat(MAX_URL_LEN));
        for bad in [
            "javascript:alert(1)",
            "//evil.example",
            "/local",
            "https://",
            "https:///x",
            "https://a b",
            "ftp://a",
            "https://user:pass@evil.example/",
            "https://www.shop.com@evil.example/",
            "https://@",
            "https://:",
            "https://:443/x",
            "https://[::1",
            "https://[::1/x",
            "https://ex\"ample/",
            "https://x:99999999999999999999",
            "https://x:65536/",
            "https://x:0/",
            "https://ex<ample>/",
            "https://[]/",
            "https://[evil]/",
            "https://[::1]junk/",
            "https://[::1]x:99999/",
            "https://a[b]c/",
            "https://x:+80/",
            "https://[fe80::1%25eth0]/",
            "https://www.müller.de/x",
            &long,
        ] {
            assert!(!is_http_url(bad), "{bad}");
        }
    }
}
