//! Framing shared by both ends of a connection: a 4-byte big-endian length, then the body.
//!
//! The length of an incoming frame is checked against the receiver's limit as soon as its four
//! bytes arrive, so an oversized frame is refused before a byte of it is buffered. Outgoing
//! frames have their own, larger limit: a broker accepts requests of at most a message's size,
//! but answers a fetch with many messages at once.

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
}

impl FrameCodec {
    pub fn new(max_in: usize, max_out: usize) -> Self {
        FrameCodec {
            read: length_delimited(max_in),
            write: length_delimited(max_out),
        }
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, std::io::Error> {
        self.read.decode(src)
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

/// Whether an I/O error from the codec means the peer announced a frame over the limit.
pub fn is_oversized(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData && e.to_string().contains("frame size too big")
}
