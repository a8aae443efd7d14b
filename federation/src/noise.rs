//! The encrypted peer link: a Noise `NNpsk0` handshake keyed by the mesh secret, then every
//! peer frame sealed in ChaCha20-Poly1305.
//!
//! 1. After the 7-byte hello (with its encrypted flag), the dialer sends one frame holding a
//!    first handshake message (`-> psk, e`) per secret it knows: the current one first, then
//!    those accepted during a rotation. The pre-shared key of each is derived from the secret
//!    ([`Secret::link_keys`]); the prologue is the hello itself, so a changed hello breaks the
//!    handshake.
//! 2. The acceptor tries each of them with each of its own keys. The first that decrypts
//!    wins; it answers `[index] ‖ (<- e, ee)`. None decrypts: the dialer does not know the
//!    secret, and the acceptor refuses in plaintext (`PeerMsg::Refused`) and closes.
//! 3. The dialer finishes the handshake with the chosen message. Both sides now hold fresh
//!    keys from the ephemeral Diffie–Hellman: forward secrecy, and a recorded handshake
//!    replayed later yields keys the replayer does not have, so its next frame fails to open.
//! 4. From then on every peer frame is cut into chunks of at most [`CHUNK`] bytes, each sealed
//!    as one Noise transport message (at most 65,535 bytes) prefixed with one byte: 1 for the
//!    last chunk of a frame, 0 otherwise. Each chunk travels in its own length-delimited frame.
//!    Nonces are implicit counters per direction (TCP keeps order), so a reordered, replayed
//!    or altered chunk fails to open and the link closes.
//!
//! The peer protocol inside (its HMAC challenge–response, heartbeats, gossip, delivery) runs
//! unchanged over the sealed frames.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use snow::{HandshakeState, StatelessTransportState};
use zeroize::Zeroizing;

use crate::auth::{Secret, MAX_SECRETS};

/// The Noise protocol name: pattern, Diffie–Hellman, cipher, hash.
pub const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Noise's largest message.
pub const MAX_MESSAGE: usize = 65_535;
const TAG: usize = 16;
/// Plaintext bytes of a frame per sealed chunk (one byte of each message is the last-chunk flag).
pub const CHUNK: usize = MAX_MESSAGE - TAG - 1;
/// A first handshake message: an ephemeral public key and the tag of the empty payload.
const FIRST_LEN: usize = 32 + TAG;
/// The answer: the index of the chosen first message, an ephemeral key, a tag.
const ANSWER_LEN: usize = 1 + 32 + TAG;
const PROLOGUE_LABEL: &[u8] = b"ipc-mesh link v1\0";

/// Why an encrypted link could not be set up or went bad.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    /// The other side does not share any mesh secret with us (or sent garbage).
    #[error("the encrypted handshake failed: the peer does not know the mesh secret")]
    WrongSecret,
    #[error("malformed encrypted handshake: {0}")]
    Malformed(String),
    /// A sealed chunk failed to open: altered, replayed, reordered, or sealed with other keys.
    #[error("a sealed frame failed to open (altered, replayed, or not from this link's peer)")]
    Open,
    #[error("a sealed frame is larger than {0} bytes")]
    TooLarge(usize),
}

fn params() -> snow::params::NoiseParams {
    PATTERN.parse().expect("a valid Noise pattern name")
}

fn prologue(hello: &[u8]) -> Vec<u8> {
    [PROLOGUE_LABEL, hello].concat()
}

fn builder<'a>(
    params: snow::params::NoiseParams,
    psk: &'a [u8; 32],
    prologue: &'a [u8],
) -> Result<snow::Builder<'a>, snow::Error> {
    snow::Builder::new(params).psk(0, psk)?.prologue(prologue)
}

/// The dialer's side, between its first frame and the acceptor's answer.
pub struct Initiator {
    states: Vec<HandshakeState>,
}

impl Initiator {
    /// Starts the handshake after `hello` (the bytes the dialer sent); returns the first frame.
    pub fn start(secret: &Secret, hello: &[u8]) -> (Initiator, Vec<u8>) {
        let prologue = prologue(hello);
        let mut states = Vec::new();
        let mut frame = Vec::with_capacity(FIRST_LEN * secret.len());
        for psk in secret.link_keys().iter().take(MAX_SECRETS) {
            let mut hs = builder(params(), psk, &prologue)
                .and_then(|b| b.build_initiator())
                .expect("the default resolver supports the pattern");
            let mut msg = [0u8; FIRST_LEN];
            let n = hs
                .write_message(&[], &mut msg)
                .expect("a first message fits its buffer");
            frame.extend_from_slice(&msg[..n]);
            states.push(hs);
        }
        (Initiator { states }, frame)
    }

    /// Finishes with the acceptor's answer.
    pub fn finish(mut self, answer: &[u8]) -> Result<Cipher, LinkError> {
        if answer.len() != ANSWER_LEN {
            return Err(LinkError::Malformed(format!(
                "an answer of {} bytes, expected {ANSWER_LEN}",
                answer.len()
            )));
        }
        let i = answer[0] as usize;
        if i >= self.states.len() {
            return Err(LinkError::Malformed(format!("answer names key {i}")));
        }
        let mut hs = self.states.swap_remove(i);
        let mut payload = [0u8; 0];
        hs.read_message(&answer[1..], &mut payload)
            .map_err(|_| LinkError::WrongSecret)?;
        Cipher::from_handshake(hs)
    }
}

/// The acceptor's side: answers the dialer's first frame, or refuses it.
pub fn respond(
    secret: &Secret,
    hello: &[u8],
    first: &[u8],
) -> Result<(Cipher, Vec<u8>), LinkError> {
    if first.is_empty() || first.len() % FIRST_LEN != 0 || first.len() > FIRST_LEN * MAX_SECRETS {
        return Err(LinkError::Malformed(format!(
            "a first handshake frame of {} bytes",
            first.len()
        )));
    }
    let prologue = prologue(hello);
    let keys = secret.link_keys();
    for (i, msg) in first.chunks(FIRST_LEN).enumerate() {
        for psk in &keys {
            let mut hs = builder(params(), psk, &prologue)
                .and_then(|b| b.build_responder())
                .expect("the default resolver supports the pattern");
            let mut payload = [0u8; 0];
            if hs.read_message(msg, &mut payload).is_err() {
                continue;
            }
            let mut answer = vec![0u8; ANSWER_LEN];
            answer[0] = i as u8;
            let n = hs
                .write_message(&[], &mut answer[1..])
                .map_err(|e| LinkError::Malformed(e.to_string()))?;
            answer.truncate(1 + n);
            return Ok((Cipher::from_handshake(hs)?, answer));
        }
    }
    Err(LinkError::WrongSecret)
}

/// The keys of an established link. Split into a [`Sealer`] and an [`Opener`], one per
/// direction, each counting its own nonces.
pub struct Cipher {
    state: Arc<StatelessTransportState>,
}

impl Cipher {
    fn from_handshake(hs: HandshakeState) -> Result<Cipher, LinkError> {
        let state = hs
            .into_stateless_transport_mode()
            .map_err(|e| LinkError::Malformed(e.to_string()))?;
        Ok(Cipher {
            state: Arc::new(state),
        })
    }

    /// The two halves; `max_frame` bounds what the opener reassembles.
    pub fn split(self, max_frame: usize) -> (Sealer, Opener) {
        (
            Sealer {
                state: self.state.clone(),
                nonce: 0,
            },
            Opener {
                state: self.state,
                nonce: 0,
                buf: BytesMut::new(),
                max_frame,
            },
        )
    }
}

/// Seals outgoing frames.
pub struct Sealer {
    state: Arc<StatelessTransportState>,
    nonce: u64,
}

impl Sealer {
    /// Seals one frame into one or more messages, to be sent in order, each in its own frame.
    pub fn seal(&mut self, frame: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(frame.len() / CHUNK + 1);
        let mut chunks = frame.chunks(CHUNK).peekable();
        let mut plain = Zeroizing::new(Vec::with_capacity(CHUNK.min(frame.len()) + 1));
        loop {
            let data = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            plain.clear();
            plain.push(u8::from(last));
            plain.extend_from_slice(data);
            let mut msg = vec![0u8; plain.len() + TAG];
            let n = self
                .state
                .write_message(self.nonce, &plain, &mut msg)
                .expect("a chunk fits one Noise message");
            self.nonce += 1;
            msg.truncate(n);
            out.push(Bytes::from(msg));
            if last {
                return out;
            }
        }
    }
}

/// Opens incoming messages and reassembles frames.
pub struct Opener {
    state: Arc<StatelessTransportState>,
    nonce: u64,
    buf: BytesMut,
    max_frame: usize,
}

impl Opener {
    /// Opens one message; returns a frame when it was the last chunk of one.
    pub fn open(&mut self, msg: &[u8]) -> Result<Option<Bytes>, LinkError> {
        if msg.len() < TAG + 1 || msg.len() > MAX_MESSAGE {
            return Err(LinkError::Open);
        }
        let mut plain = Zeroizing::new(vec![0u8; msg.len() - TAG]);
        let n = self
            .state
            .read_message(self.nonce, msg, &mut plain)
            .map_err(|_| LinkError::Open)?;
        self.nonce += 1;
        let (flag, data) = plain[..n].split_first().ok_or(LinkError::Open)?;
        if self.buf.len() + data.len() > self.max_frame {
            return Err(LinkError::TooLarge(self.max_frame));
        }
        self.buf.extend_from_slice(data);
        match flag {
            1 => Ok(Some(self.buf.split().freeze())),
            0 => Ok(None),
            _ => Err(LinkError::Open),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Hello;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec()).unwrap()
    }

    fn pair(dialer: &Secret, acceptor: &Secret) -> Result<(Cipher, Cipher), LinkError> {
        let hello = Hello::encrypted_peer().encode();
        let (init, first) = Initiator::start(dialer, &hello);
        let (acc, answer) = respond(acceptor, &hello, &first)?;
        Ok((init.finish(&answer)?, acc))
    }

    #[test]
    fn frames_round_trip_in_chunks() {
        let s = secret("correct horse battery staple");
        let (d, a) = pair(&s, &s).unwrap();
        let (mut seal, _) = d.split(1 << 24);
        let (_, mut open) = a.split(1 << 24);
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7] {
            let frame: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let msgs = seal.seal(&frame);
            assert_eq!(msgs.len(), len.max(1).div_ceil(CHUNK));
            assert!(msgs.iter().all(|m| m.len() <= MAX_MESSAGE));
            let mut got = None;
            for (i, m) in msgs.iter().enumerate() {
                let r = open.open(m).unwrap();
                assert_eq!(r.is_some(), i + 1 == msgs.len());
                got = r;
            }
            assert_eq!(got.unwrap(), frame);
        }
    }

    #[test]
    fn sealed_frames_do_not_contain_the_text() {
        let s = secret("correct horse battery staple");
        let (d, _) = pair(&s, &s).unwrap();
        let (mut seal, _) = d.split(1 << 24);
        let text = b"the launch code is 0000";
        for m in seal.seal(text) {
            assert!(!m.windows(text.len()).any(|w| w == text));
        }
    }

    #[test]
    fn a_wrong_secret_is_refused() {
        let r = pair(
            &secret("correct horse battery staple"),
            &secret("an entirely different secret"),
        );
        assert_eq!(r.err(), Some(LinkError::WrongSecret));
    }

    #[test]
    fn a_changed_hello_breaks_the_handshake() {
        let s = secret("correct horse battery staple");
        let (_, first) = Initiator::start(&s, &Hello::encrypted_peer().encode());
        let other = [0u8; 7];
        assert_eq!(
            respond(&s, &other, &first).err(),
            Some(LinkError::WrongSecret)
        );
    }

    #[test]
    fn a_replayed_handshake_gives_the_replayer_nothing() {
        let s = secret("correct horse battery staple");
        let hello = Hello::encrypted_peer().encode();
        let (init, first) = Initiator::start(&s, &hello);
        let (acc, answer) = respond(&s, &hello, &first).unwrap();
        let dialer = init.finish(&answer).unwrap();
        let (mut seal, _) = dialer.split(1 << 20);
        let recorded = seal.seal(b"hello from the real dialer");
        let (_, mut open) = acc.split(1 << 20);
        assert!(open.open(&recorded[0]).unwrap().is_some());

        // The recorded first frame and the first sealed frame, replayed to the acceptor: it
        // answers (it cannot tell yet), but the recorded frame does not open with new keys.
        let (acc2, _) = respond(&s, &hello, &first).unwrap();
        let (_, mut open2) = acc2.split(1 << 20);
        assert_eq!(open2.open(&recorded[0]), Err(LinkError::Open));
    }

    #[test]
    fn altered_reordered_or_repeated_chunks_fail_to_open() {
        let s = secret("correct horse battery staple");
        let (d, a) = pair(&s, &s).unwrap();
        let (mut seal, _) = d.split(1 << 20);
        let (_, mut open) = a.split(1 << 20);
        let m1 = seal.seal(b"one");
        let m2 = seal.seal(b"two");
        assert_eq!(open.open(&m2[0]), Err(LinkError::Open), "reordered");
        let (d, a) = pair(&s, &s).unwrap();
        let (mut seal, _) = d.split(1 << 20);
        let (_, mut open) = a.split(1 << 20);
        let m = seal.seal(b"one");
        let mut bad = m[0].to_vec();
        bad[3] ^= 1;
        assert_eq!(open.open(&bad), Err(LinkError::Open), "altered");
        assert!(open.open(&m[0]).unwrap().is_some());
        assert_eq!(open.open(&m[0]), Err(LinkError::Open), "repeated");
        let _ = m1;
    }

    #[test]
    fn reassembly_is_bounded() {
        let s = secret("correct horse battery staple");
        let (d, a) = pair(&s, &s).unwrap();
        let (mut seal, _) = d.split(1 << 20);
        let (_, mut open) = a.split(CHUNK + 10);
        let msgs = seal.seal(&vec![7u8; 2 * CHUNK]);
        assert!(open.open(&msgs[0]).unwrap().is_none());
        assert_eq!(open.open(&msgs[1]), Err(LinkError::TooLarge(CHUNK + 10)));
    }

    #[test]
    fn rotation_either_side_may_know_both_secrets() {
        let old = secret("the old secret, long enough");
        let both = secret("the new secret, long enough")
            .with_previous(b"the old secret, long enough".to_vec())
            .unwrap();
        assert!(pair(&both, &old).is_ok());
        assert!(pair(&old, &both).is_ok());
        assert!(pair(&secret("the new secret, long enough"), &old).is_err());
    }
}
