//! Fetching vendors' image URLs without letting them reach our network.
//!
//! Every address a host name resolves to is checked before connecting (our
//! resolver refuses loopback, private, link-local, CGNAT, multicast,
//! unspecified, IPv4-mapped and NAT64 addresses), IP-literal hosts are
//! checked too (they never reach a resolver), and so is every redirect, at
//! most three. No proxy is taken from the environment. The body is capped
//! while it streams, whatever Content-Length claims. A configured allow-list
//! of networks admits on-premise image hosts (and tests' local servers).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use image_queue_pipeline::StageError;
use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// Networks (CIDR) admitted even though they are private; empty by default.
    pub allow_networks: Vec<String>,
    pub connect_timeout_ms: u64,
    pub total_timeout_ms: u64,
    /// Largest image fetched, in bytes.
    pub max_bytes: u64,
    pub max_redirects: usize,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            allow_networks: Vec::new(),
            connect_timeout_ms: 5_000,
            total_timeout_ms: 30_000,
            max_bytes: 25 * 1024 * 1024,
            max_redirects: 3,
        }
    }
}

/// Why a fetch configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FetchConfigError {
    #[error("fetch.allow_networks: {network:?} is neither a network nor an address")]
    Network {
        network: String,
        #[source]
        cause: std::net::AddrParseError,
    },
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// Why a URL is never fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    #[error("invalid URL: {0}")]
    Invalid(#[from] url::ParseError),
    #[error("only http and https URLs are fetched, not {0}:")]
    Scheme(String),
    #[error("URLs with credentials are not fetched")]
    Credentials,
    #[error("the URL has no host")]
    NoHost,
    #[error("host not allowed: {ip} is {why}; it is not fetched")]
    Host { ip: IpAddr, why: &'static str },
}

/// A network (`10.0.0.0/8`) or a single address (`10.0.0.7`), as the
/// configuration's address lists take them.
pub fn parse_network(s: &str) -> Result<IpNet, std::net::AddrParseError> {
    s.parse::<IpNet>().or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
}

impl FetchConfig {
    /// The address rules alone: what an API checks before queueing a URL.
    pub fn address_policy(&self) -> Result<AddressPolicy, FetchConfigError> {
        let allow = self
            .allow_networks
            .iter()
            .map(|n| {
                parse_network(n).map_err(|cause| FetchConfigError::Network {
                    network: n.clone(),
                    cause,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AddressPolicy { allow })
    }

    pub fn build(&self) -> Result<Fetcher, FetchConfigError> {
        let policy = Arc::new(self.address_policy()?);
        let redirect_policy = policy.clone();
        let max_redirects = self.max_redirects;
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(CheckedResolver { policy: policy.clone() }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > max_redirects {
                    return attempt.error(format!("more than {max_redirects} redirects"));
                }
                match check_url(attempt.url(), &redirect_policy) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            }))
            .connect_timeout(Duration::from_millis(self.connect_timeout_ms))
            .timeout(Duration::from_millis(self.total_timeout_ms))
            .user_agent(concat!("image-queue/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(FetchConfigError::Client)?;
        Ok(Fetcher {
            client,
            policy,
            max_bytes: self.max_bytes,
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Vec<IpNet>,
}

impl AddressPolicy {
    /// Refuses what can be told of a URL without resolving it: a scheme
    /// other than http(s), credentials, an IP-literal host we never reach.
    /// A host name is checked when it is fetched, against what it resolves
    /// to then.
    pub fn check_url(&self, url: &str) -> Result<(), UrlRefused> {
        let parsed = reqwest::Url::parse(url)?;
        check_url(&parsed, self)
    }

    /// Why an address may not be reached, or `None` if it may.
    pub fn refuse(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return None;
        }
        forbidden_reason(ip)
    }
}

/// Why an address is never a vendor's image host.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4).or(Some("an IPv4-mapped IPv6 address"));
            }
            let seg = v6.segments();
            if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.is_unspecified() {
                Some("the unspecified address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                Some("a unique-local (private) address")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else if seg[0] == 0x64 && seg[1] == 0xff9b {
                Some("a NAT64 address")
            } else if seg[0] == 0 && seg[1] == 0 && seg[2] == 0 && seg[3] == 0 && seg[4] == 0 && seg[5] == 0 {
                Some("an IPv4-compatible IPv6 address")
            } else if seg[0] == 0x2002 {
                Some("a 6to4 address")
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_private() {
        Some("a private address")
    } else if ip.is_link_local() {
        Some("a link-local address (cloud metadata lives there)")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("a carrier-grade NAT address")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("the unspecified network")
    } else if ip.is_multicast() || o[0] >= 240 || ip.is_broadcast() {
        Some("a multicast or reserved address")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("an IETF protocol address")
    } else if (o[0] == 198 && (o[1] & 0xfe) == 18) || (o[0] == 192 && o[1] == 0 && o[2] == 2) {
        Some("a benchmarking or documentation address")
    } else {
        None
    }
}

fn check_url(url: &reqwest::Url, policy: &AddressPolicy) -> Result<(), UrlRefused> {
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(UrlRefused::Scheme(other.to_string())),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlRefused::Credentials);
    }
    let ip = match url.host() {
        None => return Err(UrlRefused::NoHost),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(url::Host::Domain(_)) => return Ok(()),
    };
    match policy.refuse(ip) {
        Some(why) => Err(UrlRefused::Host { ip, why }),
        None => Ok(()),
    }
}

/// Resolves names, then drops every address we may not reach; a name with
/// no reachable address fails, so the connection is never attempted.
struct CheckedResolver {
    policy: Arc<AddressPolicy>,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), 0)).await {
                Ok(addrs) => addrs.collect(),
                // A name that does not exist will not exist on a retry
                // either (unlike a resolver that timed out).
                Err(e) if is_no_such_host(&e) => {
                    return Err(
                        Box::new(ForbiddenAddress(format!("{host} does not resolve (no such host)")))
                            as Box<dyn std::error::Error + Send + Sync>,
                    )
                }
                Err(e) => return Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
            };
            let mut refused = false;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match policy.refuse(a.ip()) {
                    Some(why) => {
                        // What a name resolves to is ours to know, not the
                        // caller's: an internal address is logged, never
                        // put in the error a vendor reads.
                        tracing::debug!(host, address = %a.ip(), why, "refused a resolved address");
                        refused = true;
                        false
                    }
                    None => true,
                })
                .collect();
            if allowed.is_empty() {
                let msg = if refused {
                    format!("host not allowed: {host} is not fetched")
                } else {
                    format!("{host} has no address")
                };
                return Err(Box::new(ForbiddenAddress(msg)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Whether a lookup failed because the name does not exist (`EAI_NONAME`,
/// `EAI_NODATA`), as opposed to a resolver fault worth retrying.
fn is_no_such_host(e: &std::io::Error) -> bool {
    let text = e.to_string();
    [
        "Name or service not known",
        "No address associated with hostname",
        "nodename nor servname provided",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// A permanent refusal to fetch: a forbidden address, or a host that does
/// not exist.
#[derive(Debug)]
struct ForbiddenAddress(String);

impl std::fmt::Display for ForbiddenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ForbiddenAddress {}

pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    max_bytes: u64,
}

impl Fetcher {
    /// Fetches an image URL. Refusals and 4xx are permanent; network
    /// faults, timeouts and 5xx are worth retrying.
    pub async fn fetch(&self, url: &str) -> Result<Bytes, StageError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| StageError::permanent(format!("invalid URL: {e}")))?;
        check_url(&parsed, &self.policy).map_err(|e| StageError::permanent(e.to_string()))?;
        let resp = self.client.get(parsed).send().await.map_err(classify)?;
        let status = resp.status();
        if status.is_redirection() {
            // A redirect still here is one the client would not follow (to a
            // scheme other than http(s), or without a usable Location):
            // asking again will not change where it points.
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("nowhere");
            return Err(StageError::permanent(format!(
                "fetching the image: HTTP {status}, a redirect to {to:.200} that is not followed"
            )));
        }
        if status.is_client_error() {
            return Err(StageError::permanent(format!("fetching the image: HTTP {status}")));
        }
        if !status.is_success() {
            return Err(StageError::retryable(format!("fetching the image: HTTP {status}")));
        }
        if resp.content_length().is_some_and(|n| n > self.max_bytes) {
            return Err(StageError::permanent(format!(
                "the image is larger than {} bytes",
                self.max_bytes
            )));
        }
        let mut body = BytesMut::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(classify)?;
            if body.len() as u64 + chunk.len() as u64 > self.max_bytes {
                return Err(StageError::permanent(format!(
                    "the image is larger than {} bytes",
                    self.max_bytes
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }
}

impl Fetcher {
    /// POSTs a body to a vendor's URL (a webhook) under the same address
    /// rules as fetching. Answers the status once the receiver took it (2xx);
    /// 408, 429 and 5xx are worth retrying (with the receiver's
    /// `Retry-After`), other answers are permanent.
    pub async fn post(&self, url: &str, headers: reqwest::header::HeaderMap, body: Vec<u8>) -> Result<u16, StageError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| StageError::permanent(format!("invalid URL: {e}")))?;
        check_url(&parsed, &self.policy).map_err(|e| StageError::permanent(e.to_string()))?;
        let resp = self
            .client
            .post(parsed)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(classify)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(status.as_u16());
        }
        let retry_after = retry_after(resp.headers());
        let text = format!("HTTP {status}");
        let code = status.as_u16();
        let err = if code == 408 || code == 429 || status.is_server_error() {
            StageError::retryable(text)
        } else {
            StageError::permanent(text)
        };
        Err(match retry_after {
            Some(after) => err.with_retry_after(after),
            None => err,
        })
    }
}

/// A server's `Retry-After`, when given in seconds.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Retryable unless the fault is our refusal to connect or a bad redirect.
fn classify(e: reqwest::Error) -> StageError {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    let refused = e.is_redirect() || e.is_builder();
    while let Some(s) = source {
        if let Some(f) = s.downcast_ref::<ForbiddenAddress>() {
            // Our own refusal says all there is to say; the layers around
            // it would only repeat the resolver's view.
            return StageError::permanent(format!("fetching the image: {f}"));
        }
        text = format!("{text}: {s}");
        source = s.source();
    }
    if refused || text.contains("is not fetched") {
        StageError::permanent(format!("fetching the image: {text}"))
    } else {
        StageError::retryable(format!("fetching the image: {text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_host_that_does_not_resolve_is_a_permanent_error() {
        let f = FetchConfig::default().build().unwrap();
        let e = f.fetch("http://no-such-host.invalid/a.png").await.unwrap_err();
        assert!(!e.is_retryable(), "{e:?}");
        assert!(e.message.contains("no such host"), "{}", e.message);
    }

    #[test]
    fn hostile_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "fc00::1",
            "fe80::1",
            "64:ff9b::7f00:1",
            "ff02::1",
        ] {
            assert!(forbidden_reason(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"] {
            assert!(forbidden_reason(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }
}
