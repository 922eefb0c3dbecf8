//! Which address an event is counted for: uniques, rate limits and the repeat rule.
//!
//! The TCP peer, unless it is a proxy listed in `TRUSTED_PROXIES`: then `X-Forwarded-For` (read
//! from the right, skipping trusted proxies, so that a client cannot slip an address in front)
//! or else `X-Real-IP`. An address the caller states itself (the click body's `ipAddress`, the
//! `X-Device-IP` header of server-side ad insertion) counts only for a caller whose API key has
//! the `ingest` scope; from anyone else, and always while API_KEYS is empty, it is ignored, since
//! it would let anyone forge unique counts.

use std::net::IpAddr;

use poem::{
    Request,
    http::{HeaderMap, HeaderName},
};

// Constants rather than strings: a look-up by `&str` parses the name again on every request.
/// `X-Forwarded-For`, believed from trusted proxies only.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Real-IP`, believed from trusted proxies only.
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `X-Device-IP`: the viewer's address, as a server-side caller (ingest scope) states it.
pub(crate) const X_DEVICE_IP: HeaderName = HeaderName::from_static("x-device-ip");
/// `X-Device-User-Agent`: the viewer's user agent, as a server-side caller states it.
pub(crate) const X_DEVICE_USER_AGENT: HeaderName = HeaderName::from_static("x-device-user-agent");

/// An address block such as `10.0.0.0/8` or `2001:db8::/32` (a lone address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a lone address.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr =
            addr.trim().parse().map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has a prefix length other than 0 to {max}"))?,
        };
        // An IPv4-mapped block (`::ffff:10.0.0.0/104`) is the IPv4 block it maps: addresses are
        // compared as IPv4 when they are mapped ([`Cidr::contains`]).
        if let IpAddr::V6(v6) = network
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix >= 96
        {
            return Ok(Self { network: IpAddr::V4(v4), prefix: prefix - 96 });
        }
        Ok(Self { network, prefix })
    }

    /// Whether `ip` lies in the block (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The proxies whose forwarding headers are believed (`TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Parses a comma-separated list of CIDR blocks; empty trusts no proxy.
    pub fn parse(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(Cidr::parse)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client behind `peer`: the peer itself unless it is a trusted proxy.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        // Split as bytes: a client's entry that is not UTF-8 must not make the whole header, the
        // addresses the proxies appended included, go unread (and X-Real-IP, which the client
        // may have set itself, count instead).
        let entries: Vec<&[u8]> = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .collect();
        // From the right: each trusted proxy appended the address it saw, so the last address no
        // trusted proxy vouches for is the client. Anything left of an entry that does not parse
        // was written by someone unknown and is not believed.
        let mut leftmost_trusted = None;
        for entry in entries.iter().rev() {
            match forwarded_ip(entry) {
                Some(addr) if self.trusts(addr) => leftmost_trusted = Some(addr),
                Some(addr) => return addr,
                None => return leftmost_trusted.unwrap_or(peer),
            }
        }
        if let Some(addr) = leftmost_trusted {
            return addr;
        }
        // X-Real-IP only from a proxy that sends no X-Forwarded-For at all.
        if entries.is_empty() { header_ip(headers, &X_REAL_IP).unwrap_or(peer) } else { peer }
    }
}

/// An `X-Forwarded-For` entry's address: a bare address, or one with a port as some load
/// balancers write it (`192.0.2.1:5678`, `[2001:db8::1]:5678`, `[2001:db8::1]`).
fn forwarded_ip(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    let port_ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let bare = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        return bare.then(|| inside.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)).flatten();
    }
    let (host, port) = text.split_once(':')?;
    port_ok(port).then(|| host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)).flatten()
}

/// True for an address that names no one viewer: unspecified (`0.0.0.0`, `::`), loopback,
/// multicast or broadcast, the placeholders an ad server may send for a viewer it does not
/// know. Taken as a viewer's, it would make every such viewer one (one unique click, each
/// other's repeats).
pub fn is_placeholder(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// The address in header `name`, if it holds exactly one that parses.
pub(crate) fn header_ip(headers: &HeaderMap, name: &HeaderName) -> Option<IpAddr> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// The viewer's address an ingest caller states in `X-Device-IP`, unless it is a placeholder
/// ([`is_placeholder`]).
pub(crate) fn device_ip(headers: &HeaderMap) -> Option<IpAddr> {
    header_ip(headers, &X_DEVICE_IP).filter(|ip| !is_placeholder(*ip))
}

/// The address an event from `req` counts for; `stated` is an address the request body claims
/// (placeholders already left out), believed (like `X-Device-IP`) only when `ingest` says the
/// caller's key has the ingest scope.
pub fn resolve(req: &Request, proxies: &TrustedProxies, ingest: bool, stated: Option<IpAddr>) -> IpAddr {
    let headers = req.headers();
    if ingest && let Some(claim) = device_ip(headers).or(stated) {
        return claim;
    }
    let peer = req
        .remote_addr()
        .as_socket_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED));
    proxies.client(peer, headers)
}

#[cfg(test)]
mod tests {
    use poem::http::HeaderValue;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_contain_what_they_should() {
        let b = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(b.contains(ip("10.1.200.3")) && !b.contains(ip("10.2.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("::ffff:127.0.0.1")));
        assert!(Cidr::parse("2001:db8::/32").unwrap().contains(ip("2001:db8:1::5")));
        assert!(Cidr::parse("10.0.0.0/33").is_err() && Cidr::parse("proxy").is_err());
        // An IPv4-mapped block holds the IPv4 addresses it maps, mapped or not.
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert!(mapped.contains(ip("10.9.8.7")) && mapped.contains(ip("::ffff:10.9.8.7")));
        assert!(!mapped.contains(ip("11.0.0.1")));
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let proxies = TrustedProxies::parse("10.0.0.0/8").unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4, 198.51.100.9, 10.0.0.7"));
        // From a trusted proxy: the rightmost address it does not vouch for.
        assert_eq!(proxies.client(ip("10.0.0.1"), &h), ip("198.51.100.9"));
        // From anyone else: the peer, whatever the header says.
        assert_eq!(proxies.client(ip("203.0.113.5"), &h), ip("203.0.113.5"));
        let mut real = HeaderMap::new();
        real.insert("x-real-ip", HeaderValue::from_static("192.0.2.44"));
        assert_eq!(proxies.client(ip("10.0.0.1"), &real), ip("192.0.2.44"));
        assert_eq!(proxies.client(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
        // Garbage after a forged address does not make the forged one count.
        let mut junk = HeaderMap::new();
        junk.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6, unknown, 10.0.0.9"));
        assert_eq!(proxies.client(ip("10.0.0.1"), &junk), ip("10.0.0.9"));
        // Only trusted hops: the first of them.
        let mut hops = HeaderMap::new();
        hops.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.3, 10.0.0.9"));
        assert_eq!(proxies.client(ip("10.0.0.1"), &hops), ip("10.0.0.3"));
        // A client's entry that is not UTF-8 does not hide what the proxy appended, nor make a
        // client's own X-Real-IP count.
        let mut bytes = HeaderMap::new();
        bytes.insert("x-forwarded-for", HeaderValue::from_bytes(b"\xff, 203.0.113.5").unwrap());
        bytes.insert("x-real-ip", HeaderValue::from_static("198.51.100.77"));
        assert_eq!(proxies.client(ip("10.0.0.1"), &bytes), ip("203.0.113.5"));
        let mut only_junk = HeaderMap::new();
        only_junk.insert("x-forwarded-for", HeaderValue::from_bytes(b"\xff").unwrap());
        only_junk.insert("x-real-ip", HeaderValue::from_static("198.51.100.77"));
        assert_eq!(proxies.client(ip("10.0.0.1"), &only_junk), ip("10.0.0.1"));
        // Entries with ports.
        for (entry, want) in [
            ("192.0.2.1:5678", "192.0.2.1"),
            ("[2001:db8::1]:5678", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", HeaderValue::from_str(&format!("{entry}, 10.0.0.9")).unwrap());
            assert_eq!(proxies.client(ip("10.0.0.1"), &h), ip(want), "{entry}");
        }
        for bad in ["192.0.2.1:", "192.0.2.1:x", "[2001:db8::1", "[2001:db8::1]x", "2001:db8::1:99999"] {
            assert_eq!(forwarded_ip(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn placeholders_name_no_viewer() {
        for p in [
            "0.0.0.0",
            "::",
            "127.0.0.1",
            "::1",
            "255.255.255.255",
            "224.0.0.1",
            "ff02::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_placeholder(ip(p)), "{p}");
        }
        for real in ["192.0.2.1", "2001:db8::1", "10.1.2.3"] {
            assert!(!is_placeholder(ip(real)), "{real}");
        }
    }
}
