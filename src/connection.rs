//! Framing shared by both ends of a connection: a 4-byte big-endian length, then the body.
//!
//! The length of an incoming frame is checked against the receiver's limit as soon as its four
//! bytes arrive, so an oversized frame is refused before a byte of it is buffered. Outgoing
//! frames have their own, larger limit: a broker accepts requests of at most a message's size,
//! but answers a fetch with many messages at once.
//!
//! The codec also notes when the first bytes of a frame arrived ([`PartialFrame`]), so a reader
//! can close a connection whose sender dribbles a frame forever (a slow-loris sender) without
//! putting a timeout on connections that are merely quiet between frames.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};

/// Frame overhead allowed on top of the largest message a broker accepts (ids, names, keys).
pub const FRAME_OVERHEAD: usize = 64 * 1024;

/// The largest frame either side sends, and the largest a client accepts (a fetch is capped
/// well below this).
pub const CLIENT_MAX_FRAME: usize = 64 * 1024 * 1024;

fn length_delimited(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(max)
        .new_codec()
}

/// Length-delimited frames with separate limits for what is read and what is written.
pub struct FrameCodec {
    read: LengthDelimitedCodec,
    write: LengthDelimitedCodec,
    partial: PartialFrame,
}

impl FrameCodec {
    pub fn new(max_in: usize, max_out: usize) -> Self {
        FrameCodec {
            read: length_delimited(max_in),
            write: length_delimited(max_out),
            partial: PartialFrame::default(),
        }
    }

    /// Changes the largest frame accepted from now on (a broker accepts only small frames
    /// until a client has authenticated).
    pub fn set_max_in(&mut self, max_in: usize) {
        self.read.set_max_frame_length(max_in);
    }

    /// A handle on when the frame being received started arriving.
    pub fn partial(&self) -> PartialFrame {
        self.partial.clone()
    }
}

/// When the first bytes of a frame not yet complete arrived, shared between the codec and
/// whoever watches the connection. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PartialFrame {
    /// Milliseconds after `base` plus one, or 0 when no frame is partly received.
    since: Arc<AtomicU64>,
    base: Instant,
}

impl Default for PartialFrame {
    fn default() -> Self {
        PartialFrame {
            since: Arc::new(AtomicU64::new(0)),
            base: Instant::now(),
        }
    }
}

impl PartialFrame {
    /// When the frame now arriving began, if one is partly received.
    pub fn since(&self) -> Option<Instant> {
        match self.since.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.base + Duration::from_millis(ms - 1)),
        }
    }

    fn start(&self) {
        if self.since.load(Ordering::Relaxed) == 0 {
            let ms = self.base.elapsed().as_millis() as u64 + 1;
            self.since.store(ms, Ordering::Relaxed);
        }
    }

    fn clear(&self) {
        self.since.store(0, Ordering::Relaxed);
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, std::io::Error> {
        // Bytes waiting and no frame started: they are the start of one. The inner codec may
        // consume a frame's length prefix and leave `src` empty; the frame is still partial
        // until it returns it whole.
        if !src.is_empty() {
            self.partial.start();
        }
        let frame = self.read.decode(src)?;
        if frame.is_some() {
            self.partial.clear();
        }
        Ok(frame)
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        self.write.encode(item, dst)
    }
}

pub type FramedStream = Framed<TcpStream, FrameCodec>;

/// Frames over `stream`: incoming ones at most `max_in` bytes, outgoing at most
/// [`CLIENT_MAX_FRAME`].
pub fn framed(stream: TcpStream, max_in: usize) -> FramedStream {
    Framed::new(stream, FrameCodec::new(max_in, CLIENT_MAX_FRAME))
}

/// Turns on TCP keepalive, so a peer that vanished without a word (power cut, cable pulled,
/// NAT state dropped) is noticed within about two minutes even on a quiet connection:
/// first probe after 60 s idle, then every 10 s, given up after 6 unanswered.
pub fn keepalive(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: `fd` is an open socket owned by `stream` for the duration of the call, and
        // the option value is a plain int of the size we pass.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    // Best effort: a failure leaves the connection as it was, without keepalive.
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6);
    }
}

/// The deepest nesting of arrays and maps a MessagePack frame may have. Requests and replies
/// nest five levels at most (`data` travels as text); decoding is recursive, and a frame
/// nested many thousands deep would overflow the stack of whoever decodes it.
pub const MAX_MSGPACK_DEPTH: usize = 32;

/// Checks, without recursion, that the MessagePack value at the start of `buf` nests no
/// deeper than `max` arrays and maps. A value cut short is not this check's business (the
/// decoder reports it); trailing bytes are ignored.
pub fn msgpack_depth_ok(buf: &[u8], max: usize) -> Result<(), String> {
    // Elements still to read in each open array or map.
    let mut open: Vec<u64> = Vec::new();
    let mut pos = 0usize;
    let be = |at: usize, n: usize| -> Option<u64> {
        let b = buf.get(at..at + n)?;
        Some(b.iter().fold(0u64, |acc, x| (acc << 8) | *x as u64))
    };
    loop {
        let Some(&b) = buf.get(pos) else {
            return Ok(());
        };
        pos += 1;
        // (elements in a container that opens here, bytes of payload to skip)
        let (container, skip): (Option<u64>, u64) = match b {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (None, 0),
            0x80..=0x8f => (Some(2 * (b & 0x0f) as u64), 0),
            0x90..=0x9f => (Some((b & 0x0f) as u64), 0),
            0xa0..=0xbf => (None, (b & 0x1f) as u64),
            0xc1 => return Err("invalid MessagePack marker 0xc1".into()),
            0xc4 | 0xd9 => (None, 1 + be(pos, 1).unwrap_or(0)),
            0xc5 | 0xda => (None, 2 + be(pos, 2).unwrap_or(0)),
            0xc6 | 0xdb => (None, 4 + be(pos, 4).unwrap_or(0)),
            0xc7 => (None, 2 + be(pos, 1).unwrap_or(0)),
            0xc8 => (None, 3 + be(pos, 2).unwrap_or(0)),
            0xc9 => (None, 5 + be(pos, 4).unwrap_or(0)),
            0xca => (None, 4),
            0xcb => (None, 8),
            0xcc | 0xd0 => (None, 1),
            0xcd | 0xd1 => (None, 2),
            0xce | 0xd2 => (None, 4),
            0xcf | 0xd3 => (None, 8),
            0xd4 => (None, 2),
            0xd5 => (None, 3),
            0xd6 => (None, 5),
            0xd7 => (None, 9),
            0xd8 => (None, 17),
            0xdc => (Some(be(pos, 2).unwrap_or(0)), 2),
            0xdd => (Some(be(pos, 4).unwrap_or(0)), 4),
            0xde => (Some(2 * be(pos, 2).unwrap_or(0)), 2),
            0xdf => (Some(2 * be(pos, 4).unwrap_or(0)), 4),
        };
        pos = match usize::try_from(skip).ok().and_then(|s| pos.checked_add(s)) {
            Some(p) if p <= buf.len() => p,
            _ => return Ok(()),
        };
        if let Some(n) = container.filter(|n| *n > 0) {
            if open.len() >= max {
                return Err(format!(
                    "the frame nests arrays and maps deeper than {max} levels"
                ));
            }
            open.push(n);
            continue;
        }
        // One element complete: it may complete the containers around it.
        loop {
            match open.last_mut() {
                None => return Ok(()),
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    open.pop();
                }
            }
        }
    }
}

/// Whether an I/O error from the codec means the peer announced a frame over the limit.
pub fn is_oversized(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData && e.to_string().contains("frame size too big")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_partial_from_its_first_byte_until_it_is_whole() {
        let mut codec = FrameCodec::new(1024, 1024);
        let partial = codec.partial();
        let mut buf = BytesMut::new();
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(
            partial.since().is_none(),
            "nothing received: nothing partial"
        );

        buf.extend_from_slice(&[0, 0]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        let started = partial
            .since()
            .expect("half a length prefix is a partial frame");

        buf.extend_from_slice(&[0, 3]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert_eq!(
            partial.since(),
            Some(started),
            "prefix consumed, body missing"
        );

        buf.extend_from_slice(b"abc");
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"abc");
        assert!(partial.since().is_none(), "whole frame: nothing partial");
    }

    #[test]
    fn msgpack_nesting_is_measured_without_recursion() {
        use crate::protocol::{Body, Outgoing, Request};
        let deepest_request = Request {
            id: 1,
            body: Body::Ack {
                ids: vec!["a:1".into(); 3],
            },
        };
        let send = Request {
            id: 2,
            body: Body::Send(Outgoing {
                to: "x".into(),
                data: Some("{}".into()),
                ..Default::default()
            }),
        };
        for r in [deepest_request, send] {
            let bytes = rmp_serde::to_vec_named(&r).unwrap();
            assert!(msgpack_depth_ok(&bytes, 5).is_ok(), "{r:?}");
        }
        let mut deep = vec![0x91u8; 1_000_000];
        deep.push(0xc0);
        assert!(msgpack_depth_ok(&deep, MAX_MSGPACK_DEPTH).is_err());
        deep.truncate(MAX_MSGPACK_DEPTH);
        deep.push(0xc0);
        assert!(msgpack_depth_ok(&deep, MAX_MSGPACK_DEPTH).is_ok());
        // Maps of maps, and containers announcing more than is there.
        let maps = [[0x81u8, 0xa1, b'k']; 40].concat();
        assert!(msgpack_depth_ok(&maps, MAX_MSGPACK_DEPTH).is_err());
        assert!(msgpack_depth_ok(&[0xdd, 0xff, 0xff, 0xff, 0xff], 4).is_ok());
        assert!(msgpack_depth_ok(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'a'], 4).is_ok());
        assert!(msgpack_depth_ok(&[], 4).is_ok());
        // Siblings do not add up: a long flat array of empty arrays is shallow.
        let flat = [&[0xdc, 0x03, 0xe8][..], &[0x90; 1000]].concat();
        assert!(msgpack_depth_ok(&flat, 2).is_ok());
    }

    #[test]
    fn oversized_prefixes_are_refused_before_buffering() {
        let mut codec = FrameCodec::new(16, 16);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        let e = codec.decode(&mut buf).unwrap_err();
        assert!(is_oversized(&e), "{e}");
    }
}
