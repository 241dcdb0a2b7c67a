//! Names on the wire: protocol versions and stream headers, as upstream spells them.

/// `Upgrade:` value for SPDY.
pub const SPDY_31: &str = "SPDY/3.1";
/// Request and response header carrying the negotiated sub-protocol.
pub const HEADER_PROTOCOL_VERSION: &str = "X-Stream-Protocol-Version";
/// Response header listing the server's sub-protocols when negotiation fails.
pub const HEADER_ACCEPTED_PROTOCOL_VERSIONS: &str = "X-Accepted-Stream-Protocol-Versions";

/// remotecommand: the error stream carries a `metav1.Status` JSON; adds nothing else over v3.
pub const STREAM_PROTOCOL_V4: &str = "v4.channel.k8s.io";
/// remotecommand: adds the resize stream.
pub const STREAM_PROTOCOL_V3: &str = "v3.channel.k8s.io";
/// remotecommand: streams are waited for per the request's flags.
pub const STREAM_PROTOCOL_V2: &str = "v2.channel.k8s.io";
/// remotecommand: the original protocol (also chosen when a client negotiates nothing).
pub const STREAM_PROTOCOL_V1: &str = "channel.k8s.io";
/// portforward over SPDY.
pub const PORT_FORWARD_V1: &str = "portforward.k8s.io";

/// Every remotecommand protocol, most preferred first.
pub const REMOTECOMMAND_PROTOCOLS: &[&str] = &[
    STREAM_PROTOCOL_V4,
    STREAM_PROTOCOL_V3,
    STREAM_PROTOCOL_V2,
    STREAM_PROTOCOL_V1,
];

/// Stream header naming a stream's role.
pub const HEADER_STREAM_TYPE: &str = "streamType";
pub const STREAM_TYPE_ERROR: &str = "error";
pub const STREAM_TYPE_STDIN: &str = "stdin";
pub const STREAM_TYPE_STDOUT: &str = "stdout";
pub const STREAM_TYPE_STDERR: &str = "stderr";
pub const STREAM_TYPE_RESIZE: &str = "resize";
/// portforward's data stream type.
pub const STREAM_TYPE_DATA: &str = "data";
/// portforward: the remote port of a stream pair.
pub const HEADER_PORT: &str = "port";
/// portforward: ties a data stream to its error stream.
pub const HEADER_REQUEST_ID: &str = "requestID";

/// The client's acceptable protocols from its `X-Stream-Protocol-Version` headers (each may
/// hold a comma-separated list), in its order of preference.
pub fn client_protocols(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(HEADER_PROTOCOL_VERSION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The first of the client's protocols the server supports (the client's preference wins, as
/// upstream's httpstream.Handshake does).
pub fn negotiate<'a>(client: &[String], server: &[&'a str]) -> Option<&'a str> {
    client
        .iter()
        .find_map(|c| server.iter().find(|s| **s == c.as_str()).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_client_preference() {
        let mut h = http::HeaderMap::new();
        h.append(
            HEADER_PROTOCOL_VERSION,
            "v9.channel.k8s.io".parse().expect("value"),
        );
        h.append(
            HEADER_PROTOCOL_VERSION,
            "v3.channel.k8s.io, v4.channel.k8s.io"
                .parse()
                .expect("value"),
        );
        let c = client_protocols(&h);
        assert_eq!(
            c,
            [
                "v9.channel.k8s.io",
                "v3.channel.k8s.io",
                "v4.channel.k8s.io"
            ]
        );
        assert_eq!(
            negotiate(&c, REMOTECOMMAND_PROTOCOLS),
            Some(STREAM_PROTOCOL_V3)
        );
        assert_eq!(negotiate(&c, &[PORT_FORWARD_V1]), None);
        assert_eq!(negotiate(&[], REMOTECOMMAND_PROTOCOLS), None);
    }
}
