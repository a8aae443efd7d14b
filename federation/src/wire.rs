//! What every connection says first, and how frame bodies are encoded.
//!
//! A connection (client or peer) is a stream of frames, each a 4-byte big-endian length
//! followed by that many bytes. The first frame from the dialling side is a [`Hello`]:
//!
//! ```text
//! +------+------+------+------+---------+---------+------+
//! | 'I'  | 'P'  | 'C'  | 'M'  | version (u16 BE)  | role |
//! +------+------+------+------+---------+---------+------+
//!
//! Every later frame body is MessagePack (named fields, so old and new versions can skip what
//! they do not know). Frames longer than the receiver's limit are refused from the length
//! prefix alone, before any buffering.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::Error;

/// The first four bytes of every hello.
pub const MAGIC: [u8; 4] = *b"IPCM";

/// The wire protocol version this build speaks. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;

/// Length of an encoded hello.
pub const HELLO_LEN: usize = 7;

/// The role byte's flag for "an encrypted peer link follows".
const ENCRYPTED: u8 = 0x80;

/// Who is dialling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A CLI, an MCP server, a bench: something acting for agents.
    Client,
    /// Another broker.
    Peer,
}

impl Role {
    fn to_byte(self) -> u8 {
        match self {
            Role::Client => 1,
            Role::Peer => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Role> {
        match b {
            1 => Some(Role::Client),
            2 => Some(Role::Peer),
            _ => None,
        }
    }
}

/// The opening frame of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub role: Role,
    /// A peer dialer asks for an encrypted link (a Noise handshake follows the hello).
    pub encrypted: bool,
}

impl Hello {
    pub fn new(role: Role) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            role,
            encrypted: false,
        }
    }

    /// The hello of a peer dialer that asks for an encrypted link.
    pub fn encrypted_peer() -> Self {
        Hello {
            encrypted: true,
            ..Hello::new(Role::Peer)
        }
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let v = self.version.to_be_bytes();
        [
            MAGIC[0],
            MAGIC[1],
            MAGIC[2],
            MAGIC[3],
            v[0],
            v[1],
            self.role.to_byte() | if self.encrypted { ENCRYPTED } else { 0 },
        ]
    }

    /// Parses a hello frame body. A version other than ours is an error: there is only one so
    /// far, and guessing at a newer peer's meaning would be worse than refusing it clearly.
    pub fn decode(frame: &[u8]) -> Result<Hello, Error> {
        if frame.first() == Some(&b'{') {
            return Err(Error::Protocol(
                "this looks like a claude-ipc-mcp JSON request; this is an ipc-mesh broker, \
                 which speaks length-delimited MessagePack frames (see docs/protocol.md)"
                    .into(),
            ));
        }
        if frame.len() != HELLO_LEN || frame[..4] != MAGIC {
            return Err(Error::Protocol(
                "bad hello: expected the magic bytes \"IPCM\", a version and a role".into(),
            ));
        }
        let version = u16::from_be_bytes([frame[4], frame[5]]);
        if version != PROTOCOL_VERSION {
            return Err(Error::Protocol(format!(
                "protocol version {version} is not supported; this broker speaks version \
                 {PROTOCOL_VERSION}"
            )));
        }
        let encrypted = frame[6] & ENCRYPTED != 0;
        let role = Role::from_byte(frame[6] & !ENCRYPTED)
            .ok_or_else(|| Error::Protocol(format!("unknown role {} in hello", frame[6])))?;
        if encrypted && role != Role::Peer {
            return Err(Error::Protocol(
                "the encrypted-link flag is for peer brokers only; clients connect in plaintext"
                    .into(),
            ));
        }
        Ok(Hello {
            version,
            role,
            encrypted,
        })
    }
}

/// Encodes a frame body.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own types to a Vec cannot fail: they have string keys and no
    // unrepresentable values.
    rmp_serde::to_vec_named(value).expect("encoding a wire type cannot fail")
}

/// The deepest nesting of arrays and maps (and extensions) [`decode`] follows. Our types nest
/// about ten levels at most (a `Deliver` of envelopes of messages); decoding recurses once per
/// level, and the decoder's own limit (1,024) is deeper than a 2 MiB tokio worker stack goes
/// in a debug build, so a hostile frame could abort the process.
pub const MAX_DEPTH: usize = 32;

/// Decodes a frame body; the error says what could not be read.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de).map_err(|e| Error::Invalid(format!("undecodable frame: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips() {
        for role in [Role::Client, Role::Peer] {
            let h = Hello::new(role);
            assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        }
        let h = Hello::encrypted_peer();
        assert_eq!(h.encode()[6], 0x82);
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut client_flagged = Hello::new(Role::Client).encode();
        client_flagged[6] |= 0x80;
        assert!(Hello::decode(&client_flagged).is_err());
    }

    #[test]
    fn bad_hellos_are_refused_with_a_reason() {
        let mut wrong_magic = Hello::new(Role::Client).encode();
        wrong_magic[0] = b'X';
        assert!(Hello::decode(&wrong_magic)
            .unwrap_err()
            .to_string()
            .contains("magic"));

        let mut wrong_version = Hello::new(Role::Client).encode();
        wrong_version[5] = 99;
        assert!(Hello::decode(&wrong_version)
            .unwrap_err()
            .to_string()
            .contains("version"));

        let mut wrong_role = Hello::new(Role::Client).encode();
        wrong_role[6] = 7;
        assert!(Hello::decode(&wrong_role).is_err());

        assert!(Hello::decode(b"").is_err());
        assert!(Hello::decode(br#"{"action":"register"}"#)
            .unwrap_err()
            .to_string()
            .contains("claude-ipc-mcp"));
    }

    #[test]
    fn garbage_bodies_do_not_decode() {
        assert!(decode::<Vec<String>>(&[0xc1, 0xff, 0x00]).is_err());
    }

    /// Found while writing the peer-message fuzz target: a peer frame nesting arrays 1,000
    /// deep inside an unknown field overflowed a 2 MiB stack (a tokio worker's) in a debug
    /// build. On a plaintext link the driver decodes the first peer frame before the handshake
    /// has proved anything (seed: fuzz/seeds/peer/crash-deep-nesting).
    #[test]
    fn deeply_nested_peer_frame_is_refused_without_overflowing() {
        use crate::proto::PeerMsg;
        // {"Ping": {"t": 1, "x": [[[ … nil … ]]]}}
        let frame = |depth: usize| {
            let mut v = vec![
                0x81, 0xa4, b'P', b'i', b'n', b'g', 0x82, 0xa1, b't', 1, 0xa1, b'x',
            ];
            v.extend(std::iter::repeat_n(0x91, depth));
            v.push(0xc0);
            v
        };
        let shallow = frame(MAX_DEPTH - 3);
        assert_eq!(decode::<PeerMsg>(&shallow).unwrap(), PeerMsg::Ping { t: 1 });
        let deep = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || decode::<PeerMsg>(&frame(100_000)).map(|_| ()))
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert!(deep.unwrap_err().to_string().contains("depth"), "refused");
    }
}
