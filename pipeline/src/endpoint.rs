//! Where Redis is: one node, a primary watched by Sentinels, or a Redis
//! Cluster, parsed from the one URL every process is given. This module
//! only reads URLs; connecting is `connection.rs`'s job.
//!
//! - `redis://[user:password@]host:port[/db]` (and `unix://`): one node.
//! - `redis+sentinel://[user:password@]s1:26379,s2:26379,s3:26379/mymaster[/db]
//!   [?sentinel_username=u&sentinel_password=p]`: the primary the Sentinels
//!   name `mymaster`. The credentials before `@` are the data nodes';
//!   the Sentinels' own come as query parameters (often they have none).
//! - `redis+cluster://[user:password@]n1:7000,n2:7001[,…]`: a Redis Cluster
//!   reached through any of the seed nodes.

use std::fmt;

/// A parsed Redis location.
#[derive(Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// One node; the URL as given, which redis-rs reads itself.
    Single(String),
    Sentinel(SentinelEndpoint),
    Cluster(ClusterEndpoint),
}

#[derive(Clone, PartialEq, Eq)]
pub struct SentinelEndpoint {
    pub sentinels: Vec<HostPort>,
    /// The name the Sentinels monitor the primary under.
    pub service: String,
    pub db: i64,
    /// The data nodes' `user:password`, still percent-encoded as given.
    node_auth: Option<String>,
    /// The Sentinels' own `user:password`, percent-encoded.
    sentinel_auth: Option<String>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct ClusterEndpoint {
    pub seeds: Vec<HostPort>,
    node_auth: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error("a {scheme} URL needs at least one host:port before the path")]
    NoHosts { scheme: &'static str },
    #[error("`{0}` is not a host:port")]
    BadHost(String),
    #[error("a Sentinel URL names the monitored primary after the hosts: redis+sentinel://h1:26379,h2:26379/mymaster")]
    NoService,
    #[error("`{0}` is not a database number")]
    BadDb(String),
    #[error("unknown query parameter `{0}` (a Sentinel URL takes sentinel_username and sentinel_password)")]
    UnknownParameter(String),
    #[error("a cluster has no numbered databases: drop the path after the hosts")]
    ClusterDb,
}

const SENTINEL_SCHEME: &str = "redis+sentinel://";
const CLUSTER_SCHEME: &str = "redis+cluster://";

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, EndpointError> {
        if let Some(rest) = url.strip_prefix(SENTINEL_SCHEME) {
            return parse_sentinel(rest).map(Endpoint::Sentinel);
        }
        if let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) {
            let (auth, hosts, path, query) = split(rest);
            if !query.is_empty() {
                return Err(EndpointError::UnknownParameter(query.to_string()));
            }
            if !path.trim_matches('/').is_empty() {
                return Err(EndpointError::ClusterDb);
            }
            return Ok(Endpoint::Cluster(ClusterEndpoint {
                seeds: hosts_of(hosts, 6379, "redis+cluster")?,
                node_auth: auth,
            }));
        }
        Ok(Endpoint::Single(url.to_string()))
    }
}

fn parse_sentinel(rest: &str) -> Result<SentinelEndpoint, EndpointError> {
    let (node_auth, hosts, path, query) = split(rest);
    let sentinels = hosts_of(hosts, 26379, "redis+sentinel")?;
    let mut parts = path.trim_start_matches('/').split('/');
    let service = parts.next().filter(|s| !s.is_empty()).ok_or(EndpointError::NoService)?;
    let db = match parts.next().filter(|s| !s.is_empty()) {
        Some(d) => d.parse().map_err(|_| EndpointError::BadDb(d.to_string()))?,
        None => 0,
    };
    let (mut user, mut password) = (String::new(), None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sentinel_username" => user = v.to_string(),
            "sentinel_password" => password = Some(v.to_string()),
            other => return Err(EndpointError::UnknownParameter(other.to_string())),
        }
    }
    let sentinel_auth = match (user.is_empty(), password) {
        (true, None) => None,
        (_, p) => Some(format!("{user}:{}", p.unwrap_or_default())),
    };
    Ok(SentinelEndpoint {
        sentinels,
        service: service.to_string(),
        db,
        node_auth,
        sentinel_auth,
    })
}

/// `auth@hosts/path?query` into its parts; the last `@` before the path
/// ends the credentials (a password may hold `@` only percent-encoded,
/// but be lenient).
fn split(rest: &str) -> (Option<String>, &str, &str, &str) {
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path_at = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(path_at);
    match authority.rsplit_once('@') {
        Some((auth, hosts)) => (Some(auth.to_string()), hosts, path, query),
        None => (None, authority, path, query),
    }
}

fn hosts_of(hosts: &str, default_port: u16, scheme: &'static str) -> Result<Vec<HostPort>, EndpointError> {
    let list: Vec<HostPort> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            let (host, port) = match h.rsplit_once(':') {
                Some((host, port)) if !host.ends_with(':') => {
                    (host, port.parse().map_err(|_| EndpointError::BadHost(h.to_string()))?)
                }
                _ => (h, default_port),
            };
            if host.is_empty() {
                return Err(EndpointError::BadHost(h.to_string()));
            }
            Ok(HostPort {
                host: host.to_string(),
                port,
            })
        })
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err(EndpointError::NoHosts { scheme });
    }
    Ok(list)
}

fn node_url(auth: &Option<String>, at: &HostPort, db: i64) -> String {
    let host = if at.host.contains(':') && !at.host.starts_with('[') {
        format!("[{}]", at.host)
    } else {
        at.host.clone()
    };
    match auth {
        Some(a) => format!("redis://{a}@{host}:{}/{db}", at.port),
        None => format!("redis://{host}:{}/{db}", at.port),
    }
}

impl SentinelEndpoint {
    /// The URL of one Sentinel, with the Sentinels' credentials.
    pub(crate) fn sentinel_url(&self, at: &HostPort) -> String {
        // A Sentinel has no databases.
        node_url(&self.sentinel_auth, at, 0)
    }

    /// The URL of a data node (the primary once resolved), with the data
    /// nodes' credentials and database.
    pub(crate) fn node_url(&self, at: &HostPort) -> String {
        node_url(&self.node_auth, at, self.db)
    }
}

impl ClusterEndpoint {
    pub(crate) fn seed_urls(&self) -> Vec<String> {
        self.seeds.iter().map(|s| node_url(&self.node_auth, s, 0)).collect()
    }
}

/// Never prints credentials: the URL is shown with its hosts only.
impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts = |list: &[HostPort]| {
            list.iter()
                .map(|h| format!("{}:{}", h.host, h.port))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Endpoint::Single(url) => match redis::parse_redis_url(url) {
                Some(u) => write!(f, "{}", u.host_str().unwrap_or("a unix socket")),
                None => write!(f, "an unparsable Redis URL"),
            },
            Endpoint::Sentinel(s) => write!(f, "Sentinels {} (primary `{}`)", hosts(&s.sentinels), s.service),
            Endpoint::Cluster(c) => write!(f, "cluster seeds {}", hosts(&c.seeds)),
        }
    }
}

/// `url` with every password in it replaced by `mask` (the userinfo's
/// and any `…password=` query parameter), or `None` when it holds none.
/// Works on the text, so it also masks URLs a URL parser refuses, such as
/// a Sentinel or cluster URL with several hosts.
pub fn mask_passwords(url: &str, mask: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let authority_end = before_query.find('/').unwrap_or(before_query.len());
    let (authority, path) = before_query.split_at(authority_end);
    let mut changed = false;
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _password)) => {
                changed = true;
                format!("{user}:{mask}@{hosts}")
            }
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let query = query.map(|q| {
        q.split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if k.to_ascii_lowercase().contains("password") && !v.is_empty() => {
                    changed = true;
                    format!("{k}={mask}")
                }
                _ => pair.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    changed.then(|| match query {
        Some(q) => format!("{scheme}://{authority}{path}?{q}"),
        None => format!("{scheme}://{authority}{path}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn a_sentinel_url_names_sentinels_service_db_and_both_credentials() {
        let e = Endpoint::parse("redis+sentinel://:node%40pw@s1:26379,s2,s3:26380/mymaster/2?sentinel_password=sp")
            .unwrap();
        let Endpoint::Sentinel(s) = e else {
            panic!("not a sentinel endpoint")
        };
        assert_eq!(s.sentinels, vec![hp("s1", 26379), hp("s2", 26379), hp("s3", 26380)]);
        assert_eq!(s.service, "mymaster");
        assert_eq!(s.db, 2);
        assert_eq!(s.node_url(&hp("10.0.0.5", 6379)), "redis://:node%40pw@10.0.0.5:6379/2");
        assert_eq!(s.sentinel_url(&s.sentinels[1]), "redis://:sp@s2:26379/0");
    }

    #[test]
    fn a_sentinel_url_without_credentials_or_service() {
        let Endpoint::Sentinel(s) = Endpoint::parse("redis+sentinel://a:1,b:2/m").unwrap() else {
            panic!()
        };
        assert_eq!(s.sentinel_url(&s.sentinels[0]), "redis://a:1/0");
        assert_eq!(s.node_url(&hp("p", 7)), "redis://p:7/0");
        assert_eq!(
            Endpoint::parse("redis+sentinel://a:1,b:2"),
            Err(EndpointError::NoService)
        );
        assert_eq!(
            Endpoint::parse("redis+sentinel:///m"),
            Err(EndpointError::NoHosts {
                scheme: "redis+sentinel"
            })
        );
        assert_eq!(
            Endpoint::parse("redis+sentinel://a:x/m"),
            Err(EndpointError::BadHost("a:x".into()))
        );
        assert_eq!(
            Endpoint::parse("redis+sentinel://a/m?password=x"),
            Err(EndpointError::UnknownParameter("password".into()))
        );
    }

    #[test]
    fn a_cluster_url_lists_its_seeds() {
        let Endpoint::Cluster(c) = Endpoint::parse("redis+cluster://u:p@n1:7000,n2:7001/").unwrap() else {
            panic!()
        };
        assert_eq!(c.seed_urls(), vec!["redis://u:p@n1:7000/0", "redis://u:p@n2:7001/0"]);
        assert_eq!(
            Endpoint::parse("redis+cluster://n1:7000/3"),
            Err(EndpointError::ClusterDb)
        );
    }

    #[test]
    fn printing_an_endpoint_never_shows_a_password() {
        for url in [
            "redis://:secret-1@h:6379/0",
            "redis+sentinel://:secret-1@s1,s2/m?sentinel_password=secret-1",
            "redis+cluster://u:secret-1@n1:7000",
        ] {
            let e = Endpoint::parse(url).unwrap();
            assert!(!format!("{e} {e:?}").contains("secret-1"), "{e}");
        }
        assert_eq!(
            Endpoint::parse("redis://x").unwrap(),
            Endpoint::Single("redis://x".into())
        );
    }

    #[test]
    fn passwords_are_masked_in_urls_a_parser_refuses() {
        assert_eq!(
            mask_passwords(
                "redis+sentinel://:pw@s1:26379,s2:26379/m/0?sentinel_username=u&sentinel_password=sp",
                "***"
            )
            .as_deref(),
            Some("redis+sentinel://:***@s1:26379,s2:26379/m/0?sentinel_username=u&sentinel_password=***")
        );
        assert_eq!(
            mask_passwords("redis+cluster://u:p@w@n1:7000,n2:7001", "***").as_deref(),
            Some("redis+cluster://u:***@n1:7000,n2:7001")
        );
        assert_eq!(mask_passwords("redis://h:6379/0", "***"), None);
        assert_eq!(mask_passwords("redis://user@h:6379/0", "***"), None);
        assert_eq!(mask_passwords("not a url", "***"), None);
    }
}
